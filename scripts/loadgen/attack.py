"""Attack benchmark: legitimate users chat at a fixed rate while one attack runs beside them.

    python -m scripts.loadgen.attack -n 500 --rate 100 --nonreaders 1000 --duration 20
    python -m scripts.loadgen.attack -n 100 --rate 100 --nonreaders 200 --duration 5
    python -m scripts.loadgen.attack -n 500 --nonreaders 1000 --duration 10 --attack nonreaders \
        --pin

Each workload (--attack, default all four) runs on a fresh server with its default limits. The
per-user rate limit (--rate, --burst) is the server's default: it binds every account wherever
it connects from, so an attack runs against it, and the legitimate senders stay under it. Only
the connection caps per address and in all are lifted, as in every benchmark (servers.py): the
two trusted addresses below stand for many people on many addresses.

  none        the legitimate users alone.
  nonreaders  K clients log in, join #flood and never read again; F more accounts (--flooders)
              each send the longest messages allowed into #flood at the server's default rate
              (--flood-rate) and read what they get, so the non-readers' queues grow until the
              output budget (--output-budget) sheds the biggest.
  handshakes  a TLS handshake flood from one address: two processes, each a loop of connect,
              handshake, close.
  logins      a login flood with fresh names from one address: the native load generator's
              `hold` run over and over, every client a new name and key.

Addresses: the legitimate users connect from 127.0.0.2 and the non-readers from 127.0.0.3; the
server trusts both (--trusted), standing in for many people on many addresses. The floods come
from 127.0.0.1, which it does not trust, so the connection throttle and the name cap apply.
The legitimate users are the Python load generator's fan-out at a fixed rate (its probes give
p50/p99); the server's CPU is measured over the timed window and its RSS sampled through it
(the peak is reported). With --pin, the server runs on the first CPU and everything else on the
last (as in native.py): steadier figures on a shared machine, but the attack then competes with
the legitimate users' load generator for its CPU. With --sample, py-spy (installed apart, with
the right to trace the server) samples the server's threads from the start of each attack; it
stops the server for each sample, so that run's latencies are not figures. BENCHMARKS.md has the
figures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import secrets
import select
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

from scripts.loadgen import native, peers, report, servers
from scripts.loadgen.__main__ import (
    Workers,
    client_specs,
    open_clients,
    parse_args,
    sync,
    timed_phase,
)
from securechat import framing, protocol

ATTACKS = ("none", "nonreaders", "handshakes", "logins")
LEGIT, NONREADERS, ATTACKER = "127.0.0.2", "127.0.0.3", "127.0.0.1"
FLOOD_ROOM = "#flood"
RSS_EVERY = 0.2  # seconds between two samples of the server's RSS
# The server's default per-user rate limit, which the attack workloads run against (settings.py).
DEFAULT_RATE = ["--rate", "10", "--burst", "30"]


# -- the attacks, each in a process of its own: setup, then `go`, then `stop`, then a result ------


def _tls(addr: tuple[str, int], ca: str, source: str, rcvbuf: int | None = None) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=ca)
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:  # before connecting, so the window stays small
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    raw.bind((source, 0))
    raw.settimeout(10)
    raw.connect(addr)
    return ctx.wrap_socket(raw, server_hostname="localhost")


def _log_in(
    addr: tuple[str, int], ca: str, source: str, rcvbuf: int | None = None
) -> tuple[ssl.SSLSocket, peers.Login]:
    """A blocking login with a fresh name and key: the load generator's own wire."""
    sock = _tls(addr, ca, source, rcvbuf)
    login = peers.Login("x" + secrets.token_hex(6), secrets.token_bytes(32))
    login.cert_sha256 = hashlib.sha256(sock.getpeercert(binary_form=True) or b"").digest()
    wire = peers.SecureChatWire()
    sock.sendall(wire.greeting(login))
    while not login.done:
        data = sock.recv(65536)
        if not data:
            raise peers.LoginFailed("closed during login")
        reply = wire.feed(login, data)
        if reply:
            sock.sendall(reply)
    return sock, login


def _frame(obj: dict[str, Any]) -> bytes:
    return framing.encode(obj)


# #flood is a plain room (the flood is room text the server relays). Every account asks to make it
# plain, then joins it: whichever request the server takes first makes it, and the others' are
# refused (room_exists) before their plain join, so nobody needs to read a reply.
_JOIN_FLOOD_ROOM = _frame(
    {"type": "join", "id": 0, "room": FLOOD_ROOM, "create": True, "plain": True}
) + _frame({"type": "join", "id": 1, "room": FLOOD_ROOM})


def nonreaders(addr: tuple[str, int], ca: str, k: int, flooders: int, rate: float,
               ready: Event, go: Event, stop: Event, out: Any) -> None:  # fmt: skip
    socks = []
    for _ in range(k):
        sock, _login = _log_in(addr, ca, NONREADERS, rcvbuf=4096)
        sock.sendall(_JOIN_FLOOD_ROOM)
        socks.append(sock)  # ...and never read again
    counts, closed = [0] * flooders, [False] * flooders
    threads = []
    for j in range(flooders):
        sock, _login = _log_in(addr, ca, NONREADERS)
        sock.sendall(_JOIN_FLOOD_ROOM)
        args = (sock, rate, j / flooders, go, stop, counts, closed, j)
        threads.append(threading.Thread(target=_flood, args=args, daemon=True))
    for t in threads:
        t.start()
    ready.set()
    go.wait()
    stop.wait()
    for t in threads:
        t.join(5)
    shed = sum(_closed_by_server(s) for s in socks)
    out.put({"nonreaders": k, "flooders": flooders, "flood_rate": rate,
             "flood_messages": sum(counts), "nonreaders_closed": shed,
             "flooders_closed": sum(closed)})  # fmt: skip


def _flood(sock: ssl.SSLSocket, rate: float, phase: float, go: Event, stop: Event,
           counts: list[int], closed: list[bool], j: int) -> None:  # fmt: skip
    """One flooding account: the longest message at `rate` a second, and read (and discard)
    what comes in between. Its one thread both reads and writes the socket: an SSL socket must
    not be used from two threads at once."""
    text, i = "f" * protocol.TEXT_MAX, 2
    # poll, not select: this process holds over a thousand sockets, and select() refuses a file
    # descriptor of 1024 or more.
    readable = select.poll()
    readable.register(sock, select.POLLIN)
    go.wait()
    due = time.monotonic() + phase / rate
    while not stop.is_set():
        try:
            if time.monotonic() >= due:
                sock.sendall(_frame({"type": "say", "id": i, "room": FLOOD_ROOM, "text": text}))
                counts[j], i, due = counts[j] + 1, i + 1, due + 1 / rate
            wait = due - time.monotonic()
            if wait <= 0 and not (sock.pending() or readable.poll(0)):
                continue  # flat out (a rate above what the account can send): nothing to read
            sock.settimeout(min(max(wait, 0.001), 0.5))
            if not sock.recv(1 << 20):
                break
        except TimeoutError:
            continue
        except OSError:
            break
    else:
        sock.close()
        return
    closed[j] = True  # by the server: an account over the rate is dropped as a flooder
    sock.close()


def _closed_by_server(sock: ssl.SSLSocket) -> bool:
    """Read what waits (without keeping it) until the end of the stream or of what is there."""
    sock.setblocking(False)
    try:
        while sock.recv(1 << 20):
            pass
        return True
    except (ssl.SSLWantReadError, BlockingIOError):
        return False
    except OSError:
        return True
    finally:
        sock.close()


def handshakes(addr: tuple[str, int], ca: str, ready: Event, go: Event, stop: Event,
               out: Any) -> None:  # fmt: skip
    ready.set()
    go.wait()
    tried = done = 0
    while not stop.is_set():
        tried += 1
        try:
            _tls(addr, ca, ATTACKER).close()
            done += 1
        except OSError:
            pass
    out.put({"handshakes_tried": tried, "handshakes_done": done})


def logins(addr: tuple[str, int], ca: str, ready: Event, go: Event, stop: Event,
           out: Any) -> None:  # fmt: skip
    binary = native.build()
    ready.set()
    go.wait()
    tried = ok = runs = 0
    reasons: dict[str, int] = {}
    while not stop.is_set():
        cmd = [str(binary), "--json", "--workload", "hold", "--host", addr[0],
               "--port", str(addr[1]), "--ca", ca, "-n", "500", "--concurrency", "64",
               "--duration", "0.01", "--login-timeout", "5"]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        runs += 1
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if not lines:
            reason = (done.stderr.strip().splitlines() or ["no output"])[-1][:80]
            reasons[reason] = reasons.get(reason, 0) + 500
            tried += 500
            continue
        row = json.loads(lines[-1])
        tried += row.get("logged_in", 0) + row.get("login_failures", 0)
        ok += row.get("logged_in", 0)
        if row.get("login_failure"):
            reason = row["login_failure"]
            reasons[reason] = reasons.get(reason, 0) + row.get("login_failures", 0)
    out.put({"logins_tried": tried, "logins_done": ok, "login_runs": runs,
             "login_refusals": reasons})  # fmt: skip


ATTACK_FUNCTIONS = {"handshakes": handshakes, "logins": logins}


# -- one workload on a fresh server ---------------------------------------------------------------


class RssPeak(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.done = pid, 0, threading.Event()

    def run(self) -> None:
        while not self.done.wait(RSS_EVERY):
            try:
                self.peak = max(self.peak, servers.rss_kib(self.pid))
            except OSError:
                return


def start_server(args: argparse.Namespace, attack: str) -> tuple[servers.Target, list[int] | None]:
    """A fresh server for one workload, and the CPUs for its load (None: not pinned)."""
    folder = Path(tempfile.mkdtemp(prefix="loadgen-attack-"))
    extra = ["--trusted", f"{LEGIT},{NONREADERS}", *DEFAULT_RATE, *args.server_arg]
    profile = ""
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
        profile = str(args.profile / attack)  # one .prof per server thread (profile.py)
    server_cpus, load_cpu = native.cpu_plan(args.pin) if args.pin else (None, None)
    target = servers.start_securechat(folder, server_cpus, extra, profile)
    return target, ([load_cpu] if load_cpu is not None else None)


def sample(args: argparse.Namespace, attack: str, pid: int) -> subprocess.Popen[bytes] | None:
    """With --sample, py-spy records the server's threads (native frames too) for the first
    --sample-seconds of the attack, as collapsed stacks, one file per workload."""
    if args.sample is None:
        return None
    args.sample.mkdir(parents=True, exist_ok=True)
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    cmd = [spy, "record", "--pid", str(pid), "--native", "--threads", "--idle", "--rate", "100",
           "--duration", str(args.sample_seconds), "--format", "raw",
           "-o", str(args.sample / f"{attack}.txt")]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run_workload(args: argparse.Namespace, attack: str) -> dict[str, Any]:
    target, load_cpus = start_server(args, attack)
    target.sources = (LEGIT,)
    assert target.pid is not None
    legit = parse_args(["fanout", "-n", str(args.n), "--senders", str(args.senders),
                        "--rate", str(args.rate), "--duration", str(args.duration)])  # fmt: skip
    row: dict[str, Any] = {"attack": attack, "n": args.n, "rate": args.rate, "pinned": args.pin}
    ctx = multiprocessing.get_context("fork")
    ready, go, stop, out = ctx.Event(), ctx.Event(), ctx.Event(), ctx.Queue()
    ws = None
    try:
        row["rss_idle_mib"] = servers.rss_kib(target.pid) / 1024
        ws = Workers(legit.workers, target, "fanout", load_cpus, paced=True)
        logged = open_clients(ws, client_specs(legit), 256)
        row["legit_logged_in"] = logged["logged_in"]
        sync(ws)
        addr, ca = (target.host, target.port), str(target.ca)
        procs = attack_processes(ctx, attack, args, (addr, ca), (ready, go, stop, out))
        for p in procs:
            p.start()
            if load_cpus:  # the native load generator (logins) inherits it
                os.sched_setaffinity(p.pid, load_cpus)
        if procs and not ready.wait(600):
            raise RuntimeError(f"{attack}: the attack did not get ready in 600 s")
        rss = RssPeak(target.pid)
        rss.start()
        spy = sample(args, attack, target.pid)
        go.set()
        row.update(timed_phase(ws, target, legit))
        stop.set()
        rss.done.set()
        rss.join()
        if spy is not None:
            spy.wait(60)
        row["server_rss_peak_mib"] = rss.peak / 1024
        for p in procs:
            got = out.get(timeout=120)
            for key, value in got.items():
                row[key] = row[key] + value if isinstance(value, int) and key in row else value
            p.join(30)
        row["attack_result"] = summary(row)
        row["server_up"] = target.process is not None and target.process.poll() is None
        if row["server_up"]:
            _log_in((target.host, target.port), str(target.ca), LEGIT)[0].close()
            row["fresh_login_after"] = True
    finally:
        stop.set()
        go.set()
        if ws is not None:
            ws.close()
        target.stop()
    return row


def attack_processes(
    ctx: Any, attack: str, args: argparse.Namespace, where: tuple[Any, str], sync: tuple[Any, ...]
) -> list[Any]:
    """The processes that make `attack` (none for "none"), not started yet."""
    addr, ca = where
    if attack == "none":
        return []
    if attack == "nonreaders":
        flood = (args.nonreaders, args.flooders, args.flood_rate)
        return [ctx.Process(target=nonreaders, args=(addr, ca, *flood, *sync))]
    procs = [ctx.Process(target=ATTACK_FUNCTIONS[attack], args=(addr, ca, *sync))]
    if attack == "handshakes":  # two flooding processes, as much as a 2-core box allows
        procs.append(ctx.Process(target=handshakes, args=(addr, ca, *sync)))
    return procs


def summary(row: dict[str, Any]) -> str:
    """What the attack got, in a few words, for the table."""
    if "nonreaders" in row:
        return (f"{row['nonreaders_closed']} of {row['nonreaders']} non-readers dropped; "
                f"{row['flood_messages']:,} flood messages from {row['flooders']} accounts "
                f"({row['flooders_closed']} dropped)")  # fmt: skip
    if "handshakes_tried" in row:
        return (f"{row['handshakes_done']:,} of {row['handshakes_tried']:,} handshakes "
                "completed")  # fmt: skip
    if "logins_tried" in row:
        refusals = ", ".join(f"{why}: {k:,}" for why, k in row["login_refusals"].items())
        return f"{row['logins_done']:,} of {row['logins_tried']:,} logins ({refusals})"
    return ""


COLUMNS: list[report.Column] = [
    ("attack", "attack", "{}"),
    ("n", "legit N", "{:,}"),
    ("legit_logged_in", "legit in", "{:,}"),
    ("still_connected", "legit still in", "{:,}"),
    ("p50_ms", "legit p50 ms", "{:.1f}"),
    ("p99_ms", "legit p99 ms", "{:.1f}"),
    ("server_cpu_pct", "server CPU%", "{:.0f}"),
    ("rss_idle_mib", "RSS before MiB", "{:.0f}"),
    ("server_rss_peak_mib", "RSS peak MiB", "{:.0f}"),
    ("server_up", "server up", "{}"),
    ("attack_result", "what the attack got", "{}"),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.loadgen.attack", description=__doc__)
    p.add_argument("-n", type=int, default=500, help="legitimate users in #lobby")
    p.add_argument(
        "--senders", type=int, default=20, help="legitimate users who send (each under --rate)"
    )
    p.add_argument("--rate", type=float, default=100, help="legitimate messages/s in all")
    p.add_argument("--nonreaders", type=int, default=1000, help="nonreaders: clients")
    p.add_argument("--flooders", type=int, default=10, help="nonreaders: flooding accounts")
    p.add_argument(
        "--flood-rate", type=float, default=10, help="nonreaders: messages/s per flooding account"
    )
    p.add_argument("--duration", type=float, default=20, help="seconds measured")
    p.add_argument(
        "--attack", default=",".join(ATTACKS), help="comma-separated: " + ", ".join(ATTACKS)
    )
    p.add_argument("--server-arg", action="append", default=[], help="extra securechat flag")
    p.add_argument(
        "--pin",
        action="store_true",
        help="the server on the first CPU, the legitimate users and the attack on the last",
    )
    p.add_argument("--json", dest="json_only", action="store_true", help="JSON lines only")
    p.add_argument(
        "--profile", type=Path, help="a folder: run the server's threads under cProfile there"
    )
    p.add_argument(
        "--sample",
        type=Path,
        help="a folder: py-spy samples the server from the start of each attack, into <attack>.txt",
    )
    p.add_argument(
        "--sample-seconds", type=int, default=4, help="how long --sample records (seconds)"
    )
    args = p.parse_args(argv)
    attacks = [a.strip() for a in args.attack.split(",") if a.strip()]
    unknown = sorted(set(attacks) - set(ATTACKS))
    if unknown:
        p.error(f"unknown --attack {', '.join(unknown)}; choose from {', '.join(ATTACKS)}")
    rows = []
    for attack in attacks:
        try:
            row = run_workload(args, attack)
        except (RuntimeError, native.NativeError, peers.LoginFailed, OSError) as exc:
            print(f"{attack}: run failed: {exc}", file=sys.stderr)
            return 1
        print(json.dumps(row), flush=True)
        rows.append(row)
    if not args.json_only:
        print(report.table(rows, COLUMNS))
        print(f"(2 load-generator processes for the legitimate users; {os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
