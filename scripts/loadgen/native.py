"""The native load generator: build it, run it against fresh servers, sweep --io-threads.

    python -m scripts.loadgen.native fanout -n 50 --target both --pin
    python -m scripts.loadgen.native fanout -n 50 --target both --pin --encrypted
    python -m scripts.loadgen.native fanout -n 1000 --rate 100 --duration 20 --target both --pin
    python -m scripts.loadgen.native fanout -n 500 --io-threads 1,2,4 --pin --no-pin
    python -m scripts.loadgen.native hold -n 10000 --target both --pin
    python -m scripts.loadgen.native build                    # print the binary's path

scripts/loadgen/native/loadgen.c is one thread of C (epoll, non-blocking OpenSSL) that gives
securechat and ngircd the same window and the same writes; a Python load generator takes a core
of its own and under-drives a fast C server. This driver compiles it with the system compiler
(cc -O2, OpenSSL's headers: Debian's libssl-dev), starts a fresh server for every run (the
configurations in servers.py), pins the load generator to the last CPU and, with --pin, the
server to the first, and prints one JSON line per run and one table of the whole sweep.

With --encrypted, securechat's members share an end-to-end encrypted room and every message is
the ciphertext a real Megolm message of that text has (its length computed here, with
vodozemac); ngircd, which has no such thing, carries the same text in plain, as before.

With --rate R, fan-out is open loop instead of a window: R messages a second in all, due evenly
spaced with the senders taking turns, each sent when due whatever is still in flight, and timed
from its due time (a message held back by the load generator or a full socket counts its wait)
to its sender's witness reading it; the other members are read in sweeps every 50 ms, as the
Python load generator's non-probe members are, so the figure is the server's, not our queue's.
securechat's per-user rate limit is lifted for every benchmark run (servers.py), so 10 a second a
sender is never refused.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from scripts.loadgen import peers, report, servers

SOURCE = Path(__file__).with_name("native") / "loadgen.c"
CFLAGS = ["-O2", "-Wall", "-Wextra", "-std=gnu11"]
LIBS = ["-lssl", "-lcrypto"]
RUN_TIMEOUT = 900.0  # seconds for logins and sync on top of the measured time, before giving up
ENCRYPTED_ROOM = "#e2e-bench"


class NativeError(Exception):
    """The native load generator could not be built or a run of it failed; the text says why."""


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc")


def missing_prerequisite() -> str | None:
    """Why the native load generator cannot be built here, or None when it can."""
    cc = compiler()
    if cc is None:
        return "no C compiler: cc not found (Debian: apt-get install gcc)"
    probe = subprocess.run(
        [cc, "-E", "-x", "c", "-"],
        input="#include <openssl/ssl.h>\n#include <openssl/evp.h>\n",
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        return "OpenSSL's headers are missing (Debian: apt-get install libssl-dev)"
    return None


def build(out_dir: Path | None = None) -> Path:
    """The compiled load generator, built once per version of its source and flags."""
    why = missing_prerequisite()
    if why is not None:
        raise NativeError(why)
    cc = compiler()
    assert cc is not None
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([cc, *CFLAGS, *LIBS]).encode())
    out_dir = out_dir or Path(tempfile.gettempdir()) / f"securechat-loadgen-{os.getuid()}"
    binary = out_dir / f"loadgen-{key.hexdigest()[:16]}"
    if binary.exists():
        return binary
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = out_dir / f"{binary.name}.{os.getpid()}.partial"
    made = subprocess.run(
        [cc, *CFLAGS, "-o", str(partial), str(SOURCE), *LIBS],
        capture_output=True,
        text=True,
        check=False,
    )
    if made.returncode != 0:
        partial.unlink(missing_ok=True)
        raise NativeError(f"building {SOURCE.name} failed:\n{made.stderr.strip()}")
    os.replace(partial, binary)  # atomic: two builds at once both end with a whole binary
    return binary


def megolm_ciphertext_size(text_size: int) -> int:
    """The base64 length of the Megolm message a room message of `text_size` bytes becomes: the
    padded inner record, encrypted and signed by a real vodozemac session."""
    import vodozemac

    from securechat.megolm import record

    inner = record.RoomRecord(
        room=ENCRYPTED_ROOM,
        sender="u00000",
        device="LOADGENDEVICEAAA",
        message_id="m" * 22,
        ts=1_790_000_000_000,
        body="x" * text_size,
    )
    message = vodozemac.GroupSession().encrypt(record.encode(inner))
    return len(base64.b64encode(message.to_bytes()))


def cpu_plan(pin_server: bool) -> tuple[list[int] | None, int | None]:
    """(the server's CPUs, the load generator's CPU): the load generator on the last CPU when
    there are two or more, the server on the first one when pinned, else free on all."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        if pin_server:
            raise NativeError("--pin needs at least 2 CPUs: one for the server, one for us")
        return None, None
    return ([cpus[0]] if pin_server else None), cpus[-1]


def command(
    binary: Path, args: argparse.Namespace, target: servers.Target, loadgen_cpu: int | None
) -> list[str]:
    wire = peers.wire_for(target.kind, args.workload)
    cmd = [
        str(binary), "--json", "--label", target.kind, "--workload", args.workload,
        "--proto", "irc" if target.kind == "ngircd" else "securechat",
        "--host", target.host, "--port", str(target.port), "--ca", str(target.ca),
        "-n", str(args.n), "--duration", str(args.duration),
        "--concurrency", str(args.concurrency or wire.login_concurrency),
    ]  # fmt: skip
    if args.workload == "fanout":
        cmd += ["--senders", str(args.senders)]
        cmd += ["--rate", str(args.rate)] if args.rate else ["--window", str(args.window)]
        cmd += ["--size", str(args.size), "--grace", str(args.grace)]
    if target.pid:
        cmd += ["--server-pid", str(target.pid)]
    if loadgen_cpu is not None:
        cmd += ["--cpu", str(loadgen_cpu)]
    if args.delayed_ack:
        cmd.append("--delayed-ack")
    if args.encrypted and target.kind == "securechat" and args.workload == "fanout":
        cmd += [
            "--room",
            ENCRYPTED_ROOM,
            "--ciphertext-size",
            str(megolm_ciphertext_size(args.size)),
        ]
    return cmd


def run_once(
    binary: Path, args: argparse.Namespace, kind: str, io_threads: int | None, pinned: bool
) -> dict[str, Any]:
    """One run on a fresh server; the C program's JSON line, with how the server ran."""
    server_cpus, loadgen_cpu = cpu_plan(pinned)
    folder = Path(tempfile.mkdtemp(prefix=f"loadgen-{kind}-"))
    if kind == "ngircd":
        target = servers.start_ngircd(folder, server_cpus)
    else:
        extra = list(args.server_arg)
        if io_threads is not None:
            extra += ["--io-threads", str(io_threads)]
        profile = ""
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
            profile = str(args.profile / f"n{args.n}-io{io_threads or 'default'}-{pinned:d}")
        target = servers.start_securechat(folder, server_cpus, extra, profile)
    try:
        cmd = command(binary, args, target, loadgen_cpu)
        limit = args.duration + args.grace + RUN_TIMEOUT
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, check=False)
        except subprocess.TimeoutExpired:
            raise NativeError(f"{kind}: no result within {limit:g} s") from None
        if done.returncode != 0 or not done.stdout.strip():
            why = done.stderr.strip() or f"exit status {done.returncode}"
            raise NativeError(f"{kind}: {why}; output: {done.stdout.strip()[:300]}")
        row: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    finally:
        target.stop()
    row["io_threads"] = io_threads if kind == "securechat" else None
    row["server_pinned"] = pinned
    row["server_cpus"] = ",".join(map(str, server_cpus)) if server_cpus else "all"
    row["server_args"] = list(args.server_arg) if kind == "securechat" else []
    return row


def sweep(binary: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (pinning, I/O threads) for securechat, after ngircd once per pinning, so that each
    securechat row carries its ratio to ngircd (`vs_ngircd`, same pinning) when printed. Rows are
    printed as they finish: a long sweep shows progress and keeps what it measured."""
    kinds = ["ngircd", "securechat"] if args.target == "both" else [args.target]
    rows = []
    for pinned in args.pin_modes:
        peer: dict[str, Any] | None = None
        for kind in kinds:
            for io_threads in args.io_threads if kind == "securechat" else [None]:
                row = run_once(binary, args, kind, io_threads, pinned)
                if kind == "ngircd":
                    peer = row
                elif peer is not None:
                    add_ratio(row, peer)
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def add_ratio(row: dict[str, Any], peer: dict[str, Any]) -> None:
    if "rate" in row:
        return  # both carry the rate offered: a throughput ratio would say nothing
    key = "deliveries_per_s" if row["workload"] == "fanout" else "logins_per_s"
    if peer.get(key):
        row["vs_ngircd"] = row[key] / peer[key]


COLUMNS: list[report.Column] = [
    ("target", "server", "{}"),
    ("io_threads", "I/O threads", "{}"),
    ("server_cpus", "server CPUs", "{}"),
    ("n", "N", "{:,}"),
    ("ciphertext_size", "ciphertext B", "{}"),
    ("logins_per_s", "logins/s", "{:,.0f}"),
    ("held", "held", "{:,}"),
    ("rss_per_conn_kib", "RSS/conn KiB", "{:.1f}"),
    ("deliveries_per_s", "deliveries/s", "{:,.0f}"),
    ("vs_ngircd", "vs ngircd", "{:.2f}x"),
    ("p50_ms", "p50 ms", "{:.2f}"),
    ("p99_ms", "p99 ms", "{:.2f}"),
    ("max_ms", "max ms", "{:.2f}"),
    ("offered_per_s", "offered/s", "{:,.1f}"),
    ("achieved_per_s", "achieved/s", "{:,.1f}"),
    ("send_late_p99_ms", "sent late p99 ms", "{:.2f}"),
    ("server_cpu_pct", "server CPU%", "{:.0f}"),
    ("server_rss_mib", "server RSS MiB", "{:.1f}"),
    ("loadgen_cpu_pct", "loadgen CPU%", "{:.0f}"),
    ("missing", "missing", "{:,}"),
    ("dropped", "dropped", "{:,}"),
]


def io_thread_list(text: str) -> list[int | None]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if not values or not all(1 <= v <= 64 for v in values):
        raise argparse.ArgumentTypeError(f"takes numbers from 1 to 64, comma-separated: {text!r}")
    return list(values)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    about = __doc__.split("\n")[0]
    p = argparse.ArgumentParser(prog="python -m scripts.loadgen.native", description=about)
    p.add_argument("workload", choices=["fanout", "hold", "build"])
    p.add_argument("-n", type=int, default=50, help="room members (fanout) or clients (hold)")
    p.add_argument("--senders", type=int, default=10, help="fanout: members who send")
    p.add_argument("--window", type=int, default=4, help="fanout: messages in flight a sender")
    p.add_argument(
        "--rate",
        type=float,
        default=0,
        help="fanout, open loop instead of --window: messages/s offered in all, evenly spaced, "
        "each timed from its due time (queueing not hidden)",
    )
    p.add_argument("--size", type=int, default=100, help="fanout: message text, bytes")
    p.add_argument("--duration", type=float, default=10, help="seconds measured (hold: held)")
    p.add_argument("--grace", type=float, default=5, help="fanout: seconds for the last messages")
    p.add_argument("--concurrency", type=int, default=0, help="logins in flight (256; ngircd 40)")
    p.add_argument("--target", choices=["securechat", "ngircd", "both"], default="securechat")
    p.add_argument(
        "--io-threads",
        type=io_thread_list,
        default=[None],
        help="securechat --io-threads values to sweep, e.g. 1,2,4 (default: its own default)",
    )
    p.add_argument(
        "--pin",
        dest="pin_modes",
        action="append_const",
        const=True,
        help="the server on the first CPU (the load generator is always on the last)",
    )
    p.add_argument(
        "--no-pin",
        dest="pin_modes",
        action="append_const",
        const=False,
        help="the server free on all CPUs; give both --pin and --no-pin to sweep both",
    )
    p.add_argument("--server-arg", action="append", default=[], help="extra securechat flag")
    p.add_argument(
        "--delayed-ack",
        action="store_true",
        help="keep the kernel's delayed ACKs (default: ACK each read at once, see BENCHMARKS.md)",
    )
    p.add_argument(
        "--profile",
        type=Path,
        help="folder: run securechat's threads under cProfile and keep one .prof per thread "
        "(about twice as slow: for where the time goes, not for figures)",
    )
    p.add_argument(
        "--encrypted",
        action="store_true",
        help="fanout: securechat in an end-to-end encrypted room, each message a Megolm-sized "
        "ciphertext (ngircd carries the text in plain)",
    )
    p.add_argument("--json", dest="json_only", action="store_true", help="JSON lines only")
    args = p.parse_args(argv)
    if args.duration <= 0 or args.duration > 600:
        p.error("--duration must be within (0, 600] seconds")
    if args.workload == "fanout" and args.n < 2:
        p.error("fanout needs at least 2 members (-n)")
    if args.workload == "fanout" and not 1 <= args.senders <= args.n:
        p.error(f"--senders must be from 1 to -n ({args.n})")
    if args.rate and (args.workload != "fanout" or not 0.01 <= args.rate <= 10_000_000):
        p.error("--rate is fanout's, from 0.01 to 10,000,000 messages/s")
    if args.target == "ngircd" and args.io_threads != [None]:
        p.error("--io-threads is securechat's: use --target securechat or both")
    args.pin_modes = list(dict.fromkeys(args.pin_modes or [False]))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        binary = build()
        if args.workload == "build":
            print(binary)
            return 0
        rows = sweep(binary, args)
    except (NativeError, RuntimeError) as exc:
        print(f"native load generator: {exc}", file=sys.stderr)
        return 1
    if not args.json_only:
        print(report.table(rows, COLUMNS))
        print(f"(native load generator, one thread; {os.cpu_count()} CPUs here)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
