"""The small pure parts of encrypted rooms: the inner record, key-share payloads, rotation policy,
room modes and saved state. Known bytes where a format is fixed; exact refusals for bad input."""

from __future__ import annotations

import base64
import json

import pytest
import vodozemac

from securechat.megolm import keyshare, record
from securechat.megolm.envelope import MAX_CIPHERTEXT
from securechat.megolm.errors import (
    InvalidRoomRecord,
    KeyShareRefused,
    RoomStateError,
    TamperedRoomMessage,
)
from securechat.megolm.mode import RoomMode, RoomModes
from securechat.megolm.port import DeviceRef
from securechat.megolm.rotation import RotationPolicy, RotationReason, SessionUse, rotation_reason

REC = record.RoomRecord("#team", "alice", "dev1", "m" * 22, 1_700_000_000_000, "hi")
KNOWN = (
    b'{"body":"hi","device":"dev1","from":"alice","id":"mmmmmmmmmmmmmmmmmmmmmm","kind":"room",'
    b'"room":"#team","ts":1700000000000,"v":1}'
)


# -- the inner record ---------------------------------------------------------------------------


def test_the_record_has_one_known_encoding_padded_with_spaces_to_256_bytes() -> None:
    padded = record.encode(REC)
    assert padded == KNOWN + b" " * (256 - len(KNOWN))
    assert record.decode(padded, "here") == REC


def test_a_me_line_is_the_same_record_of_kind_room_action() -> None:
    action = record.RoomRecord(**{**REC.__dict__, "body": "waves", "action": True})
    padded = record.encode(action)
    known = KNOWN.replace(b'"hi"', b'"waves"').replace(b'"room",', b'"room_action",')
    assert padded == known + b" " * (256 - len(known))
    assert record.decode(padded, "here") == action
    assert record.decode(record.encode(REC), "here").action is False


@pytest.mark.parametrize(
    ("size", "bucket"),
    [(1, 256), (256, 256), (257, 512), (16384, 16384), (16385, 16640), (48_000, 48_128)],
)
def test_size_buckets(size: int, bucket: int) -> None:
    assert record.bucket(size) == bucket


def test_the_largest_record_fits_a_64_kib_frame_as_base64_megolm() -> None:
    longest = ("#" + "a" * 31, "b" * 32, "D" * 64, "x" * 64)
    worst = record.RoomRecord(*longest, 2**53 - 1, "\x01" * 8000)
    padded = record.encode(worst)
    assert len(padded) == record.MAX_PADDED
    ciphertext = vodozemac.GroupSession().encrypt(padded).to_bytes()
    assert len(ciphertext) <= MAX_CIPHERTEXT
    assert len(base64.b64encode(ciphertext)) <= 64 * 1024 - 800


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"room": "team"}, "the room name is malformed"),
        ({"sender": "Alice"}, "the sender name is malformed"),
        ({"device": "a/b"}, "the device id is malformed"),
        ({"message_id": "short"}, "the message id is malformed"),
        ({"ts": -1}, "the timestamp is out of range"),
        ({"body": "  "}, "the text is empty, not text, or longer than 8000 characters"),
        ({"body": "\ud800"}, "the text holds characters that are not valid Unicode"),
    ],
)
def test_a_bad_record_is_refused_before_encryption(change: dict[str, object], why: str) -> None:
    bad = record.RoomRecord(**{**REC.__dict__, **change})  # type: ignore[arg-type]
    with pytest.raises(InvalidRoomRecord) as caught:
        record.encode(bad)
    assert str(caught.value) == f"cannot encrypt a room message: {why}"


@pytest.mark.parametrize(
    ("plaintext", "why"),
    [
        (KNOWN + b" " * 10, "its padding is wrong"),
        (KNOWN.replace(b'"hi"', b'"hi" ').ljust(256), "its record is not in canonical form"),
        (b"{".ljust(256), "its record is not valid JSON"),
        (KNOWN.replace(b'"v":1', b'"v":2').ljust(256), "its record has an unknown version"),
        (KNOWN.replace(b'"room",', b'"dm",').ljust(256), "its record is not a room message"),
        (b'{"v":1}'.ljust(256), "its record does not have the expected fields"),
        (
            KNOWN.replace(b'"room",', b'"Room_action",').ljust(256),
            "its record is not a room message",
        ),
        (KNOWN.replace(b'"room",', b"true,").ljust(256), "its record is not a room message"),
        (KNOWN.replace(b'"room",', b'["room"],').ljust(256), "its record is not a room message"),
        (
            KNOWN.replace(b'{"body"', b'{"action":true,"body"').ljust(256),
            "its record does not have the expected fields",
        ),
        (KNOWN.replace(b"1700000000000", b"NaN").ljust(256), "its record is not valid JSON"),
    ],
)
def test_a_malformed_record_inside_a_message_is_refused(plaintext: bytes, why: str) -> None:
    with pytest.raises(TamperedRoomMessage) as caught:
        record.decode(plaintext, "from bob in #team")
    assert str(caught.value) == f"an encrypted message from bob in #team was dropped: {why}"


# -- key-share payloads -------------------------------------------------------------------------

BOB = DeviceRef("bob", "dev1")


def test_a_room_key_round_trips_and_never_prints_its_key() -> None:
    session = vodozemac.GroupSession()
    key = keyshare.RoomKey("#team", BOB, session.session_id, session.session_key.to_base64(), 0)
    data = keyshare.encode(key)
    assert json.loads(data)["kind"] == "room_key"
    assert keyshare.parse(data, BOB) == key
    assert session.session_key.to_base64() not in repr(key)
    request = keyshare.encode(keyshare.KeyRequest("#team"))
    assert request == b'{"kind":"room_key_request","room":"#team","v":1}'
    assert keyshare.parse(request, BOB) == keyshare.KeyRequest("#team")


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ({"kind": "room_key", "v": 1}, "it is not a room key, a forwarded key or a key request"),
        ({"kind": "room_key_request", "room": "team", "v": 1}, "its room name is malformed"),
        ({"kind": "room_key_request", "room": "#t", "v": 2}, "it has an unknown format"),
    ],
)
def test_a_malformed_key_message_is_refused(fields: dict[str, object], why: str) -> None:
    with pytest.raises(KeyShareRefused) as caught:
        keyshare.parse(json.dumps(fields).encode(), BOB)
    assert str(caught.value) == f"a room key message from bob/dev1 was refused: {why}"


def test_a_room_key_whose_session_id_or_index_lies_is_refused() -> None:
    from securechat.megolm.inbound import InboundStore

    session = vodozemac.GroupSession()
    good = keyshare.RoomKey("#team", BOB, session.session_id, session.session_key.to_base64(), 0)
    store = InboundStore()
    other = vodozemac.GroupSession().session_id
    for bad, why in [
        (good.__class__(**{**good.__dict__, "session_id": other}), "does not match its session id"),
        (good.__class__(**{**good.__dict__, "first_index": 5}), "does not start at the index"),
        (good.__class__(**{**good.__dict__, "session_key": "AAAA"}), "does not decode"),
    ]:
        with pytest.raises(KeyShareRefused, match=why):
            store.add(bad)
    assert store.add(good) is True
    assert store.add(good) is False  # nothing new


# -- rotation policy ----------------------------------------------------------------------------

A1, A2, B1 = DeviceRef("a", "1"), DeviceRef("a", "2"), DeviceRef("b", "1")
T = 1_000_000.0


@pytest.mark.parametrize(
    ("use", "recipients", "now", "reason"),
    [
        (SessionUse(T, 5, frozenset({A1, B1})), {A1, B1}, T + 60, None),
        (SessionUse(T, 5, frozenset({A1, B1})), {A1, B1, A2}, T, None),  # a join: no rotation
        (SessionUse(T, 5, frozenset({A1, B1})), {A1}, T, RotationReason.MEMBER_LEFT),
        (SessionUse(T, 5, frozenset({A1, A2, B1})), {A1, B1}, T, RotationReason.DEVICE_REMOVED),
        (SessionUse(T, 100, frozenset({A1})), {A1}, T, RotationReason.MESSAGES),
        (SessionUse(T, 99, frozenset({A1})), {A1}, T + 7 * 86400 - 1, None),
        (SessionUse(T, 99, frozenset({A1})), {A1}, T + 7 * 86400, RotationReason.AGE),
        (SessionUse(T, 1, frozenset({A1})), {A1}, T - 1, RotationReason.AGE),  # clock went back
    ],
)
def test_rotation_policy(
    use: SessionUse, recipients: set[DeviceRef], now: float, reason: RotationReason | None
) -> None:
    assert rotation_reason(use, recipients, now, RotationPolicy()) is reason


# -- modes and saved state ----------------------------------------------------------------------


def test_room_modes_save_and_load_and_refuse_damage() -> None:
    modes = RoomModes()
    modes.observe("#team", RoomMode.ENCRYPTED)
    modes.observe("#lobby", RoomMode.PLAIN)
    assert modes.export() == {"#lobby": "plain", "#team": "encrypted"}
    loaded = RoomModes.load(modes.export())
    assert loaded.mode("#team") is RoomMode.ENCRYPTED
    assert RoomMode.PLAIN.label() == "not end-to-end encrypted"
    with pytest.raises(RoomStateError, match=r"damaged \(room modes\)"):
        RoomModes.load({"#team": "maybe"})
