"""Version 2 DMs between devices through the real server: several devices per person, each DM
reaching every device once, revocation, and a server that hands out devices or keys of its own.
"""

from __future__ import annotations

import base64
import dataclasses
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from securechat import identity
from securechat.client import Client
from securechat.client.dm import DeviceState
from securechat.client.events import (
    Closed,
    DeviceWarning,
    DirectMessage,
    DMRejected,
    Event,
    Message,
    Parted,
)
from securechat.e2e import envelope, records
from securechat.errors import AuthError, UndecryptableMessage
from securechat.protocol import DM, DMs, Envelope
from securechat.server import Server, devicestore, requests
from securechat.server.hub import Hub

from .conftest import PASSPHRASE, Connect, plant_device, rewrite_sent_frames, wait_for


def on_server(
    monkeypatch: pytest.MonkeyPatch, seen: Callable[[str, Sequence[DM | Envelope]], object]
) -> None:
    """Call seen(sender, envelopes) for each `dm` (one envelope) or `dms` the server is sent."""
    one, many = requests.HANDLERS[DM], requests.HANDLERS[DMs]

    def dm(conn, frame: DM) -> None:  # type: ignore[no-untyped-def]
        seen(conn.user, [frame])
        one(conn, frame)

    def dms(conn, frame: DMs) -> None:  # type: ignore[no-untyped-def]
        seen(conn.user, frame.messages)
        many(conn, frame)

    monkeypatch.setitem(requests.HANDLERS, DM, dm)
    monkeypatch.setitem(requests.HANDLERS, DMs, dms)


def b64d(data: str) -> bytes:
    return base64.b64decode(data)


def dms_until_quiet(client: Client, timeout: float = 1.0) -> list[DirectMessage]:
    """Every DirectMessage that arrives before `timeout` seconds of silence."""
    got = []
    while (event := client.next_event(timeout=timeout)) is not None:
        if isinstance(event, DirectMessage):
            got.append(event)
    return got


def seen(client: Client) -> list[tuple[str, str, bool]]:
    return sorted((d.sender, d.text, d.own) for d in dms_until_quiet(client))


def test_every_dm_reaches_each_device_of_both_people_once(device: Connect) -> None:
    laptop, phone = device("alice", "laptop"), device("alice", "phone")
    bob1, bob2 = device("bob", "one"), device("bob", "two")
    assert len({laptop.device_id, phone.device_id, bob1.device_id, bob2.device_id}) == 4
    reply = laptop.send_dm("bob", "hello bob").result(10)
    assert (reply["status"], reply["devices"]) == ("delivered", 3)
    reply = bob2.send_dm("alice", "hello alice").result(10)
    assert (reply["status"], reply["devices"]) == ("delivered", 3)
    assert seen(laptop) == [("bob", "hello alice", False)]
    assert seen(phone) == [("alice", "hello bob", True), ("bob", "hello alice", False)]
    assert seen(bob1) == [("alice", "hello bob", False), ("bob", "hello alice", True)]
    assert seen(bob2) == [("alice", "hello bob", False)]


def test_a_dm_to_every_device_of_both_people_is_one_request(
    device: Connect, monkeypatch: pytest.MonkeyPatch
) -> None:
    laptop, phone = device("alice", "laptop"), device("alice", "phone")
    bobs = [device("bob", name) for name in ("one", "two", "three")]
    requests_sent: list[tuple[str, list[str]]] = []  # each request, and the devices it is for
    on_server(
        monkeypatch,
        lambda _, envs: requests_sent.append(
            ("dms" if isinstance(envs[0], Envelope) else "dm", sorted(e.device for e in envs))
        ),
    )
    reply = laptop.send_dm("bob", "one request, one token").result(10)
    assert (reply["status"], reply["devices"]) == ("delivered", 4)
    assert requests_sent == [("dms", sorted(d.device_id for d in (phone, *bobs)))]
    for reader in (phone, *bobs):
        assert [text for _, text, _ in seen(reader)] == ["one request, one token"]


def test_a_revoked_device_is_cut_off_and_gets_nothing_more(device: Connect) -> None:
    laptop, phone = device("alice", "laptop"), device("alice", "phone")
    bob = device("bob", "one")
    laptop.send_dm("bob", "before").result(10)
    assert seen(phone) == [("alice", "before", True)]
    lost = phone.device_id
    reply = laptop.revoke_device(lost)
    assert (reply["device_id"], reply["dropped"]) == (lost, 0)
    closed = wait_for(phone, lambda e: isinstance(e, Closed))
    assert closed.reason == "this device was revoked"
    listed = {d.device_id: d.revoked for d in bob.devices("alice")}
    assert listed == {laptop.device_id: False, lost: True}
    reply = bob.send_dm("alice", "after").result(10)
    assert reply["devices"] == 1
    assert seen(laptop) == [("bob", "after", False)]
    with pytest.raises(AuthError, match="this device was revoked; it cannot log in"):
        device("alice", "phone")


# -- a hostile server ---------------------------------------------------------------------------


def refusals(client: Client, timeout: float = 1.0) -> list[Event]:
    """Every DMRejected and DeviceWarning before `timeout` seconds of silence."""
    got = []
    while (event := client.next_event(timeout=timeout)) is not None:
        if isinstance(event, DMRejected | DeviceWarning):
            got.append(event)
    return got


def test_a_device_the_server_signed_itself_is_refused_loudly(
    device: Connect, server: Server, make_identity, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice, bob = device("alice", "laptop"), device("bob", "one")
    # The server makes a device of its own for bob, signed by a key that is not bob's.
    forged = plant_device(server, monkeypatch, "bob", make_identity("mallory"))
    reply = alice.send_dm("bob", "for bob only").result(10)
    assert reply["devices"] == 1  # bob's real device, not the forged one
    [warning] = refusals(alice)
    assert isinstance(warning, DeviceWarning)
    assert warning.detail == (
        f"a device record for bob ({forged.device_id}) is signed by a key that is not the one you "
        "pinned for bob; it was refused. The server may be adding a device of its own"
    )
    assert seen(bob) == [("alice", "for bob only", False)]


def test_a_dm_stamped_from_a_device_bob_never_signed_is_refused(
    device: Connect, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice, bob = device("alice", "laptop"), device("bob", "one")
    alice.send_dm("bob", "hello").result(10)
    assert seen(bob) == [("alice", "hello", False)]
    rewrite_sent_frames(monkeypatch, "dm", lambda f: [{**f, "from_device": "A" * 16}])
    alice.send_dm("bob", "again").result(10)
    [refused] = refusals(bob)
    assert isinstance(refused, DMRejected) and refused.kind == "unsigned_device"
    assert f"alice's device {'A' * 16}, which is not signed by alice's pinned" in refused.detail


def test_replayed_dropped_and_reordered_dms_are_shown_as_such(
    device: Connect, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice, bob = device("alice", "laptop"), device("bob", "one")
    held: list[dict] = []
    count = [0]

    def hostile(frame: dict) -> list[dict]:
        count[0] += 1
        if count[0] == 1:
            return [frame, frame]  # replayed
        if count[0] == 2:
            held.append(frame)  # dropped for now
            return []
        if count[0] == 4:
            return [frame, *held]  # the dropped one, late
        return [frame]

    rewrite_sent_frames(monkeypatch, "dm", hostile)
    for n in range(1, 5):
        alice.send_dm("bob", f"m{n}").result(10)
    events = []
    while (event := bob.next_event(timeout=1.0)) is not None:
        if isinstance(event, DirectMessage):
            events.append((event.text, event.notice))
        elif isinstance(event, DMRejected):
            events.append((event.kind, event.detail))
    assert events == [
        ("m1", None),
        (
            "replayed",
            "a direct message from alice arrived again; the copy was dropped. The server may be "
            "replaying old messages",
        ),
        ("m3", "a message from alice is missing"),
        ("m4", None),
        ("m2", "(arrived out of order)"),
    ]


def test_a_one_time_key_handed_out_twice_is_refused_when_used_again(
    device: Connect, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice, carol, bob = device("alice", "laptop"), device("carol", "one"), device("bob", "one")
    real = server.store.claim_prekeys_many
    first: dict = {}
    monkeypatch.setattr(
        server.store,
        "claim_prekeys_many",
        lambda wanted, **kw: {u: first.setdefault(u, real([(u, i)], **kw)[u]) for u, i in wanted},
    )
    alice.send_dm("bob", "from alice").result(10)
    carol.send_dm("bob", "from carol").result(10)
    got = []
    while (event := bob.next_event(timeout=1.0)) is not None:
        if isinstance(event, DirectMessage | DMRejected):
            got.append(event)
    assert [(e.sender, getattr(e, "text", None) or e.kind) for e in got] == [
        ("alice", "from alice"),
        ("carol", "undecryptable"),
    ]
    assert "handing out a key twice" in got[1].detail


def test_the_fallback_key_handed_out_again_and_again_still_shows_each_dm_once(
    device: Connect, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that claims to have no one-time keys left (or has none) hands every claimer
    bob's fallback key: three sessions start on it, each DM shows once, and the copies the
    server replays, under the same message id or a new one, are refused."""
    bob = device("bob", "one")
    handed: list[tuple[str, bool]] = []

    def fallback_only(wanted: Sequence[tuple[str, Sequence[str] | None]], max_devices: int) -> dict:
        with server.store._operation() as db:  # type: ignore[attr-defined]
            for user, _ in wanted:
                db.execute("DELETE FROM prekeys WHERE user = ? AND NOT fallback", (user,))
            keys = devicestore.claim_prekeys(db, wanted, max_devices)
        handed.extend((u, k.fallback) for u, found in keys.items() for k in found.values() if k)
        return keys

    monkeypatch.setattr(server.store, "claim_prekeys_many", fallback_only)
    rewrite_sent_frames(monkeypatch, "dm", lambda f: [f, f, {**f, "msg_id": f"x{f['msg_id']}"}])
    senders = [("alice", "laptop"), ("carol", "one"), ("alice", "tablet")]
    for user, name in senders:
        device(user, name).send_dm("bob", f"from {user}'s {name}").result(10)
    got = []
    while (event := bob.next_event(timeout=1.0)) is not None:
        if isinstance(event, DirectMessage | DMRejected):
            got.append(event)
    assert handed.count(("bob", True)) == 3 and ("bob", False) not in handed
    assert [(e.sender, getattr(e, "text", None) or e.kind) for e in got] == [
        (user, text)
        for user, name in senders
        for text in (f"from {user}'s {name}", "replayed", "undecryptable")
    ]
    assert [e.notice for e in got if isinstance(e, DirectMessage)] == [None, None, None]


def test_envelopes_swapped_between_devices_are_refused(
    device: Connect, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice = device("alice", "laptop")
    bob1, bob2 = device("bob", "one"), device("bob", "two")
    swap = {bob1.device_id: bob2.device_id, bob2.device_id: bob1.device_id}
    real = Hub.deliver_dm
    monkeypatch.setattr(
        Hub,
        "deliver_dm",
        lambda hub, env, queued: real(
            hub,
            dataclasses.replace(
                env, recipient_device=swap.get(env.recipient_device, env.recipient_device)
            ),
            queued,
        ),
    )
    alice.send_dm("bob", "which device?").result(10)
    for bob in (bob1, bob2):
        [refused] = refusals(bob)
        assert isinstance(refused, DMRejected) and refused.kind == "undecryptable"


def test_recorded_dms_cannot_be_decrypted_with_everything_both_sides_keep(
    device: Connect, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Forward secrecy: the server records every envelope; afterwards the test holds both
    users' key files, passphrases and device files, and still opens none of them."""
    recorded: list[tuple[str, str, bytes]] = []
    on_server(
        monkeypatch,
        lambda user, envs: recorded.extend((user, e.user, b64d(e.data)) for e in envs),
    )
    alice, bob = device("alice", "laptop"), device("bob", "one")
    for n in range(3):
        alice.send_dm("bob", f"a{n}").result(10)
        bob.send_dm("alice", f"b{n}").result(10)
    assert [d.text for d in dms_until_quiet(bob)] == ["a0", "a1", "a2"]
    assert [d.text for d in dms_until_quiet(alice)] == ["b0", "b1", "b2"]
    keys = {c.user: c.identity for c in (alice, bob)}
    alice.close()
    bob.close()
    assert len(recorded) == 6
    for sender, recipient, data in recorded:
        state = DeviceState(
            identity.load(keys[recipient].path, PASSPHRASE, min_kdf=identity.KDF_FAST_FOR_TESTS),
            recipient,
        )
        sender_state = DeviceState(keys[sender], sender)
        peer = records.sign_device(keys[sender], sender, sender_state.device)
        message_type, ciphertext = envelope.unpack(data, sender)
        with pytest.raises(UndecryptableMessage):
            state.sessions.decrypt(state.device, peer, message_type, ciphertext, 0)


def test_a_copy_of_a_device_cannot_read_dms_after_both_sides_have_sent(
    device: Connect, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Post-compromise security: a thief copies bob's device files (and has his passphrase);
    once alice and bob have each sent a message after that, the copy reads nothing new."""
    recorded: list[tuple[str, bytes]] = []
    on_server(monkeypatch, lambda user, envs: recorded.extend((user, b64d(e.data)) for e in envs))
    alice, bob = device("alice", "laptop"), device("bob", "one")
    alice.send_dm("bob", "before the theft").result(10)
    assert [d.text for d in dms_until_quiet(bob)] == ["before the theft"]
    assert bob.identity.path is not None
    stolen = tmp_path / "stolen"
    shutil.copytree(bob.identity.path.parent, stolen)
    bob.send_dm("alice", "after the theft, from bob").result(10)
    assert [d.text for d in dms_until_quiet(alice)] == ["after the theft, from bob"]
    alice.send_dm("bob", "after the theft, from alice").result(10)
    assert [d.text for d in dms_until_quiet(bob)] == ["after the theft, from alice"]
    sender, data = recorded[-1]
    assert sender == "alice"
    thief = DeviceState(
        identity.load(
            stolen / bob.identity.path.name, PASSPHRASE, min_kdf=identity.KDF_FAST_FOR_TESTS
        ),
        "bob",
    )
    alice_device = records.sign_device(
        alice.identity, "alice", DeviceState(alice.identity, "alice").device
    )
    message_type, ciphertext = envelope.unpack(data, "alice")
    with pytest.raises(UndecryptableMessage):
        thief.sessions.decrypt(thief.device, alice_device, message_type, ciphertext, 0)


def test_another_device_leaving_a_room_does_not_take_this_one_out(device: Connect) -> None:
    laptop, phone = device("alice", "laptop"), device("alice", "phone")
    bob = device("bob", "one")
    phone.close()
    # bob sees alice's phone leave; alice's laptop is still in the lobby and hears bob.
    wait_for(bob, lambda e: isinstance(e, Parted) and e.user == "alice")
    bob.send("#lobby", "still there?").result(10)
    seen_here = wait_for(laptop, lambda e: isinstance(e, Message | Parted))
    assert seen_here == Message("#lobby", "bob", "still there?", seen_here.ts)
    assert "#lobby" in laptop.rooms
