"""scripts/bench_conn_memory.py (BENCHMARKS.md, "Memory per held connection") runs on a tiny
scale and reports its figures; what they are is a benchmark, never a threshold here."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.cli_helpers import REPO, cli_env


def bench(n: int, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scripts.bench_conn_memory", "-n", str(n)],
        cwd=REPO,
        env={**cli_env(), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_it_counts_the_heap_of_each_server_side_connection() -> None:
    done = bench(5, PYTHONMALLOC="malloc")
    assert done.returncode == 0, done.stderr
    number = r"(-?\d+\.\d\d)"
    assert re.fullmatch(
        rf"N=5 server-side TLS connections, KiB each: C heap in use {number} "
        rf"\(Python objects {number}, OpenSSL and the BIOs {number}\); resident {number}\n",
        done.stdout,
    ), done.stdout


def test_without_python_allocations_on_the_heap_it_refuses_to_count() -> None:
    done = bench(5, PYTHONMALLOC="pymalloc")
    assert done.returncode == 2
    assert done.stderr.endswith(
        "error: run with PYTHONMALLOC=malloc, so that the C heap counts Python's objects\n"
    )
