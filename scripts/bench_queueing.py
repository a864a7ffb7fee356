"""Queueing cost of a room message, without TLS or sockets: the hub and one I/O loop only.

    python -m scripts.bench_queueing -n 50 --per-turn 40      # from the repository root

`Hub.handle(Say)` into a room of N members on one loop (never started: this thread plays it),
`--per-turn` messages between two flushes, members whose flush only takes what is queued. It
prints CPU time per message and per delivery, the best of 5 rounds (BENCHMARKS.md, "Native
load generator", has the figures before and after room feeds).

With `--session` each message starts as the bytes of a say frame, read by the sender's logged-in
ServerSession, and goes to `Hub.say` with its reply queued, as a connection does: the whole
per-message Python path short of TLS and the socket (the rate limit left out).

With `--store` the hub hands its history rows to a store worker writing SQLite in a temporary
folder, as the server does (also at `--history 0`, as the server does), and the CPU time counts
that thread too: run with and without `--history 0` to see what room history costs a message.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import nacl.signing

from securechat import framing
from securechat.protocol import (
    NONCE_BYTES,
    PROTOCOL_VERSION,
    Request,
    Say,
    ServerSession,
    b64,
    login_transcript,
)
from securechat.server.hub import Hub
from securechat.server.loop import IOLoop
from securechat.server.outbox import Outbox
from securechat.server.store import SQLiteStore
from securechat.server.worker import StoreWorker
from securechat.tls import WRITE_CHUNK


class Member:
    """What the hub and the loop use of a connection; its flush takes and counts the bytes."""

    def __init__(self, user: str, loop: IOLoop) -> None:
        self.user, self.device, self.loop, self.open = user, "d", loop, True
        self.outbox = Outbox()
        self.written = 0

    def flush(self) -> None:
        while data := self.outbox.take(WRITE_CHUNK):
            self.written += len(data)


def drain(loop: IOLoop) -> None:
    while loop.dirty or loop._grown:
        loop._flush_dirty()
    loop._seal()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-n", type=int, default=50, help="room members")
    p.add_argument("--per-turn", type=int, default=40, help="messages between two flushes")
    p.add_argument("--history", type=int, default=100, help="room messages the hub keeps")
    p.add_argument("--turns", type=int, default=0, help="turns a round (default: about 2 s)")
    p.add_argument("--session", action="store_true", help="from a say's bytes, as a connection")
    p.add_argument(
        "--store",
        action="store_true",
        help="history rows to a store worker and SQLite in a temporary folder, as the server "
        "does (without it the hub keeps history in memory only); its thread's CPU counts too",
    )
    args = p.parse_args()
    worker = None
    if args.store:
        folder = Path(tempfile.mkdtemp(prefix="bench-queueing-"))
        worker = StoreWorker(lambda: SQLiteStore(folder / "securechat.db"), args.history)
    sink = worker.add_history if worker is not None else None  # as the server: even at 0
    loop, hub = IOLoop(0), Hub(history_keep=args.history, history_sink=sink)
    results: list[float] = []

    # On the loop's own thread, as in the server: a broadcast from any other thread would only
    # post to the loop's inbox.
    def run() -> None:
        try:
            results.append(measure(loop, hub, args))
        finally:
            loop.stop()  # also after an error, which the loop would only log

    loop.call_soon(run)
    loop.start()
    loop.join()
    if worker is not None:
        worker.stop(timeout=60.0)  # writes the rows still waiting
    turns = args.turns or max(1, 400_000 // (args.n * args.per_turn))
    per_message = results[0] / (turns * args.per_turn)
    print(
        f"N={args.n} per turn={args.per_turn}: {per_message * 1e6:.1f} us a message, "
        f"{per_message / args.n * 1e9:.0f} ns a delivery"
    )


def measure(loop: IOLoop, hub: Hub, args: argparse.Namespace) -> float:
    """The best of 5 rounds, in CPU seconds."""
    members = [Member(f"u{i}", loop) for i in range(args.n)]
    for member in members:
        hub.login(member)  # type: ignore[arg-type]
    drain(loop)
    say = Say(id=1, room="#lobby", text="x" * 100)
    senders = members[:10]
    sessions = [logged_in(sender) for sender in senders]
    frames = [
        framing.encode({"type": "say", "id": i, "room": "#lobby", "text": "x" * 100})
        for i in range(args.per_turn)
    ]
    turns = args.turns or max(1, 400_000 // (args.n * args.per_turn))
    best = float("inf")
    for _ in range(5):
        start = time.process_time()
        for _ in range(turns):
            for i in range(args.per_turn):
                sender = senders[i % len(senders)]
                if not args.session:
                    hub.handle(sender, say)  # type: ignore[arg-type]
                    continue
                for event in sessions[i % len(senders)].receive_data(frames[i]):
                    assert isinstance(event, Request) and isinstance(event.frame, Say)
                    sender.outbox.push(hub.say(sender, event.frame))  # type: ignore[arg-type]
            drain(loop)
        best = min(best, time.process_time() - start)
    return best


def logged_in(member: Member) -> ServerSession:
    """A session through a real login (a signed challenge), its frames queued for `member`."""
    key, cert, nonce = nacl.signing.SigningKey.generate(), bytes(32), bytes(NONCE_BYTES)
    session = ServerSession(cert, emit=member.outbox.push, nonce_source=lambda n: nonce[:n])
    public = bytes(key.verify_key)
    hello = {"type": "hello", "user": member.user, "key": b64(public), "version": PROTOCOL_VERSION}
    hello["device"] = "A" * 16
    session.receive_data(framing.encode(hello))
    signed = key.sign(login_transcript(nonce, member.user, public, cert)).signature
    session.receive_data(framing.encode({"type": "auth", "signature": b64(signed)}))
    session.login_accepted({})
    return session


if __name__ == "__main__":
    main()
