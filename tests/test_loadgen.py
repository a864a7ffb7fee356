"""Both load generators (the Python one and the native one in C) run each workload end to end on
a tiny scale and report well-formed, consistent figures. Their numbers are benchmarks
(BENCHMARKS.md), never pass/fail thresholds here."""

from __future__ import annotations

import json
import os
import pstats
import resource
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from scripts.loadgen import attack, native, servers
from scripts.loadgen.profile import profiled
from securechat.server import Server
from tests.cli_helpers import REPO, cli_env
from tests.tools import needs

pytestmark = pytest.mark.timeout(180)


def loadgen(*args: str, module: str = "scripts.loadgen") -> list[dict]:
    extra = ["--workers", "1"] if module == "scripts.loadgen" else []
    # A session of its own, so that a hang kills the servers it started too, not only itself.
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *args, "--json", *extra],
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


def run_module(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_bad_argument_is_refused_with_a_reason() -> None:
    out = run_module("scripts.loadgen", "dm", "--target", "ngircd")
    assert out.returncode == 2
    assert "the dm workload is securechat's only" in out.stderr


# -- the native load generator --------------------------------------------------------------------

needs_ngircd = pytest.mark.skipif(
    servers.ngircd_binary() is None, reason="ngircd is not installed (.ci/run installs it)"
)


@pytest.fixture(scope="module")
def native_binary() -> Path:
    why = native.missing_prerequisite()
    if why is not None:
        pytest.skip(f"the native load generator cannot be built here: {why}")
    return native.build()


def native_loadgen(*args: str) -> list[dict]:
    return loadgen(*args, module="scripts.loadgen.native")


def assert_every_message_reached_every_other_member(row: dict, n: int) -> None:
    """Flat out, every delivery is timed; at a fixed rate, each message once, at its witness."""
    assert row["logged_in"] == n and row["login_failures"] == 0
    assert row["still_connected"] == n and row["dropped"] == 0
    assert row["refused"] == 0
    assert row["sent_total"] > 0 and row["sent"] == row["sent_total"]
    # Each message reaches the n - 1 members besides its sender, every one of them.
    assert row["delivered_total"] == row["expected_total"] == (n - 1) * row["sent_total"]
    assert row["missing"] == 0
    assert 0 < row["deliveries"] <= row["delivered_total"]
    assert row["member_min_per_s"] > 0
    timed = row["sent_total"] if "rate" in row else row["delivered_total"]
    assert row["latency_samples"] == timed
    assert 0 <= row["p50_ms"] <= row["p99_ms"] <= row["max_ms"]
    assert row["server_rss_mib"] > 0 and row["server_cpu_pct"] >= 0


def test_native_fanout_sweeps_io_threads_and_every_message_arrives(native_binary: Path) -> None:
    rows = native_loadgen(
        "fanout", "-n", "5", "--senders", "2", "--duration", "1", "--io-threads", "1,2"
    )
    assert [(r["target"], r["io_threads"]) for r in rows] == [("securechat", 1), ("securechat", 2)]
    for row in rows:
        assert row["workload"] == "fanout" and row["window"] == 4 and row["size"] == 100
        assert row["server_cpus"] == "all" and row["server_pinned"] is False
        assert_every_message_reached_every_other_member(row, 5)


@needs_ngircd
def test_native_fanout_gives_ngircd_the_same_workload_and_a_ratio(native_binary: Path) -> None:
    irc, secure = native_loadgen(
        "fanout", "-n", "5", "--senders", "2", "--duration", "1", "--target", "both"
    )
    assert (irc["target"], secure["target"]) == ("ngircd", "securechat")
    for row in (secure, irc):
        assert_every_message_reached_every_other_member(row, 5)
    assert irc["io_threads"] is None and "vs_ngircd" not in irc
    expected = secure["deliveries_per_s"] / irc["deliveries_per_s"]
    assert secure["vs_ngircd"] == pytest.approx(expected)


def test_native_fanout_at_a_fixed_rate_offers_its_schedule_and_delivers_all(
    native_binary: Path,
) -> None:
    (row,) = native_loadgen(
        "fanout", "-n", "5", "--senders", "2", "--rate", "40", "--duration", "1"
    )
    # ceil(40 x 1) messages on the schedule, all sent while the window was open, none unsent.
    assert row["rate"] == 40 and row["window"] == 0
    assert row["offered"] == 40 and row["unsent"] == 0 and row["sent_total"] == 40
    assert_every_message_reached_every_other_member(row, 5)
    assert row["latency_samples"] == 40  # each message once, at its sender's witness
    assert row["offered_per_s"] > 0 and 0 <= row["achieved_per_s"] <= row["offered_per_s"]
    assert 0 <= row["send_late_p99_ms"] <= row["send_late_max_ms"]


def test_native_fanout_in_an_encrypted_room_relays_every_ciphertext(native_binary: Path) -> None:
    (row,) = native_loadgen("fanout", "-n", "5", "--senders", "2", "--duration", "1", "--encrypted")
    # A 100-byte text pads to a 256-byte record: its Megolm message is 468 base64 characters.
    assert row["encrypted"] is True and row["ciphertext_size"] == 468
    assert native.megolm_ciphertext_size(100) == 468
    assert_every_message_reached_every_other_member(row, 5)


def test_native_hold_keeps_every_client_logged_in(native_binary: Path) -> None:
    (row,) = native_loadgen("hold", "-n", "5", "--duration", "0.5")
    assert row["workload"] == "hold" and row["logged_in"] == 5 and row["held"] == 5
    assert row["login_failures"] == 0 and row["dropped"] == 0
    assert row["logins_per_s"] > 0 and row["server_rss_mib"] > 0


def run_native(binary: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(binary), *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_native_login_is_accepted_only_from_a_server_our_ca_signed(
    native_binary: Path, server: Server, certs_dir: Path, other_certs_dir: Path
) -> None:
    host, port = server.address
    common = ["--workload", "hold", "-n", "3", "--duration", "0.1", "--json"]
    common += ["--host", host, "--port", str(port)]
    # Our CA: the server checked each client's Ed25519 signature over its login transcript.
    good = run_native(native_binary, *common, "--ca", str(certs_dir / "ca.pem"))
    assert good.returncode == 0, good.stderr
    row = json.loads(good.stdout)
    assert row["logged_in"] == 3 and row["login_failures"] == 0 and row["held"] == 3
    # Another CA: every TLS handshake is refused, nobody logs in, and the reason says why.
    bad = run_native(native_binary, *common, "--ca", str(other_certs_dir / "ca.pem"))
    assert bad.returncode == 1
    row = json.loads(bad.stdout)
    assert row["logged_in"] == 0 and row["login_failures"] == 3
    assert row["login_failure"].startswith("tls: certificate verify failed")


def test_native_bad_arguments_are_refused_with_a_reason(native_binary: Path) -> None:
    out = run_native(native_binary, "--port", "1", "--ca", "ca.pem", "--size", "10")
    assert out.returncode == 2
    assert out.stderr == "loadgen: --size must be a number from 32 to 400, not 10\n"
    out = run_native(native_binary, "--port", "1", "--ca", "ca.pem", "--ciphertext-size", "468")
    assert out.returncode == 2
    assert out.stderr == (
        "loadgen: --ciphertext-size is for a securechat room of its own:"
        " #lobby is never encrypted\n"
    )
    out = run_native(
        native_binary, "--port", "1", "--ca", "ca.pem", "--room", "#e", "--ciphertext-size", "470"
    )
    assert out.returncode == 2
    assert (
        out.stderr
        == "loadgen: --ciphertext-size must be a multiple of 4 (padded base64), not 470\n"
    )
    out = run_native(
        native_binary, "--port", "1", "--ca", "ca.pem", "--rate", "10", "--window", "2"
    )
    assert out.returncode == 2
    assert out.stderr == "loadgen: --rate is fanout's, instead of --window: give one of them\n"
    out = run_module("scripts.loadgen.native", "fanout", "--io-threads", "1,0")
    assert out.returncode == 2
    assert "takes numbers from 1 to 64, comma-separated: '1,0'" in out.stderr


def test_the_attack_benchmark_runs_each_attack_beside_legitimate_users(
    native_binary: Path,
) -> None:
    rows = loadgen(
        "-n", "4", "--senders", "2", "--rate", "20", "--nonreaders", "3", "--duration", "1",
        module="scripts.loadgen.attack",
    )  # fmt: skip
    assert [row["attack"] for row in rows] == ["none", "nonreaders", "handshakes", "logins"]
    for row in rows:
        assert row["legit_logged_in"] == 4 and row["still_connected"] == 4, row
        assert row["server_up"] is True and row["fresh_login_after"] is True
        assert row["latency_samples"] > 0 and 0 < row["p50_ms"] <= row["p99_ms"]
        assert row["server_rss_peak_mib"] > 0 and row["server_cpu_pct"] >= 0
    nonreaders, handshakes, logins = rows[1:]
    assert nonreaders["nonreaders"] == 3 and nonreaders["flood_messages"] > 0
    assert 0 < handshakes["handshakes_done"] <= handshakes["handshakes_tried"]
    # Fresh names from the one flooding address: never more than --new-names (20 by default).
    assert 0 < logins["logins_done"] <= 20 < logins["logins_tried"]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="--pin needs two CPUs")
def test_the_attack_benchmark_pins_the_server_and_samples_it_when_asked(tmp_path: Path) -> None:
    spy = Path(sys.executable).with_name("py-spy")
    sample = ["--sample", str(tmp_path), "--sample-seconds", "1"] if spy.exists() else []
    rows = loadgen(
        "-n", "4", "--senders", "2", "--rate", "20", "--duration", "1", "--attack", "none",
        "--pin", *sample, module="scripts.loadgen.attack",
    )  # fmt: skip
    assert [(row["attack"], row["pinned"], row["server_up"]) for row in rows] == [
        ("none", True, True)
    ]
    if sample:  # collapsed stacks of the server's threads, its I/O loop among them
        assert "IOLoop.run" in (tmp_path / "none.txt").read_text()


def test_a_flooding_account_runs_on_a_descriptor_select_would_refuse(
    server: Server, certs_dir: Path
) -> None:
    # The non-readers' process holds over a thousand sockets, so its flooders' are past 1024.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1100:
        pytest.skip(f"the hard limit on open files is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1100), hard))
    fillers = [os.open(os.devnull, os.O_RDONLY) for _ in range(1030)]
    try:
        sock, _login = attack._log_in(server.address, str(certs_dir / "ca.pem"), "127.0.0.1")
        assert sock.fileno() >= 1024
        go, stop = threading.Event(), threading.Event()
        go.set()
        counts, closed = [0], [False]
        # Flat out, it reads between sends until the server drops it as a flooder.
        attack._flood(sock, 1e6, 0.0, go, stop, counts, closed, 0)  # type: ignore[arg-type]
        assert closed == [True] and counts[0] > 30
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_profile_wrapper_writes_one_profile_per_thread_when_it_ends(tmp_path: Path) -> None:
    class Busy(threading.Thread):
        def run(self) -> None:
            sorted(range(1000), reverse=True)

    Busy.run = profiled(Busy.run, str(tmp_path / "prof"))  # type: ignore[method-assign]
    thread = Busy(name="io-7")
    thread.start()
    thread.join(10)
    stats = pstats.Stats(str(tmp_path / "prof.io-7.prof")).stats  # type: ignore[attr-defined]
    assert any(name == "run" for _, _, name in stats)
    assert [p.name for p in tmp_path.iterdir()] == ["prof.io-7.prof"]
