"""Direct messages (Olm, between devices) through the real server, and a server that turns
hostile.

Each hostile twist patches the running server's hub the way a compromised server would behave,
and the tests assert exactly how the client reacts: a visible DMRejected (or KeyChanged), never a
message shown as genuine.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from pathlib import Path

import pytest

from securechat.client import KeyChanged, RequestError
from securechat.client.events import DirectMessage, DMRejected, Joined, Message
from securechat.e2e import records
from securechat.e2e.device import Device
from securechat.protocol import DM, DMs, Envelope
from securechat.server import requests
from securechat.trust import KeyState

from .conftest import close_and_see_it_part, rewrite_sent_frames, wait_for

SECRET = "meet me at the north gate at dawn"


def hook_server_dm(monkeypatch, change) -> None:  # type: ignore[no-untyped-def]
    """Make the server act on `change(envelope)` instead of each envelope it got, alone in a
    `dm` or one of a `dms` (a chat DM's envelopes, one per device, come in one `dms`)."""
    one, many = requests.HANDLERS[DM], requests.HANDLERS[DMs]

    def each(conn, frame: DMs) -> None:  # type: ignore[no-untyped-def]
        many(conn, dataclasses.replace(frame, messages=tuple(map(change, frame.messages))))

    monkeypatch.setitem(requests.HANDLERS, DM, lambda conn, f: one(conn, change(f)))
    monkeypatch.setitem(requests.HANDLERS, DMs, each)


def is_dm(e) -> bool:
    return isinstance(e, DirectMessage)


def is_rejected(e) -> bool:
    return isinstance(e, DMRejected)


def ready(*clients) -> None:
    """Every client has seen the last one join, so all are online."""
    last = clients[-1].user
    for c in clients:
        wait_for(c, lambda e: isinstance(e, Joined) and e.user == last)


def rewrite_delivered_dms(monkeypatch, rewrite) -> None:
    """Make the server rewrite every DM frame it delivers: rewrite(frame) -> list of frames."""
    rewrite_sent_frames(monkeypatch, "dm", rewrite)


# -- the honest path ------------------------------------------------------------------------------


def test_dm_reaches_only_its_recipient_and_is_pinned_on_first_sight(connect) -> None:
    alice, bob, carol = connect("alice"), connect("bob"), connect("carol")
    ready(alice, bob, carol)
    reply = alice.send_dm("bob", SECRET).result(5)
    assert (reply["status"], reply["devices"]) == ("delivered", 1)
    dm = wait_for(bob, is_dm)
    assert (dm.sender, dm.recipient, dm.text, dm.message_id) == (
        "alice",
        "bob",
        SECRET,
        reply["msg_id"],
    )
    assert dm.key_state == "new"
    assert alice.known_keys.state("bob") is KeyState.PINNED
    assert bob.known_keys.pinned("alice") == alice.identity.verify_key_bytes
    # carol got nothing: her next event is a room message sent after the DM.
    bob.send("#lobby", "marker").result(5)
    assert not isinstance(
        wait_for(carol, lambda e: isinstance(e, Message | DirectMessage | DMRejected)),
        DirectMessage,
    )


def test_dm_to_someone_offline_is_queued_and_delivered_at_login(connect, server) -> None:
    alice = connect("alice")
    close_and_see_it_part(connect("bob"), alice)
    reply = alice.send_dm("bob", "are you there?").result(5)
    assert reply["status"] == "queued"
    bob = connect("bob")
    dm = wait_for(bob, is_dm)
    assert (dm.sender, dm.text) == ("alice", "are you there?")
    # bob's client acknowledged it, so the server forgets it. The ack left before this ping,
    # and the store's worker runs a call after the jobs handed over before it, so one look
    # after the pong is enough.
    bob.ping().result(5)
    pending = server.store.pending_envelopes
    assert server._worker.submit(pending, "bob", bob.device_id, 0).result(5) == []


def test_dm_to_an_unknown_name(connect) -> None:
    with pytest.raises(RequestError) as info:
        connect("alice").send_dm("nobody", "hello")
    assert (info.value.code, info.value.message) == ("no_such_user", "nobody is called nobody")


def test_safety_numbers_match_on_both_sides_and_verify(connect) -> None:
    alice, bob = connect("alice"), connect("bob")
    shown_a = alice.safety_number("bob")
    assert shown_a.pinned_number == bob.safety_number("alice").pinned_number
    assert (shown_a.pinned_state, shown_a.offered_key) == (KeyState.NEW, None)
    assert alice.mark_verified(shown_a).state is KeyState.VERIFIED
    alice.send_dm("bob", "verified hello").result(5)
    assert wait_for(bob, is_dm).text == "verified hello"


# -- a hostile server -----------------------------------------------------------------------------


def test_swapped_key_for_a_pinned_name_warns_and_sends_nothing(
    connect, server, make_identity, monkeypatch
) -> None:
    alice, bob = connect("alice"), connect("bob")
    ready(alice, bob)
    alice.send_dm("bob", "first, honest").result(5)
    wait_for(bob, is_dm)
    mallory_key = make_identity("mallory").verify_key_bytes
    real = server.store.public_key
    monkeypatch.setattr(
        server.store, "public_key", lambda user: mallory_key if user == "bob" else real(user)
    )
    relayed: list[DM | Envelope] = []
    hook_server_dm(monkeypatch, lambda f: relayed.append(f) or f)

    with pytest.raises(KeyChanged) as info:
        alice.send_dm("bob", SECRET)
    warning = str(info.value)
    assert warning.startswith("WARNING: the key for bob has changed.")
    assert f"pinned key: {bob.identity.fingerprint}" in warning
    assert f"offered now: {make_identity('mallory').fingerprint}" in warning
    assert relayed == []  # nothing reached the server
    assert alice.known_keys.pinned("bob") == bob.identity.verify_key_bytes
    assert alice.known_keys.state("bob") is KeyState.CHANGED


def test_replayed_dm_is_dropped_with_a_warning(connect, monkeypatch) -> None:
    alice, bob = connect("alice"), connect("bob")
    ready(alice, bob)
    rewrite_delivered_dms(monkeypatch, lambda f: [f, f])
    alice.send_dm("bob", SECRET).result(5)
    assert wait_for(bob, is_dm).text == SECRET
    rejected = wait_for(bob, lambda e: isinstance(e, DMRejected | DirectMessage))
    assert isinstance(rejected, DMRejected)
    assert (rejected.sender, rejected.kind) == ("alice", "replayed")
    assert rejected.detail == (
        "a direct message from alice arrived again; the copy was dropped. The server may be "
        "replaying old messages"
    )
    assert SECRET not in rejected.detail


def flip_byte(frame: dict, position: int) -> dict:
    data = bytearray(base64.b64decode(frame["data"]))
    data[position] ^= 0x01
    return {**frame, "data": base64.b64encode(bytes(data)).decode()}


def test_a_replay_under_a_new_message_id_is_refused_by_the_ratchet(connect, monkeypatch) -> None:
    alice, bob = connect("alice"), connect("bob")
    ready(alice, bob)
    rewrite_delivered_dms(monkeypatch, lambda f: [f, {**f, "msg_id": "renamed-copy"}])
    alice.send_dm("bob", SECRET).result(5)
    assert wait_for(bob, is_dm).text == SECRET
    rejected = wait_for(bob, lambda e: isinstance(e, DMRejected | DirectMessage))
    assert (type(rejected), rejected.kind) == (DMRejected, "undecryptable")
    assert "already decrypted once, or altered (a replayed or forged copy)" in rejected.detail


@pytest.mark.parametrize("position", [1, 30, -1])  # Olm message type, inside, the MAC
def test_flipped_ciphertext_byte_is_never_shown(connect, monkeypatch, position) -> None:
    alice, bob = connect("alice"), connect("bob")
    ready(alice, bob)
    rewrite_delivered_dms(monkeypatch, lambda f: [flip_byte(f, position)])
    alice.send_dm("bob", SECRET).result(5)
    rejected = wait_for(bob, lambda e: isinstance(e, DMRejected | DirectMessage))
    assert isinstance(rejected, DMRejected)
    assert (rejected.sender, rejected.kind) == ("alice", "undecryptable")


def test_an_envelope_of_version_1_is_refused_as_a_downgrade(connect, monkeypatch) -> None:
    alice, bob = connect("alice"), connect("bob")
    ready(alice, bob)
    rewrite_delivered_dms(monkeypatch, lambda f: [flip_byte(f, 0)])  # version 2 -> 3
    alice.send_dm("bob", SECRET).result(5)
    rejected = wait_for(bob, lambda e: isinstance(e, DMRejected | DirectMessage))
    assert (type(rejected), rejected.kind) == (DMRejected, "misrouted")
    assert rejected.detail == (
        "a direct message from alice uses envelope version 3, but this conversation uses version "
        "2 only; it was dropped (an old client, or a server trying to downgrade the encryption)"
    )


def test_dm_rerouted_to_someone_else_is_never_shown(connect, monkeypatch) -> None:
    alice, bob, carol = connect("alice"), connect("bob"), connect("carol")
    ready(alice, bob, carol)
    hook_server_dm(
        monkeypatch,
        lambda f: dataclasses.replace(f, to="carol", user="carol", device=carol.device_id),
    )
    alice.send_dm("bob", SECRET).result(5)
    rejected = wait_for(carol, lambda e: isinstance(e, DMRejected | DirectMessage))
    assert isinstance(rejected, DMRejected)
    assert (rejected.sender, rejected.kind) == ("alice", "undecryptable")


def test_false_sender_stamp_is_never_shown(connect, monkeypatch) -> None:
    alice, bob, carol = connect("alice"), connect("bob"), connect("carol")
    ready(alice, bob, carol)
    # The server claims carol sent it, naming alice's device, which is not one of carol's.
    rewrite_delivered_dms(monkeypatch, lambda f: [{**f, "from": "carol"}])
    alice.send_dm("bob", SECRET).result(5)
    rejected = wait_for(bob, lambda e: isinstance(e, DMRejected | DirectMessage))
    assert isinstance(rejected, DMRejected)
    assert (rejected.sender, rejected.kind) == ("carol", "unsigned_device")


def test_false_sender_with_that_senders_key_does_not_open(connect, monkeypatch) -> None:
    alice, bob, carol = connect("alice"), connect("bob"), connect("carol")
    ready(alice, bob, carol)
    # Stamped as from carol's real device: her session keys do not open alice's envelope.
    rewrite_delivered_dms(
        monkeypatch, lambda f: [{**f, "from": "carol", "from_device": carol.device_id}]
    )
    alice.send_dm("bob", SECRET).result(5)
    rejected = wait_for(bob, lambda e: isinstance(e, DMRejected | DirectMessage))
    assert (type(rejected), rejected.kind) == (DMRejected, "undecryptable")


def test_dm_reflected_back_to_its_sender_is_never_shown(connect, monkeypatch) -> None:
    alice, bob = connect("alice"), connect("bob")
    ready(alice, bob)
    # Deliver alice's DM for bob back to alice's own device, stamped as from bob's device.
    hook_server_dm(
        monkeypatch, lambda f: dataclasses.replace(f, user="alice", device=alice.device_id)
    )
    rewrite_delivered_dms(
        monkeypatch, lambda f: [{**f, "from": "bob", "from_device": bob.device_id}]
    )
    alice.send_dm("bob", SECRET).result(5)
    rejected = wait_for(alice, lambda e: isinstance(e, DMRejected | DirectMessage))
    assert (type(rejected), rejected.sender, rejected.kind) == (DMRejected, "bob", "undecryptable")


def test_sender_key_swapped_on_delivery_is_refused_against_the_pin(
    connect, make_identity, key_offers
) -> None:
    alice, bob = connect("alice"), connect("bob")
    ready(alice, bob)
    alice.send_dm("bob", "pin me").result(5)
    wait_for(bob, is_dm)
    # A second "alice" key and a device signed by it, as a server would use to impersonate her
    # after the pin.
    impostor = make_identity("impostor")
    forged = records.sign_device(impostor, "alice", Device.create())
    key_offers.offer["alice"] = impostor.verify_key_bytes
    carol = connect("carol")
    carol_dm = carol.send_dm  # a real envelope to bob, re-stamped as from the forged device
    monkeypatch_rewrite = pytest.MonkeyPatch()
    try:
        rewrite_delivered_dms(
            monkeypatch_rewrite, lambda f: [{**f, "from": "alice", "from_device": forged.device_id}]
        )
        carol_dm("bob", "it's me, alice").result(5)
        rejected = wait_for(bob, lambda e: isinstance(e, DMRejected | DirectMessage))
    finally:
        monkeypatch_rewrite.undo()
    assert (type(rejected), rejected.kind) == (DMRejected, "key_changed")
    assert rejected.detail.startswith("WARNING: the key for alice has changed.")


def test_server_disk_and_log_never_hold_dm_plaintext(connect, server, server_log: Path) -> None:
    alice, bob = connect("alice"), connect("bob")
    ready(alice, bob)
    alice.send_dm("bob", SECRET).result(5)
    assert wait_for(bob, is_dm).text == SECRET
    bob.send_dm("alice", SECRET + " (reply)").result(5)
    assert wait_for(alice, is_dm).text.endswith("(reply)")
    alice.close()
    bob.close()
    log_file = server_log
    written = [p for p in (server.config.data_dir).rglob("*") if p.is_file()] + [log_file]
    assert any(p.name == "securechat.db" for p in written)
    assert "alice logged in" in log_file.read_text()
    for path in written:
        data = path.read_bytes()
        for needle in (SECRET, "north gate", "(reply)"):
            assert needle.encode() not in data, f"{needle!r} found in {path}"
            assert base64.b64encode(needle.encode())[:12] not in data


def test_what_the_server_sees_of_a_dm(connect, monkeypatch) -> None:
    alice, bob = connect("alice"), connect("bob")
    ready(alice, bob)
    seen: list[DMs] = []
    original = requests.HANDLERS[DMs]
    monkeypatch.setitem(requests.HANDLERS, DMs, lambda conn, f: seen.append(f) or original(conn, f))
    alice.send_dm("bob", SECRET).result(5)
    [frame] = seen
    [item] = frame.messages
    assert sorted(dataclasses.asdict(frame)) == ["id", "messages", "resume"]
    assert frame.resume is False  # flow control, not content
    fields = dataclasses.asdict(item)
    assert sorted(fields) == ["data", "device", "msg_id", "to", "user"]
    assert (item.to, item.user, item.device) == ("bob", "bob", bob.device_id)
    assert SECRET.encode() not in base64.b64decode(item.data)
    assert "alice" not in json.dumps(fields)
