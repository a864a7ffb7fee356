"""The client's room layer without a network: two real devices (real key files, vodozemac Olm and
Megolm), the server's device directory as a request function, and the frames between them fed
in by hand: key shares routed to the room keys, never to the chat; the OlmPort adapter; the room
state file; frames that are not well formed."""

from __future__ import annotations

import base64
import json
import stat
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import pytest

from securechat.client.dm import DeviceState, DirectMessages
from securechat.client.events import (
    DirectMessage,
    Event,
    FrameDropped,
    Joined,
    Message,
    Parted,
    RoomKeyRecord,
    RoomState,
    RoomUnreadable,
    RoomWarning,
)
from securechat.client.rooms import EncryptedRooms
from securechat.e2e import inner, records, storage
from securechat.errors import DeviceStateError
from securechat.megolm.errors import RoomCryptoError
from securechat.megolm.keyshare import KeyRequest, encode
from securechat.trust import KnownKeys, known_keys_path

from .olm_helpers import PrekeyDirectory


@dataclass
class Device:
    """One logged-in device: its DM layer, its room layer and what it was told."""

    user: str
    state: DeviceState
    dms: DirectMessages
    rooms: EncryptedRooms
    events: list[Event]
    said: list[dict[str, Any]]  # the room requests it made (say_encrypted)
    sent: list[dict[str, Any]]  # every dm frame any device asked for, in order

    def say(self, ftype: str, **fields: Any) -> Future[dict[str, Any]]:
        self.said.append({"type": ftype, **fields})
        future: Future[dict[str, Any]] = Future()
        future.set_result({"room": fields.get("room"), "ts": 1})
        return future


@pytest.fixture
def directory() -> PrekeyDirectory:
    return PrekeyDirectory()


@pytest.fixture
def net(make_identity, directory: PrekeyDirectory) -> Callable[[str], Device]:
    sent: list[dict[str, Any]] = []
    made: dict[str, Device] = {}

    def device(user: str) -> Device:
        ident = make_identity(user)
        assert ident.path is not None
        state = DeviceState(ident, user)
        events: list[Event] = []
        known = KnownKeys(known_keys_path(ident.path))
        server = directory.server_for(user, state.device_id, ident.verify_key_bytes, sent)
        dms = DirectMessages(state, known, server, events.append)
        dms.publish()
        rooms = EncryptedRooms(dms, known, events.append)
        made[user] = Device(user, state, dms, rooms, events, [], sent)
        return made[user]

    return device


def in_room(room: str, *devices: Device) -> None:
    """Each device joined `room` and saw the others in its member list."""
    names = [d.user for d in devices]
    for d in devices:
        d.rooms.joined_reply({"room": room, "mode": "encrypted", "members": names})


def deliver(frame: dict[str, Any], to: Device) -> Event | RoomKeyRecord | Any:
    """A `dm` frame as the server hands it to its recipient."""
    return to.dms.receive(
        {
            "type": "dm",
            "from": frame["from"],
            "from_device": frame["from_device"],
            "data": frame["data"],
            "msg_id": frame["msg_id"],
        }
    )


def relay(say: dict[str, Any], sender: Device, *, history: bool = False) -> dict[str, Any]:
    """A say_encrypted as the server relays it (stamped with the sender and device)."""
    frame = {
        "type": "message_encrypted",
        "room": say["room"],
        "from": sender.user,
        "device": sender.state.device_id,
        "session_id": say["session_id"],
        "ciphertext": say["ciphertext"],
        "ts": 7,
    }
    return {**frame, "history": True} if history else frame


def key_dms(sent: list[dict[str, Any]], to: Device) -> list[dict[str, Any]]:
    return [f for f in sent if f["user"] == to.user and f["device"] == to.state.device_id]


def test_a_room_key_travels_as_a_one_device_dm_and_reaches_the_room_keys_not_the_chat(
    net,
) -> None:
    alice, bob = net("alice"), net("bob")
    in_room("#team", alice, bob)
    alice.rooms.send("#team", "hello bob", alice.say)
    [share] = key_dms(alice.sent, bob)
    assert share["to"] == "bob"  # one device, no copies to our own devices
    routed = deliver(share, bob)
    assert isinstance(routed, RoomKeyRecord)
    assert (routed.sender, routed.sender_device) == ("alice", alice.state.device_id)
    assert json.loads(routed.body)["kind"] == "room_key"
    assert not any(isinstance(e, DirectMessage) for e in bob.events)
    bob.rooms.receive_key(routed)
    [say] = alice.said
    assert say["type"] == "say_encrypted" and "hello bob" not in json.dumps(say)
    shown = bob.rooms.message(relay(say, alice))
    assert shown == [
        Message("#team", "alice", "hello bob", 7, False, False, True, alice.state.device_id)
    ]


def test_the_inner_record_kind_room_key_round_trips_and_unknown_kinds_are_refused() -> None:
    record = inner.InnerRecord(
        "alice", "A" * 16, "bob", "B" * 16, "message-id-1", 1, "{}", "0" * 16, 1, "", "room_key"
    )
    assert inner.decode(inner.encode(record)).kind == inner.ROOM_KEY_KIND
    assert {"dm", "sas", "room_key"} == inner.RECORD_KINDS


def test_the_port_lists_checked_devices_from_memory_with_revoked_ones_flagged(
    net, directory: PrekeyDirectory
) -> None:
    alice, bob = net("alice"), net("bob")
    port = alice.rooms.port
    assert port.devices("bob") == []  # nothing fetched yet: nothing known, nothing asked
    alice.dms.devices_of("bob")
    [listed] = port.devices("bob")
    assert (listed.user, listed.device_id, listed.revoked) == ("bob", bob.state.device_id, False)
    assert listed.identity_key == bob.state.identity.verify_key_bytes
    directory.revocations["bob"] = [
        records.sign_revocation(bob.state.identity, "bob", bob.state.device_id, 5).to_wire()
    ]
    alice.dms.devices_of("bob")
    [gone] = port.devices("bob")
    assert (gone.device_id, gone.revoked) == (bob.state.device_id, True)


def test_a_key_request_from_a_sibling_is_answered_and_one_from_someone_else_refused(
    net, make_identity
) -> None:
    alice, bob = net("alice"), net("bob")
    in_room("#team", alice, bob)
    alice.rooms.send("#team", "hi", alice.say)
    bob.rooms.receive_key(
        RoomKeyRecord("alice", alice.state.device_id, encode(KeyRequest("#team")).decode())
    )
    [refused] = [e for e in bob.events if isinstance(e, RoomWarning)]
    assert (refused.kind, refused.room) == ("key_refused", "#team")
    assert refused.detail == (
        f"a request for the keys of #team from alice/{alice.state.device_id} was refused: "
        "alice is not you; only your own devices exchange room keys"
    )


def test_joins_and_parts_decide_who_gets_keys(net) -> None:
    alice, bob, carol = net("alice"), net("bob"), net("carol")
    in_room("#team", alice, bob)
    shown: list[Event] = []
    alice.rooms.joined(Joined("#team", "carol", 1), carol.state.device_id, shown.append)
    assert shown == [Joined("#team", "carol", 1)]
    alice.rooms.send("#team", "hi both", alice.say)
    assert key_dms(alice.sent, carol)
    alice.rooms.parted(Parted("#team", "carol", "left", 2), carol.state.device_id, shown.append)
    before = len(key_dms(alice.sent, carol))
    alice.rooms.send("#team", "carol left", alice.say)
    assert len(key_dms(alice.sent, carol)) == before
    assert alice.said[0]["session_id"] != alice.said[1]["session_id"]  # rotated on the part
    assert [m.user for m in alice.rooms.members("#team")] == ["alice", "bob"]


def test_the_room_state_is_saved_beside_the_key_and_reloaded(net, make_identity) -> None:
    alice, bob = net("alice"), net("bob")
    in_room("#team", alice, bob)
    state = bob.rooms.set_strict("#team", True)
    assert (state.room, state.mode, state.strict) == ("#team", "encrypted", True)
    alice.rooms.send("#team", "kept", alice.say)
    [share] = key_dms(alice.sent, bob)
    key = deliver(share, bob)
    assert isinstance(key, RoomKeyRecord)
    bob.rooms.receive_key(key)
    frame = relay(alice.said[0], alice)
    assert [m.text for m in bob.rooms.message(frame) if isinstance(m, Message)] == ["kept"]
    path = storage.rooms_path(bob.state.identity)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert b"#team" not in path.read_bytes() and b"kept" not in path.read_bytes()
    again = EncryptedRooms(bob.dms, bob.dms.known_keys, bob.events.append)
    assert again.strict("#team") and again.mode("#team") is not None
    [refused] = again.message(frame)
    assert isinstance(refused, RoomWarning) and refused.kind == "replayed"
    # As history the same message shows again: it is the one already read, not a replay.
    [shown] = again.message({**frame, "history": True})
    assert isinstance(shown, Message) and (shown.text, shown.history) == ("kept", True)


def test_a_room_state_file_of_another_identity_is_refused(net, make_identity) -> None:
    bob = net("bob")
    in_room("#team", bob)
    other = make_identity("mallory")
    assert other.path is not None
    storage.rooms_path(other).write_bytes(storage.rooms_path(bob.state.identity).read_bytes())
    storage.rooms_path(other).chmod(0o600)
    with pytest.raises(DeviceStateError, match="belongs to another identity key"):
        storage.load_rooms(other)


def test_strict_and_sending_need_an_encrypted_room(net) -> None:
    alice = net("alice")
    alice.rooms.joined_reply({"room": "#open", "mode": "plain", "members": ["alice"]})
    [state] = [e for e in alice.events if isinstance(e, RoomState)]
    assert (state.mode, state.label, state.members) == ("plain", "not end-to-end encrypted", ())
    with pytest.raises(RoomCryptoError, match=r"^#open is not end-to-end encrypted; strict"):
        alice.rooms.set_strict("#open", True)
    with pytest.raises(RoomCryptoError, match=r"^#open is not end-to-end encrypted$"):
        alice.rooms.send("#open", "x", alice.say)


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"room": "@bob"}, "for something that is not an encrypted room"),
        ({"room": "#lobby"}, "for something that is not an encrypted room"),
        ({"from": "Bob!"}, "in #team from something that is not a user name"),
        ({"device": "x y"}, "in #team from alice with a malformed device id"),
        ({"session_id": ""}, "in #team from alice with a malformed session id"),
        ({"session_id": "a" * 129}, "in #team from alice with a malformed session id"),
        ({"ciphertext": "not base64!"}, "in #team from alice whose ciphertext is not base64"),
        ({"ciphertext": 5}, "in #team from alice whose ciphertext is not base64"),
    ],
)
def test_a_malformed_encrypted_room_frame_is_dropped_with_its_reason(net, change, why) -> None:
    alice = net("alice")
    frame = {
        "type": "message_encrypted",
        "room": "#team",
        "from": "alice",
        "device": alice.state.device_id,
        "session_id": "c2Vzc2lvbg",
        "ciphertext": base64.b64encode(b"x" * 40).decode(),
        "ts": 1,
    }
    assert alice.rooms.message({**frame, **change}) == [
        FrameDropped(
            "message_encrypted",
            f"the server sent an encrypted room message {why}; it was dropped",
        )
    ]


def test_a_downgrade_announced_by_the_server_is_refused_once_and_shown(net) -> None:
    alice = net("alice")
    in_room("#team", alice)
    assert alice.rooms.observe_mode("#team", "plain") is not None
    assert alice.rooms.observe_mode("#team", "plain").value == "encrypted"  # type: ignore[union-attr]
    downgrades = [e for e in alice.events if isinstance(e, RoomWarning) and e.kind == "downgrade"]
    assert len(downgrades) == 1  # each warning once per room
    plain = Message("#team", "mallory", "in clear", 1)
    refused = alice.rooms.check_plaintext(plain)
    assert isinstance(refused, RoomWarning) and refused.kind == "downgrade"
    assert alice.rooms.check_plaintext(Message("#other", "bob", "fine", 1)) == Message(
        "#other", "bob", "fine", 1
    )


def shared(alice: Device, bob: Device, text: str) -> dict[str, Any]:
    """alice says `text` in #team and bob holds its key; the frame the server would relay."""
    in_room("#team", alice, bob)
    alice.rooms.send("#team", text, alice.say)
    for share in key_dms(alice.sent, bob):
        key = deliver(share, bob)
        assert isinstance(key, RoomKeyRecord)
        bob.rooms.receive_key(key)
    return relay(alice.said[-1], alice)


def test_an_altered_room_message_is_refused_visibly(net) -> None:
    alice, bob = net("alice"), net("bob")
    frame = shared(alice, bob, "intact")
    raw = bytearray(base64.b64decode(frame["ciphertext"]))
    raw[-70] ^= 1  # inside the ciphertext, under the MAC and the signature
    altered = {**frame, "ciphertext": base64.b64encode(bytes(raw)).decode()}
    [refused] = bob.rooms.message(altered)
    assert isinstance(refused, RoomWarning)
    assert (refused.kind, refused.user) == ("tampered", "alice")
    assert refused.detail == (
        "an encrypted message from alice in #team was dropped: its signature or ciphertext "
        "does not verify"
    )
    [shown] = bob.rooms.message(frame)  # the real one still reads
    assert isinstance(shown, Message) and shown.text == "intact"


def test_a_message_from_a_device_revoked_since_is_refused_visibly(
    net, directory: PrekeyDirectory
) -> None:
    alice, bob = net("alice"), net("bob")
    frame = shared(alice, bob, "before the revocation")
    directory.revocations["alice"] = [
        records.sign_revocation(alice.state.identity, "alice", alice.state.device_id, 5).to_wire()
    ]
    bob.dms.devices_of("alice")
    [refused] = bob.rooms.message(frame)
    assert isinstance(refused, RoomWarning) and refused.kind == "untrusted_device"
    assert refused.detail == (
        f"a message from alice in #team was dropped: device {alice.state.device_id} of alice "
        "was revoked"
    )


def test_revoking_one_of_our_devices_starts_a_new_session_in_every_room(net) -> None:
    alice, bob = net("alice"), net("bob")
    in_room("#team", alice, bob)
    alice.rooms.send("#team", "one", alice.say)
    alice.rooms.send("#team", "two", alice.say)
    alice.rooms.rotate_all()
    alice.rooms.send("#team", "three", alice.say)
    first, second, third = (s["session_id"] for s in alice.said)
    assert first == second != third
    assert len(key_dms(alice.sent, bob)) == 2  # the new session's key went to bob too


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ("not json", "it is not valid JSON"),
        (
            json.dumps({"v": 1, "kind": "room_key_request", "room": "team"}),
            "its room name is malformed",
        ),
    ],
)
def test_a_key_message_whose_room_cannot_be_read_says_what_follows_and_what_to_do(
    net, body: str, why: str
) -> None:
    alice, bob = net("alice"), net("bob")
    device = alice.state.device_id
    bob.rooms.receive_key(RoomKeyRecord("alice", device, body))
    assert bob.events == [
        RoomWarning(
            "",
            "key_refused",
            f"a room key message from alice/{device} was refused: {why}. Which room it was for "
            "cannot be read, so messages it should open will show as unreadable. Ask alice to "
            f"update securechat on device {device}; if alice did not send it, compare safety "
            "numbers: /verify alice",
            "alice",
        )
    ]


# -- keys that come after their messages ----------------------------------------------------------


def unreadable(events: list[Event]) -> list[str]:
    return [e.reason for e in events if isinstance(e, RoomUnreadable)]


def test_live_messages_whose_key_comes_late_are_shown_once_it_does_marked_late(net) -> None:
    alice, bob = net("alice"), net("bob")
    in_room("#team", alice, bob)
    bob.events.clear()
    for text in ("one", "two"):
        alice.rooms.send("#team", text, alice.say)
    markers = [bob.rooms.message(relay(say, alice)) for say in alice.said]
    assert [unreadable(m) for m in markers] == [["no_key"], ["no_key"]]
    [share] = key_dms(alice.sent, bob)
    routed = deliver(share, bob)
    bob.rooms.receive_key(routed)
    device = alice.state.device_id
    assert bob.events == [
        RoomWarning(
            "#team",
            "keys",
            "the key for 2 messages from alice in #team came after them; they follow, marked late",
        ),
        Message("#team", "alice", "one", 7, False, False, True, device, late=True),
        Message("#team", "alice", "two", 7, False, False, True, device, late=True),
    ]
    # Opened once: the same key again shows nothing, and the next message is not late.
    bob.events.clear()
    bob.rooms.receive_key(routed)
    alice.rooms.send("#team", "three", alice.say)
    assert bob.rooms.message(relay(alice.said[-1], alice)) == [
        Message("#team", "alice", "three", 7, False, False, True, device)
    ]
    assert [e for e in bob.events if isinstance(e, Message)] == []


def test_history_entries_without_a_key_are_not_held_for_later(net) -> None:
    alice, bob = net("alice"), net("bob")
    in_room("#team", alice, bob)
    alice.rooms.send("#team", "old", alice.say)
    bob.rooms.message(relay(alice.said[0], alice, history=True))  # counted, not shown alone
    bob.events.clear()
    [share] = key_dms(alice.sent, bob)
    bob.rooms.receive_key(deliver(share, bob))
    assert bob.events == []
