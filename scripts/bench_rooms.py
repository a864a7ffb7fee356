#!/usr/bin/env python3
"""End-to-end cost of an encrypted room through a real server (not a test): N real clients in one
room, and how long a message takes from send() to being read by every member, for the first
message (device lists, prekey claims, Olm sessions and key shares to every device), a message
after a member left (a key rotation: a new session shared with every remaining device), and a
message in between (no key traffic).

Run from the repository root, as a module, so that it measures this checkout:

    python -m scripts.bench_rooms -n 500
    python -m scripts.bench_rooms -n 50 --rate 1000000   # without the default rate limit

The server is a fresh `securechat server` process with its default request rate (10 a second,
bursts of 30) unless --rate says otherwise: a rotation is what a user of a default server waits
for. Clients are real `Client` objects in this process, one device each, logged in over TLS
from 127.0.0.1 (trusted, so the connect throttle and new-name cap do not apply). Figures vary
with the machine and its load: compare runs made side by side. Each joiner fetches the device
lists of the members before it (one request for up to 100 of them) and the members fetch the
joiners' lists only when they next send, so the requests grow with N, not N squared; the work
in this one process still does (every client displays every join, and every joiner checks every
earlier member's record). "All read" includes every client decrypting on the same cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from scripts.loadgen import servers
from securechat import identity
from securechat.client import Client
from securechat.client.events import Joined, Message, Parted, RoomState

ROOM = "#bench"
PASSPHRASE = b"bench passphrase"
TIMEOUT = 600.0  # seconds for any one step, before the run gives up


class Member:
    """One logged-in client and the room lines it has read, by text."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.read: dict[str, float] = {}
        self.joined: set[str] = set()
        self.state = threading.Event()
        self.changed = threading.Condition()
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for event in self.client.events():
            with self.changed:
                if isinstance(event, Message) and event.room == ROOM:
                    self.read.setdefault(event.text, time.perf_counter())
                elif isinstance(event, Joined) and event.room == ROOM:
                    self.joined.add(event.user)
                elif isinstance(event, Parted) and event.room == ROOM:
                    self.joined.discard(event.user)
                elif isinstance(event, RoomState) and event.room == ROOM:
                    self.state.set()
                self.changed.notify_all()

    def wait(self, done: Callable[[Member], bool]) -> None:
        deadline = time.monotonic() + TIMEOUT
        with self.changed:
            while not done(self):
                left = deadline - time.monotonic()
                if left <= 0 or self.client.closed:
                    raise RuntimeError(f"{self.client.user}: gave up waiting")
                self.changed.wait(min(left, 1.0))


def log_in(folder: Path, target: servers.Target, n: int) -> list[Member]:
    def one(i: int) -> Member:
        name = f"m{i:04d}"
        ident = identity.create(
            folder / "keys" / f"{name}.key", PASSPHRASE, kdf=identity.KDF_FAST_FOR_TESTS
        )
        return Member(Client.connect(target.host, target.port, ident, name, target.ca))

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(n)))


def join_all(members: list[Member]) -> None:
    """Everyone joins, one after another; the sender (the first) sees every join displayed."""
    for member in members:
        member.client.join(ROOM).result(TIMEOUT)
        member.state.wait(TIMEOUT)
    names = {m.client.user for m in members[1:]}
    members[0].wait(lambda m: names <= m.joined)


def timed_message(sender: Member, readers: list[Member], text: str) -> dict[str, float]:
    """Seconds from send() to the server's ok, and until every reader has read it."""
    start = time.perf_counter()
    sender.client.send(ROOM, text).result(TIMEOUT)
    sent = time.perf_counter()
    for reader in readers:
        reader.wait(lambda m: text in m.read)
    last = max(r.read[text] for r in readers)
    return {"send_s": round(sent - start, 3), "all_read_s": round(last - start, 3)}


def run(n: int, rate: float) -> dict[str, object]:
    folder = Path(tempfile.mkdtemp(prefix="bench-rooms-"))
    (folder / "keys").mkdir()
    # Given after the load generator's flags (which lift the limit), so they win.
    extra = ["--rate", f"{rate:g}", "--burst", str(max(30, int(rate)))]
    target = servers.start_securechat(folder / "server", None, extra)
    members: list[Member] = []
    try:
        started = time.perf_counter()
        members = log_in(folder, target, n)
        join_all(members)
        ready = time.perf_counter() - started
        sender, readers = members[0], members[1:]
        row: dict[str, object] = {"n": n, "rate": rate, "setup_s": round(ready, 1)}
        row["first"] = timed_message(sender, readers, "first: keys to every device")
        row["steady"] = timed_message(sender, readers, "steady: no key traffic")
        leaver = readers.pop()
        leaver.client.part(ROOM).result(TIMEOUT)
        sender.wait(lambda m: leaver.client.user not in m.joined)
        row["rotation"] = timed_message(sender, readers, "after a leave: a new session")
        return row
    finally:
        for member in members:
            member.client.close()
        target.stop()


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.bench_rooms", description=__doc__)
    p.add_argument("-n", type=int, default=50, help="room members, the sender included")
    p.add_argument("--rate", type=float, default=10.0, help="the server's --rate (its default: 10)")
    args = p.parse_args()
    if not 2 <= args.n <= 2000:
        p.error("-n must be from 2 to 2000")
    row = run(args.n, args.rate)
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
