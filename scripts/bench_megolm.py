#!/usr/bin/env python3
"""Micro benchmark of encrypted rooms (not a test): Megolm encrypt and decrypt per message through
the room core, and the cost of a key rotation to many devices (one Olm encryption of the key share
per device, plus the membership and trust checks that pick them).

Run from the repository root, as a module, so that it measures this checkout:

    python -m scripts.bench_megolm                    # 500 devices (100 users x 5 devices)
    python -m scripts.bench_megolm --users 10 --devices 5 --messages 2000

Olm sessions between the devices are made before timing: a rotation reuses existing sessions.
Key shares are encrypted for real and queued, not delivered. Figures vary with the machine and
its load: compare runs made side by side.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from securechat.megolm.inbound import DecryptedRoomMessage
from securechat.megolm.mode import RoomMode
from tests.megolm_net import Client, OlmNet, join_everyone

ROOM = "#bench"
BODY = "a room message of about a hundred bytes, which is what most chat lines are, give or take"


def room(folder: Path, users: int, devices: int) -> tuple[OlmNet, Client, Client, int]:
    """A room of `sender`, `reader` and `users` members with `devices` devices each."""
    folder.mkdir()
    net = OlmNet(folder)
    sender = net.add_device("sender", "dev1")
    reader = net.add_device("reader", "dev1")
    others = [f"user{i}" for i in range(users)]
    for user in others:
        for d in range(devices):
            net.add_device(user, f"dev{d}")
    for user, ident in net.identities.items():
        if user != "sender":
            sender.known.check(user, ident.verify_key_bytes)
    reader.known.check("sender", net.identity("sender").verify_key_bytes)
    join_everyone([sender, reader], ROOM, ["sender", "reader", *others])
    sender.crypto.modes.observe(ROOM, RoomMode.ENCRYPTED)
    first = sender.crypto.encrypt(ROOM, BODY)  # makes every Olm session, shares the key
    assert len(first.shared_to) == 1 + users * devices, first.warnings
    net.deliver(reader)
    net.inbox.clear()
    return net, sender, reader, 1 + users * devices


def per_message(net: OlmNet, sender: Client, reader: Client, count: int) -> tuple[float, float]:
    """Seconds per encrypt (with its share of rotations) and per decrypt."""
    outs = []
    start = time.perf_counter()
    for _ in range(count):
        outs.append(sender.crypto.encrypt(ROOM, BODY))
    encrypt_s = (time.perf_counter() - start) / count
    net.deliver(reader)
    net.inbox.clear()
    start = time.perf_counter()
    for out in outs:
        result = reader.crypto.decrypt("sender", out.message)
        assert isinstance(result, DecryptedRoomMessage)
    return encrypt_s, (time.perf_counter() - start) / count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=100, help="members besides the sender")
    parser.add_argument("--devices", type=int, default=5, help="devices per member")
    parser.add_argument("--messages", type=int, default=2000, help="messages to time")
    parser.add_argument("--rotations", type=int, default=5, help="rotations to time")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        net, sender, reader, _ = room(Path(folder) / "small", 0, 0)
        small = per_message(net, sender, reader, args.messages)
        net, sender, reader, devices = room(Path(folder) / "big", args.users, args.devices)
        rotations = []
        for _ in range(args.rotations):
            sender.crypto.rotate(ROOM)
            start = time.perf_counter()
            out = sender.crypto.encrypt(ROOM, BODY)
            rotations.append(time.perf_counter() - start)
            assert len(out.shared_to) == devices
            net.deliver(reader)
            net.inbox.clear()
        big = per_message(net, sender, reader, max(1, args.messages // 10))

    command = "python -m scripts.bench_megolm " + " ".join(sys.argv[1:])
    print(f"command: {command.strip()}")
    for label, (enc, dec) in (("2 members", small), (f"{devices} devices", big)):
        print(
            f"room of {label}: encrypt {enc * 1e6:.1f} µs, decrypt {dec * 1e6:.1f} µs per "
            "message (encrypt includes the membership plan and a rotation per 100 messages)"
        )
    median = statistics.median(rotations)
    print(
        f"key rotation to {devices} devices (new session + {devices} Olm encryptions of the "
        f"share): median {median * 1e3:.1f} ms, min {min(rotations) * 1e3:.1f} ms over "
        f"{len(rotations)} runs ({median / devices * 1e6:.1f} µs per device)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
