#!/usr/bin/env python3
"""Micro benchmark of DMs through Olm (not a test): what one DM costs in the e2e core alone, with
no network, server or disk. An encrypt is envelope.encrypt_dm to one device (inner record, chain,
padding, Olm); a decrypt is envelope.open_envelope (Olm, routing checks, replay and chain
tracking). Raw vodozemac session encrypt and decrypt of the same text are timed beside them.

Run from the repository root, as a module, so that it measures this checkout:

    python -m scripts.bench_olm                  # 2000 DMs each way
    python -m scripts.bench_olm --messages 5000

"one way": alice sends every DM before bob reads any (one chain, no DH step). "turns": they
take turns, so every DM starts a new ratchet step (a Curve25519 exchange each side). Figures
vary with the machine and its load: compare runs made side by side.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import nacl.signing

from securechat.client.dm import new_message_id
from securechat.e2e import envelope, prekeys, records
from securechat.e2e.conversations import ConversationTracker
from securechat.e2e.device import Device
from securechat.e2e.records import DeviceRecord
from securechat.e2e.sessions import SessionStore
from securechat.identity import Identity

BODY = "a direct message of about a hundred bytes, which is what most chat lines are, give or take"


@dataclass
class Side:
    user: str
    device: Device
    record: DeviceRecord
    store: SessionStore
    tracker: ConversationTracker


def side(user: str) -> Side:
    ident = Identity(None, nacl.signing.SigningKey.generate(), user)
    device = Device.create()
    record = records.sign_device(ident, user, device)
    return Side(user, device, record, SessionStore(), ConversationTracker(user, device.device_id))


def connect(a: Side, b: Side) -> None:
    """a claims one of b's one-time keys and starts a session, as the client does."""
    plan = prekeys.plan_prekeys(0, False, b.device.account.max_number_of_one_time_keys)
    one_time = next(k for k in prekeys.new_prekeys(b.device, b.user, plan) if not k.fallback)
    a.store.start_session(a.device, b.record, prekeys.verify_prekey(one_time.to_wire(), b.record))


def send(a: Side, b: Side) -> envelope.Envelope:
    [env] = envelope.encrypt_dm(
        a.store, a.tracker, [b.record], b.user, new_message_id(), time.time_ns() // 10**6, BODY
    )
    return env


def receive(b: Side, a: Side, env: envelope.Envelope) -> None:
    opened = envelope.open_envelope(
        b.store, b.device, b.tracker, a.user, a.record, env.data, time.time_ns() // 10**6
    )
    assert opened.delivery.record.body == BODY


def one_way(count: int) -> tuple[float, float]:
    """Seconds per encrypt and per decrypt when one side sends everything first."""
    alice, bob = side("alice"), side("bob")
    connect(alice, bob)
    receive(bob, alice, send(alice, bob))  # the pre-key message: not timed
    start = time.perf_counter()
    sent = [send(alice, bob) for _ in range(count)]
    encrypt_s = (time.perf_counter() - start) / count
    start = time.perf_counter()
    for env in sent:
        receive(bob, alice, env)
    return encrypt_s, (time.perf_counter() - start) / count


def turns(count: int) -> float:
    """Seconds per encrypt plus decrypt when the two sides take turns (a ratchet step each)."""
    alice, bob = side("alice"), side("bob")
    connect(alice, bob)
    receive(bob, alice, send(alice, bob))
    start = time.perf_counter()
    for n in range(count):
        a, b = (bob, alice) if n % 2 == 0 else (alice, bob)
        receive(b, a, send(a, b))
    return (time.perf_counter() - start) / count


def raw_olm(count: int) -> float:
    """Seconds per vodozemac encrypt plus decrypt, one way, with none of our checks."""
    alice, bob = side("alice"), side("bob")
    bob.device.account.generate_one_time_keys(1)
    key = next(iter(bob.device.account.one_time_keys.values()))
    outbound = alice.device.account.create_outbound_session(bob.device.account.curve25519_key, key)
    first = outbound.encrypt(BODY.encode())
    pre_key = first.to_pre_key()
    assert pre_key is not None
    session, _ = bob.device.account.create_inbound_session(
        alice.device.account.curve25519_key, pre_key
    )
    start = time.perf_counter()
    for _ in range(count):
        session.decrypt(outbound.encrypt(BODY.encode()))
    return (time.perf_counter() - start) / count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000, help="DMs to time in each mode")
    args = parser.parse_args()
    count = args.messages
    encrypt_s, decrypt_s = one_way(count)
    turn_s = turns(count)
    raw_s = raw_olm(count)
    us = 1e6
    print(f"{count} DMs of {len(BODY)} bytes, one device each way, µs per operation:")
    print(f"  one way  encrypt_dm    {encrypt_s * us:8.1f}")
    print(f"  one way  open_envelope {decrypt_s * us:8.1f}")
    print(f"  one way  both          {(encrypt_s + decrypt_s) * us:8.1f}")
    print(f"  turns    both          {turn_s * us:8.1f}  (a ratchet step every DM)")
    print(f"  raw vodozemac encrypt + decrypt {raw_s * us:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
