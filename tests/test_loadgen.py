"""The load generator runs each workload end to end on a tiny scale and reports well-formed
figures. Its numbers are benchmarks (BENCHMARKS.md), never pass/fail thresholds here."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.cli_helpers import REPO, cli_env
from tests.tools import needs

pytestmark = pytest.mark.timeout(180)


def loadgen(*args: str) -> list[dict]:
    # A session of its own, so that a hang kills the servers it started too, not only itself.
    proc = subprocess.Popen(
        [sys.executable, "-m", "scripts.loadgen", *args, "--json", "--workers", "1"],
        cwd=REPO,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr
    return [json.loads(line) for line in stdout.splitlines()]


def test_fanout_against_a_fresh_server_counts_every_delivery() -> None:
    (row,) = loadgen("fanout", "-n", "6", "--senders", "2", "--duration", "1", "--rate", "40")
    assert row["target"] == "securechat" and row["workload"] == "fanout"
    assert row["logged_in"] == 6 and row["login_failures"] == {}
    assert row["still_connected"] == 6 and row["dropped"] == {}
    assert row["refused"] == 0
    # 40 messages a second for a second, each to the 5 members besides its sender.
    assert row["sent"] in range(36, 45)
    assert 0.8 * 40 * 5 <= row["deliveries_per_s"] <= 1.2 * 40 * 5
    assert row["latency_samples"] > 0
    assert 0 < row["p50_ms"] <= row["p99_ms"] <= row["max_ms"]
    assert row["server_rss_mib"] > 0 and row["server_cpu_pct"] >= 0
    assert row["loadgen_cpu_pct"] > 0


def test_hold_reports_logins_and_memory_per_connection() -> None:
    (row,) = loadgen("hold", "-n", "20", "--duration", "0.5")
    assert row["logged_in"] == 20 and row["held"] == 20
    assert row["logins_per_s"] > 0 and row["rss_per_conn_kib"] > 0


def test_dm_pairs_seal_and_open_real_direct_messages() -> None:
    (row,) = loadgen("dm", "--pairs", "2", "--duration", "1")
    assert row["logged_in"] == 4 and row["refused"] == 0
    assert row["dms_per_s"] > 0 and row["latency_samples"] > 0
    assert row["still_connected"] == 4


@needs("ngircd")
def test_the_same_workload_runs_against_ngircd_and_gives_a_ratio() -> None:
    rows = loadgen("fanout", "-n", "6", "--senders", "2", "--duration", "1", "--target", "both")
    secure, irc, ratio = rows
    assert (secure["target"], irc["target"]) == ("securechat", "ngircd")
    assert irc["logged_in"] == 6 and irc["still_connected"] == 6
    assert irc["deliveries_per_s"] > 0 and secure["deliveries_per_s"] > 0
    expected = secure["deliveries_per_s"] / irc["deliveries_per_s"]
    assert ratio["ratio"]["deliveries_per_s_ratio"] == pytest.approx(expected)


def test_a_bad_argument_is_refused_with_a_reason() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "scripts.loadgen", "dm", "--target", "ngircd"],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "the dm workload is securechat's only" in out.stderr
