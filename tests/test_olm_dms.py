"""DMs between devices over Olm through the e2e core's API: two users with two devices each,
forward secrecy, post-compromise security, and a hostile server's tricks. No network: the server
is the PrekeyDirectory stand-in plus the tests choosing what to deliver."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from securechat.e2e import atrest, envelope, records, storage
from securechat.e2e.conversations import Arrival
from securechat.e2e.device import Device
from securechat.e2e.envelope import Envelope
from securechat.e2e.sessions import SessionStore
from securechat.errors import (
    DeviceStateError,
    EnvelopeError,
    ReplayedRecord,
    UndecryptableMessage,
)

from .olm_helpers import Party, PrekeyDirectory, now_ms


class World:
    def __init__(self, root: Path, make_identity) -> None:
        self.root = root
        self.directory = PrekeyDirectory()
        self.keys = {name: make_identity(name) for name in ("alice", "bob")}
        self.pins = {name: ident.verify_key_bytes for name, ident in self.keys.items()}
        self.parties = {
            f"{user}-{where}": self.party(user, f"{user}-{where}")
            for user in ("alice", "bob")
            for where in ("phone", "laptop")
        }

    def party(self, user: str, folder: str) -> Party:
        return Party(user, self.keys[user].path, self.root / folder, self.directory)

    def __getitem__(self, name: str) -> Party:
        return self.parties[name]

    def by_device(self, device_id: str) -> Party:
        return next(p for p in self.parties.values() if p.device_id == device_id)

    def send(self, sender: str, to: str, body: str, message_id: str) -> list[Envelope]:
        return self[sender].send(to, self.pins[to], body, message_id)

    def deliver(self, sender: str, env: Envelope, to: Party | None = None):
        party = to or self.by_device(env.recipient_device)
        return party.receive(self[sender].user, self.pins[self[sender].user], env)

    def record(self, name: str) -> records.DeviceRecord:
        return self[name].record()


@pytest.fixture
def world(tmp_path: Path, make_identity) -> World:
    return World(tmp_path, make_identity)


def envelope_for(envelopes: list[Envelope], party: Party) -> Envelope:
    return next(e for e in envelopes if e.recipient_device == party.device_id)


def test_two_users_with_two_devices_each_every_device_gets_each_dm_once(world: World) -> None:
    shown: dict[str, list[tuple[str, str, str]]] = {name: [] for name in world.parties}
    conversation = [
        ("alice-phone", "bob", "hello bob", "msg-0001"),
        ("bob-laptop", "alice", "hi alice", "msg-0002"),
        ("alice-laptop", "bob", "from my laptop", "msg-0003"),
        ("bob-phone", "alice", "from my phone", "msg-0004"),
        ("alice-phone", "bob", "all four see this", "msg-0005"),
    ]
    for sender, to, body, message_id in conversation:
        envelopes = world.send(sender, to, body, message_id)
        assert sorted(world.by_device(e.recipient_device).user for e in envelopes) == sorted(
            [to, to, world[sender].user]
        ), "each of the recipient's devices and the sender's other device"
        for env in envelopes:
            receiver = world.by_device(env.recipient_device)
            opened = world.deliver(sender, env)
            rec = opened.delivery.record
            assert opened.delivery.arrival is Arrival.IN_ORDER
            assert opened.delivery.notice(receiver.user) is None
            shown[next(n for n, p in world.parties.items() if p is receiver)].append(
                (rec.sender, rec.recipient, rec.body)
            )
        for env in envelopes:  # the server delivers each again: never shown twice
            with pytest.raises((UndecryptableMessage, ReplayedRecord)):
                world.deliver(sender, env)
    for name, seen in shown.items():
        expected = [(world[s].user, to, body) for s, to, body, _ in conversation if s != name]
        assert seen == expected, name


def test_forward_secrecy_stored_state_cannot_open_messages_both_sides_ratcheted_past(
    world: World,
) -> None:
    alice, bob = world["alice-phone"], world["bob-phone"]
    recorded = [envelope_for(world.send("alice-phone", "bob", "first secret", "fs-00001"), bob)]
    recorded.append(
        envelope_for(world.send("alice-phone", "bob", "second secret", "fs-00002"), bob)
    )
    for env in recorded:
        world.deliver("alice-phone", env)
    reply = envelope_for(world.send("bob-phone", "alice", "got them", "fs-00003"), alice)
    recorded.append(reply)
    world.deliver("bob-phone", reply)
    later = envelope_for(world.send("alice-phone", "bob", "third", "fs-00004"), bob)
    world.deliver("alice-phone", later)
    bob_reply = envelope_for(world.send("bob-phone", "alice", "fourth", "fs-00005"), alice)
    world.deliver("bob-phone", bob_reply)

    # Everything stored now, opened with the key files and passphrase.
    for thief_of, sender, envs in (
        (bob, "alice-phone", recorded[:2]),
        (alice, "bob-phone", recorded[2:]),
    ):
        thief = Party(thief_of.user, thief_of.key_path, thief_of.key_path.parent, world.directory)
        peer = world.record(sender)
        for env in envs:
            kind, ciphertext = envelope.unpack(env.data, peer.user)
            for store in (thief.store, SessionStore()):  # its sessions, or a fresh inbound one
                with pytest.raises(UndecryptableMessage):
                    store.decrypt(thief.device, peer, kind, ciphertext, now_ms())
        every_file = b"".join(p.read_bytes() for p in thief_of.key_path.parent.iterdir())
        assert b"secret" not in every_file and b"got them" not in every_file


def test_the_fallback_key_keeps_a_first_message_readable_until_rotated_twice(
    world: World,
) -> None:
    """The stated limit: a session started on the fallback key can be re-derived from the stored
    account until that key has been replaced twice (vodozemac keeps the previous one)."""
    world.directory.only_fallback = True
    bob = world["bob-phone"]
    env = envelope_for(world.send("alice-phone", "bob", "on the fallback key", "fb-00001"), bob)
    world.deliver("alice-phone", env)
    kind, ciphertext = envelope.unpack(env.data, "alice")
    peer = world.record("alice-phone")
    assert (
        b"on the fallback key"
        in SessionStore().decrypt(bob.device, peer, kind, ciphertext, now_ms()).plaintext
    )
    bob.publish(50, has_fallback=False)
    bob.publish(50, has_fallback=False)
    with pytest.raises(UndecryptableMessage):
        SessionStore().decrypt(bob.device, peer, kind, ciphertext, now_ms())


def test_post_compromise_a_copied_device_cannot_read_after_both_sides_sent(
    world: World,
) -> None:
    alice, bob = world["alice-phone"], world["bob-phone"]
    world.deliver(
        "alice-phone", envelope_for(world.send("alice-phone", "bob", "hi", "pc-00001"), bob)
    )
    world.deliver(
        "bob-phone", envelope_for(world.send("bob-phone", "alice", "hey", "pc-00002"), alice)
    )
    stolen = world.root / "stolen"
    shutil.copytree(bob.key_path.parent, stolen)
    copy = Party("bob", stolen / bob.key_path.name, stolen, world.directory)
    peer = world.record("alice-phone")

    before = envelope_for(world.send("alice-phone", "bob", "still readable", "pc-00003"), bob)
    kind, ciphertext = envelope.unpack(before.data, "alice")
    assert (
        b"still readable"
        in copy.store.decrypt(copy.device, peer, kind, ciphertext, now_ms()).plaintext
    )

    world.deliver("alice-phone", before)
    world.deliver(
        "bob-phone", envelope_for(world.send("bob-phone", "alice", "ok", "pc-00004"), alice)
    )
    after = envelope_for(world.send("alice-phone", "bob", "healed", "pc-00005"), bob)
    kind, ciphertext = envelope.unpack(after.data, "alice")
    with pytest.raises(UndecryptableMessage):
        copy.store.decrypt(copy.device, peer, kind, ciphertext, now_ms())
    assert world.deliver("alice-phone", after).delivery.record.body == "healed"


def test_a_one_time_key_handed_out_twice_starts_one_session_only(world: World) -> None:
    world.directory.reuse_one_time_keys = True
    bob = world["bob-phone"]
    first = envelope_for(world.send("alice-phone", "bob", "one", "otk-0001"), bob)
    second = envelope_for(world.send("alice-laptop", "bob", "two", "otk-0002"), bob)
    assert world.deliver("alice-phone", first).delivery.record.body == "one"
    with pytest.raises(UndecryptableMessage) as err:
        world.deliver("alice-laptop", second)
    assert str(err.value) == (
        f"a message from alice's device {world['alice-laptop'].device_id} could not be "
        "decrypted and was dropped: it starts a session with a one-time key that is unknown or "
        "already used (the server may be replaying it, or handing out a key twice)"
    )


def test_a_fallback_key_handed_out_again_and_again_shows_each_message_once(world: World) -> None:
    world.directory.only_fallback = True
    bob = world["bob-phone"]
    envs = [
        envelope_for(world.send(sender, "bob", f"via fallback {i}", f"fbk-000{i}"), bob)
        for i, sender in enumerate(("alice-phone", "alice-laptop"))
    ]
    for i, (sender, env) in enumerate(zip(("alice-phone", "alice-laptop"), envs, strict=True)):
        assert world.deliver(sender, env).delivery.record.body == f"via fallback {i}"
    with pytest.raises(UndecryptableMessage, match="it was already decrypted once, or altered"):
        world.deliver("alice-phone", envs[0])
    # Even with its sessions lost, the replayed pre-key message starts no session and is refused.
    bob.store = SessionStore()
    with pytest.raises(ReplayedRecord):
        world.deliver("alice-phone", envs[0])
    assert bob.store.session_count(world.record("alice-phone")) == 0


def test_a_replayed_message_is_refused_across_a_restart(world: World) -> None:
    bob = world["bob-phone"]
    env = envelope_for(world.send("alice-phone", "bob", "once", "rp-00001"), bob)
    world.deliver("alice-phone", env)
    bob.load()
    with pytest.raises(UndecryptableMessage):
        world.deliver("alice-phone", env)


def test_drops_and_reordering_by_the_server_are_shown(world: World) -> None:
    bob = world["bob-phone"]
    envs = [
        envelope_for(world.send("alice-phone", "bob", f"m{i}", f"order-0{i}"), bob)
        for i in range(1, 6)
    ]
    got = [world.deliver("alice-phone", envs[i]).delivery for i in (0, 3, 1)]
    assert [d.arrival for d in got] == [Arrival.IN_ORDER, Arrival.GAP, Arrival.OUT_OF_ORDER]
    assert got[1].notice("bob") == "2 messages from alice are missing"
    assert got[2].notice("bob") == "(arrived out of order)"
    assert bob.tracker.missing("alice", world["alice-phone"].device_id) == 1
    bob.load()  # the record of what is missing survives a restart
    late = world.deliver("alice-phone", envs[2]).delivery
    assert (late.arrival, late.record.body) == (Arrival.OUT_OF_ORDER, "m3")
    last = world.deliver("alice-phone", envs[4]).delivery
    assert last.arrival is Arrival.IN_ORDER


def test_a_single_drop_says_a_message_is_missing(world: World) -> None:
    laptop = world["alice-laptop"]
    envs = [
        envelope_for(world.send("alice-phone", "bob", f"m{i}", f"drop-00{i}"), laptop)
        for i in range(1, 4)
    ]
    world.deliver("alice-phone", envs[0])
    delivery = world.deliver("alice-phone", envs[2]).delivery
    phone_id = world["alice-phone"].device_id
    assert delivery.notice("alice") == f"a message you sent from device {phone_id} is missing"
    bob = world["bob-phone"]
    envs = [
        envelope_for(world.send("alice-phone", "bob", f"m{i}", f"drop-10{i}"), bob)
        for i in range(1, 4)
    ]
    world.deliver("alice-phone", envs[0])
    assert world.deliver("alice-phone", envs[2]).delivery.notice("bob") == (
        "a message from alice is missing"
    )


def test_envelopes_swapped_between_devices_or_users_are_refused(world: World) -> None:
    envs = world.send("alice-phone", "bob", "for bob's phone", "swap-001")
    to_phone = envelope_for(envs, world["bob-phone"])
    for wrong in (world["bob-laptop"], world["alice-laptop"]):
        with pytest.raises(UndecryptableMessage):
            world.deliver("alice-phone", to_phone, to=wrong)
    # Stamped as from bob, with alice's device record: refused before decrypting.
    bob = world["bob-phone"]
    with pytest.raises(EnvelopeError, match="came with a device of another user"):
        envelope.open_envelope(
            bob.store,
            bob.device,
            bob.tracker,
            "bob",
            world.record("alice-phone"),
            to_phone.data,
            now_ms(),
        )
    assert world.deliver("alice-phone", to_phone).delivery.record.body == "for bob's phone"


def test_a_version_1_envelope_is_refused_as_a_downgrade(world: World) -> None:
    bob = world["bob-phone"]
    with pytest.raises(EnvelopeError) as err:
        envelope.open_envelope(
            bob.store,
            bob.device,
            bob.tracker,
            "alice",
            world.record("alice-phone"),
            b"\x01" + bytes(60),
            now_ms(),
        )
    assert str(err.value) == (
        "a direct message from alice uses envelope version 1, but this conversation uses "
        "version 2 only; it was dropped (an old client, or a server trying to downgrade the "
        "encryption)"
    )


def test_a_broken_session_is_replaced_with_a_visible_note(world: World) -> None:
    alice, bob = world["alice-phone"], world["bob-phone"]
    world.deliver(
        "alice-phone", envelope_for(world.send("alice-phone", "bob", "a", "wedge-01"), bob)
    )
    snapshot = storage.sessions_path(bob.identity).read_bytes()
    world.deliver(
        "bob-phone", envelope_for(world.send("bob-phone", "alice", "b", "wedge-02"), alice)
    )
    world.deliver(
        "alice-phone", envelope_for(world.send("alice-phone", "bob", "c", "wedge-03"), bob)
    )
    storage.sessions_path(bob.identity).write_bytes(snapshot)  # an old backup comes back
    bob.load()
    with pytest.raises(UndecryptableMessage) as err:
        world.deliver(
            "alice-phone", envelope_for(world.send("alice-phone", "bob", "d", "wedge-04"), bob)
        )
    assert err.value.wedged and (err.value.user, err.value.device_id) == ("alice", alice.device_id)
    assert bob.store.needs_session(world.record("alice-phone"))
    bob.load()  # the mark survives a restart
    world.deliver(
        "bob-phone", envelope_for(world.send("bob-phone", "alice", "e", "wedge-05"), alice)
    )
    assert bob.notes == [
        f"the secure session with alice's device {alice.device_id} had broken; a new one was "
        "started (messages sent over the old one may be lost)"
    ]
    assert alice.notes == [f"bob's device {bob.device_id} started a new secure session with you"]
    healed = world.deliver(
        "alice-phone", envelope_for(world.send("alice-phone", "bob", "f", "wedge-06"), bob)
    )
    assert healed.delivery.record.body == "f"


def test_a_revoked_device_gets_no_more_messages(world: World) -> None:
    laptop = world["alice-laptop"]
    revocation = records.sign_revocation(world.keys["alice"], "alice", laptop.device_id, now_ms())
    world.directory.revocations["alice"] = [revocation.to_wire()]
    envs = world.send("bob-phone", "alice", "not for the laptop", "rev-0001")
    assert {e.recipient_device for e in envs} == {
        world["alice-phone"].device_id,
        world["bob-laptop"].device_id,
    }
    envs = world.send("alice-phone", "bob", "nor this", "rev-0002")
    assert laptop.device_id not in {e.recipient_device for e in envs}


def test_a_revocation_the_server_signed_itself_is_ignored(world: World, make_identity) -> None:
    laptop = world["alice-laptop"]
    forged = records.sign_revocation(make_identity("mallory"), "alice", laptop.device_id, 1)
    world.directory.revocations["alice"] = [forged.to_wire()]
    listing = world["bob-phone"].devices_of("alice", world.pins["alice"])
    assert laptop.device_id in {d.device_id for d in listing.devices}
    assert len(listing.refused) == 1


def test_a_damaged_saved_session_is_dropped_with_a_note_and_replaced(world: World) -> None:
    bob = world["bob-phone"]
    world.deliver(
        "alice-phone", envelope_for(world.send("alice-phone", "bob", "a", "dmg-0001"), bob)
    )
    state = bob.store.export(atrest.pickle_key(bob.identity))
    entry = state["peers"][0]
    entry["sessions"] = [entry["sessions"][0][:-8] + "AAAAAAAA"]
    data = atrest.seal_state(
        bob.identity, storage.SESSIONS_FORMAT, atrest.PURPOSE_SESSIONS_FILE, state
    )
    storage.sessions_path(bob.identity).write_bytes(data)
    bob.load()
    device_id = entry["device_id"]
    assert bob.notes == [
        f"the saved secure session with {entry['user']}'s device {device_id} was damaged; a new "
        "one will be started"
    ]
    assert bob.store.needs_session(world.by_device(device_id).record())


def test_a_tampered_session_file_is_refused(world: World) -> None:
    bob = world["bob-phone"]
    world.deliver(
        "alice-phone", envelope_for(world.send("alice-phone", "bob", "a", "tmp-0001"), bob)
    )
    path = storage.sessions_path(bob.identity)
    raw = bytearray(path.read_bytes())
    at = raw.index(b'"sealed": "') + 30
    raw[at] = ord("A") if raw[at] != ord("A") else ord("B")
    path.write_bytes(bytes(raw))
    with pytest.raises(DeviceStateError) as err:
        storage.load_sessions(bob.identity)
    assert str(err.value) == (
        f"the session file {path} is damaged or was altered (it does not open with your key)"
    )


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from([0, 1]), garbage=st.binary(max_size=400))
def test_garbage_from_the_server_is_only_ever_undecryptable(world: World, kind, garbage) -> None:
    bob, peer = world["bob-phone"], world.record("alice-phone")
    try:
        bob.store.decrypt(bob.device, peer, kind, garbage, now_ms())
    except UndecryptableMessage as exc:
        assert exc.user == "alice"
    else:
        pytest.fail("garbage decrypted")


def test_a_device_the_server_adds_for_bob_gets_nothing_and_is_warned_about(
    world: World, make_identity
) -> None:
    planted = records.sign_device(make_identity("mallory"), "bob", Device.create())
    world.directory.records["bob"].append(planted.to_wire())
    envs = world.send("alice-phone", "bob", "not for mallory", "plant-01")
    assert planted.device_id not in {e.recipient_device for e in envs}
    assert len(envs) == 3
    listing = world["alice-phone"].devices_of("bob", world.pins["bob"])
    assert listing.refused == (
        f"a device record for bob ({planted.device_id}) is signed by a key that is not the one "
        "you pinned for bob; it was refused. The server may be adding a device of its own",
    )
