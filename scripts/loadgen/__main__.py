"""Load generator: real TLS clients with real identity keys against securechat (and ngircd).

    python -m scripts.loadgen hold -n 10000                     # logins/s, RSS per connection
    python -m scripts.loadgen fanout -n 500 --senders 10        # deliveries/s, latency
    python -m scripts.loadgen fanout -n 1000 --senders 10 --rate 100
    python -m scripts.loadgen dm --pairs 50                     # Olm DMs/s, latency
    python -m scripts.loadgen fanout -n 500 --target both       # securechat, then ngircd

Each run starts a fresh server on 127.0.0.1 (or uses --connect), drives it from a few worker
processes (scripts/loadgen/worker.py), and prints a table and one JSON line. Every run is bounded:
clients, duration and each phase's wait all have limits. BENCHMARKS.md has the figures.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import secrets
import sys
import tempfile
import time
from multiprocessing.connection import Connection as Pipe
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from scripts.loadgen import peers, report, servers, worker
from scripts.loadgen.servers import Target

PHASE_TIMEOUT = 600.0  # seconds any one phase (logins, sync) may take before the run gives up
GRACE = 2.0  # seconds after the timed phase for messages still in flight


class RunFailed(Exception):
    pass


class Workers:
    """The worker processes and their pipes."""

    def __init__(
        self, count: int, target: Target, workload: str, cpus: list[int] | None, paced: bool
    ) -> None:
        self.paced = paced  # a fixed rate: senders and probes get a worker of their own
        ctx = multiprocessing.get_context("fork")
        self.pipes: list[Pipe] = []
        self.procs = []
        for i in range(count):
            ours, theirs = ctx.Pipe()
            spec = {**target.as_json(), "workload": workload}
            proc = ctx.Process(target=worker.main, args=(theirs, i, spec, cpus), daemon=True)
            proc.start()
            theirs.close()
            self.pipes.append(ours)
            self.procs.append(proc)

    def send(self, pipe: Pipe, **msg: Any) -> None:
        pipe.send_bytes(json.dumps(msg).encode())

    def broadcast(self, **msg: Any) -> None:
        for pipe in self.pipes:
            self.send(pipe, **msg)

    def gather(self, ev: str, timeout: float = PHASE_TIMEOUT) -> list[dict[str, Any]]:
        """One `ev` event from every worker, in worker order."""
        got: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout
        while len(got) < len(self.pipes):
            left = deadline - time.monotonic()
            if left <= 0:
                raise RunFailed(f"workers did not report {ev!r} within {timeout:g} s")
            for pipe in wait([p for i, p in enumerate(self.pipes) if i not in got], left):
                assert isinstance(pipe, Pipe)
                try:
                    event = json.loads(pipe.recv_bytes())
                except EOFError:
                    raise RunFailed("a worker process died") from None
                if event["ev"] == ev:
                    got[self.pipes.index(pipe)] = event
        return [got[i] for i in range(len(self.pipes))]

    def close(self) -> None:
        for pipe in self.pipes:
            try:
                self.send(pipe, cmd="quit")
            except OSError:
                pass
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()


def percentile(sorted_values: list[int], q: float) -> float:
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, int(q * len(sorted_values)))
    return sorted_values[i] / 1e6  # ms


def client_specs(args: argparse.Namespace) -> list[dict[str, Any]]:
    prefix = "b" + secrets.token_hex(2)  # unique names when reusing a server (--connect)
    n = 2 * args.pairs if args.workload == "dm" else args.n
    specs = [{"name": f"{prefix}{i}", "seed": secrets.token_hex(32)} for i in range(n)]
    if args.workload == "fanout":
        senders = min(args.senders, n)
        for k, spec in enumerate(specs[:senders]):
            spec["sender"] = True
            spec["phase"] = k / senders  # where in each sending interval it sends
        receivers = specs[senders:]
        for spec in receivers[: args.probes]:
            spec["probe"] = True
    elif args.workload == "dm":
        pickle_key = secrets.token_bytes(32)  # the run's: the pickles only cross our own pipes
        for a, b in zip(specs[::2], specs[1::2], strict=True):
            a["olm"], b["olm"] = peers.olm_pair(pickle_key)
            a["partner"], b["partner"] = b["name"], a["name"]
            a["pickle_key"] = b["pickle_key"] = pickle_key.hex()
            a["sender"] = b["sender"] = True
            a["phase"], b["phase"] = len(a["name"]) % 7 / 7, 0.5
    return specs


def open_clients(ws: Workers, specs: list[dict[str, Any]], concurrency: int) -> dict[str, Any]:
    """Log every client in, spread over the workers; return login figures.

    With a fixed rate and more than one worker, the first worker gets the senders and the probes
    alone, so that no sweep over hundreds of idle members stands between a probe and its read:
    the latency measured is the server's, not the load generator's queue.
    """
    parts: list[list[dict[str, Any]]] = [[] for _ in ws.pipes]
    timed = [s for s in specs if s.get("sender") or s.get("probe")]
    if len(parts) > 1 and timed and len(timed) < len(specs) and ws.paced:
        parts[0] = timed
        rest = [s for s in specs if not (s.get("sender") or s.get("probe"))]
        for i, spec in enumerate(rest):
            parts[1 + i % (len(parts) - 1)].append(spec)
    else:
        for i, spec in enumerate(specs):
            parts[i % len(parts)].append(spec)
    start = time.monotonic()
    for pipe, part in zip(ws.pipes, parts, strict=True):
        ws.send(pipe, cmd="open", clients=part, concurrency=max(1, concurrency // len(ws.pipes)))
    opened = ws.gather("opened")
    ready = sum(o["ready"] for o in opened)
    last = max((o["last"] for o in opened if o["ready"]), default=start)
    failed: dict[str, int] = {}
    for o in opened:
        for why, k in o["failed"].items():
            failed[why] = failed.get(why, 0) + k
    seconds = max(1e-9, last - start)
    return {"logged_in": ready, "login_seconds": seconds, "logins_per_s": ready / seconds,
            "login_failures": failed,
            "login_loadgen_cpu_pct": 100 * sum(o["cpu"] for o in opened) / seconds}  # fmt: skip


def sync(ws: Workers) -> None:
    """Wait until every member has read everything queued before now (the join notices)."""
    ws.broadcast(cmd="stats")
    alive = ws.gather("stats")
    first = next(i for i, s in enumerate(alive) if s["alive"])
    token = "sync" + secrets.token_hex(8)
    ws.broadcast(cmd="sync", token=token)
    ws.gather("armed")
    ws.send(ws.pipes[first], cmd="sync_send", token=token)
    ws.gather("synced")


def timed_phase(ws: Workers, target: Target, args: argparse.Namespace) -> dict[str, Any]:
    senders = args.senders if args.workload == "fanout" else 2 * args.pairs
    rate_per_sender = args.rate / senders if args.rate else 0
    start_at = time.monotonic() + 0.5
    stop_at = start_at + args.duration
    ws.broadcast(
        cmd="run",
        start_at=start_at,
        stop_at=stop_at,
        grace=GRACE,
        rate_per_sender=rate_per_sender,
        window=0 if args.rate else args.window,
        batch=args.batch if args.workload == "fanout" else 1,
        size=args.size,
        lazy=args.lazy_ms / 1000 if args.rate else 0,
    )
    server_cpu = None
    if target.pid:
        time.sleep(max(0.0, start_at - time.monotonic()))  # a script's timing, not a test's wait
        cpu0 = servers.cpu_seconds(target.pid)
        time.sleep(max(0.0, stop_at - time.monotonic()))
        server_cpu = servers.cpu_seconds(target.pid) - cpu0
    results = ws.gather("result", args.duration + GRACE + PHASE_TIMEOUT)
    latencies = sorted(lat for r in results for lat in r["latencies"])
    deliveries = sum(r["deliveries"] for r in results)
    closed: dict[str, int] = {}
    for r in results:
        for why, k in r["closed"].items():
            closed[why] = closed.get(why, 0) + k
    figures = {
        "sent": sum(r["sent"] for r in results),
        "refused": sum(r["refused"] for r in results),
        "latency_samples": len(latencies),
        "p50_ms": percentile(latencies, 0.50),
        "p99_ms": percentile(latencies, 0.99),
        "max_ms": latencies[-1] / 1e6 if latencies else float("nan"),
        "loadgen_cpu_pct": 100 * sum(r["cpu"] for r in results) / args.duration,
        "still_connected": sum(r["alive"] for r in results),
        "dropped": closed,
    }
    rate_key = "dms_per_s" if args.workload == "dm" else "deliveries_per_s"
    figures[rate_key] = deliveries / args.duration
    if server_cpu is not None:
        figures["server_cpu_pct"] = 100 * server_cpu / args.duration
    return figures


def start_target(args: argparse.Namespace, kind: str) -> Target:
    cpus = [0] if args.pin else None
    if args.connect:
        host, _, port = args.connect.rpartition(":")
        return Target(kind, host, int(port), Path(args.ca), args.server_pid)
    folder = Path(tempfile.mkdtemp(prefix=f"loadgen-{kind}-"))
    if kind == "ngircd":
        return servers.start_ngircd(folder, cpus)
    return servers.start_securechat(folder, cpus, args.server_arg)


def run_once(args: argparse.Namespace, kind: str) -> dict[str, Any]:
    target = start_target(args, kind)
    out: dict[str, Any] = {"target": kind, "workload": args.workload}
    out.update({k: getattr(args, k) for k in ("n", "senders", "rate", "size", "duration")})
    if args.workload == "dm":
        out["pairs"] = args.pairs
    ws = None
    try:
        rss0 = servers.rss_kib(target.pid) if target.pid else 0
        cpus = [1] if args.pin else None
        ws = Workers(args.workers, target, args.workload, cpus, paced=bool(args.rate))
        specs = client_specs(args)
        out["n"] = len(specs)
        concurrency = args.concurrency or peers.wire_for(kind).login_concurrency
        cpu0 = servers.cpu_seconds(target.pid) if target.pid else 0.0
        out.update(open_clients(ws, specs, concurrency))
        if target.pid:
            login_cpu = servers.cpu_seconds(target.pid) - cpu0
            out["login_server_cpu_pct"] = 100 * login_cpu / out["login_seconds"]
        if out["logged_in"] == 0:
            raise RunFailed(f"no client logged in: {out['login_failures']}")
        if args.workload == "hold":
            time.sleep(args.duration)  # hold them for a while, then see who is still there
            ws.broadcast(cmd="stats")
            out["held"] = sum(s["alive"] for s in ws.gather("stats"))
        else:
            if args.workload == "fanout":
                sync(ws)
            out.update(timed_phase(ws, target, args))
        if target.pid:
            rss = servers.rss_kib(target.pid)
            out["server_rss_mib"] = rss / 1024
            out["rss_per_conn_kib"] = (rss - rss0) / max(1, out["logged_in"])
    finally:
        if ws is not None:
            ws.close()
        target.stop()
    return out


COLUMNS: list[report.Column] = [
    ("target", "server", "{}"),
    ("n", "N", "{:,}"),
    ("logins_per_s", "logins/s", "{:,.0f}"),
    ("held", "held", "{:,}"),
    ("rss_per_conn_kib", "RSS/conn KiB", "{:.1f}"),
    ("deliveries_per_s", "deliveries/s", "{:,.0f}"),
    ("dms_per_s", "DMs/s", "{:,.0f}"),
    ("p50_ms", "p50 ms", "{:.2f}"),
    ("p99_ms", "p99 ms", "{:.2f}"),
    ("max_ms", "max ms", "{:.1f}"),
    ("server_cpu_pct", "server CPU%", "{:.0f}"),
    ("loadgen_cpu_pct", "loadgen CPU%", "{:.0f}"),
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    about = __doc__.split("\n")[0]
    p = argparse.ArgumentParser(prog="python -m scripts.loadgen", description=about)
    p.add_argument("workload", choices=["hold", "fanout", "dm"])
    p.add_argument("-n", type=int, default=100, help="clients (hold) or room members (fanout)")
    p.add_argument("--senders", type=int, default=10, help="fanout: members who send")
    p.add_argument("--pairs", type=int, default=20, help="dm: pairs of clients")
    p.add_argument("--rate", type=float, default=0, help="messages/s offered in all; 0: flat out")
    p.add_argument("--size", type=int, default=120, help="message text, bytes")
    p.add_argument("--duration", type=float, default=10, help="seconds measured (hold: held)")
    p.add_argument("--window", type=int, default=4, help="flat out: batches in flight a sender")
    p.add_argument("--batch", type=int, default=16, help="flat out: messages per batch")
    p.add_argument("--probes", type=int, default=8, help="members that measure latency")
    p.add_argument(
        "--lazy-ms",
        type=float,
        default=50,
        help="at a set --rate: read non-probe members in sweeps",
    )
    p.add_argument("--workers", type=int, default=2, help="load-generator processes")
    p.add_argument(
        "--concurrency", type=int, default=0, help="logins in flight (default: 256; ngircd 40)"
    )
    p.add_argument("--target", choices=["securechat", "ngircd", "both"], default="securechat")
    p.add_argument("--pin", action="store_true", help="server on CPU 0, load generator on CPU 1")
    p.add_argument("--connect", metavar="HOST:PORT", help="use a running server, do not start one")
    p.add_argument("--ca", default="certs/ca.pem", help="with --connect: the server's CA")
    p.add_argument("--server-pid", type=int, help="with --connect: its PID, for RSS and CPU")
    p.add_argument("--server-arg", action="append", default=[], help="extra securechat flag")
    p.add_argument("--json", dest="json_only", action="store_true", help="JSON lines only")
    args = p.parse_args(argv)
    if args.duration <= 0 or args.duration > 600:
        p.error("--duration must be within (0, 600] seconds")
    if args.workload == "dm" and args.target != "securechat":
        p.error("the dm workload is securechat's only (IRC has no sealed DMs)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    kinds = ["securechat", "ngircd"] if args.target == "both" else [args.target]
    rows = []
    for kind in kinds:
        try:
            row = run_once(args, kind)
        except (RunFailed, RuntimeError) as exc:
            print(f"{kind}: run failed: {exc}", file=sys.stderr)
            return 1
        rows.append(row)
        print(json.dumps(row), flush=True)
    if len(rows) == 2:
        for key in ("deliveries_per_s", "logins_per_s"):
            if key in rows[0] and rows[1].get(key):
                rows[0][f"{key}_ratio"] = rows[0][key] / rows[1][key]
        print(json.dumps({"ratio": {k: v for k, v in rows[0].items() if k.endswith("_ratio")}}))
    if not args.json_only:
        print(report.table(rows, COLUMNS))
        print(f"(load generator: {args.workers} processes on {os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
