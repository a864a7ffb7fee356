"""The payloads room keys travel in, inside Olm messages between devices, in canonical JSON.

    room key        {"device","first_index","kind":"room_key","room","sender","session_id",
                     "session_key","v":1}
    forwarded key   the same fields with "kind":"forwarded_room_key"; "sender"/"device" name the
                    session's original owner, and "session_key" is an export at "first_index"
    key request     {"kind":"room_key_request","room","v":1}

A room key must name its own Olm sender as "sender"/"device"; a forwarded key is accepted only
from a device of our own identity. Parsing checks every field: these bytes come from another
device and, before Olm, from the network.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from securechat.canonical import canonical_json
from securechat.megolm.errors import KeyShareRefused
from securechat.megolm.port import DEVICE_ID_RE, DeviceRef
from securechat.protocol import valid_name, valid_room

PAYLOAD_VERSION = 1
ROOM_KEY = "room_key"
FORWARDED_ROOM_KEY = "forwarded_room_key"
KEY_REQUEST = "room_key_request"
MAX_PAYLOAD = 4096
_KEY_FIELDS = frozenset(
    {"v", "kind", "room", "sender", "device", "session_id", "session_key", "first_index"}
)
_REQUEST_FIELDS = frozenset({"v", "kind", "room"})
_B64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")
_INDEX_MAX = 2**32 - 1  # Megolm indices are 32-bit


@dataclass(frozen=True)
class RoomKey:
    """A session key for `room`, owned by `owner`; `forwarded` if an own device relayed it."""

    room: str
    owner: DeviceRef
    session_id: str
    session_key: str  # base64, a vodozemac SessionKey (or ExportedSessionKey when forwarded)
    first_index: int
    forwarded: bool = False

    def __repr__(self) -> str:  # never print the key
        return f"RoomKey(room={self.room!r}, owner={self.owner}, session_id={self.session_id!r})"


@dataclass(frozen=True)
class KeyRequest:
    room: str


def encode(payload: RoomKey | KeyRequest) -> bytes:
    if isinstance(payload, KeyRequest):
        return canonical_json({"v": PAYLOAD_VERSION, "kind": KEY_REQUEST, "room": payload.room})
    return canonical_json(
        {
            "v": PAYLOAD_VERSION,
            "kind": FORWARDED_ROOM_KEY if payload.forwarded else ROOM_KEY,
            "room": payload.room,
            "sender": payload.owner.user,
            "device": payload.owner.device_id,
            "session_id": payload.session_id,
            "session_key": payload.session_key,
            "first_index": payload.first_index,
        }
    )


def parse(data: bytes, came_from: DeviceRef) -> RoomKey | KeyRequest:
    """The payload `came_from` sent, or KeyShareRefused saying what is wrong with it."""

    def bad(why: str) -> KeyShareRefused:
        return KeyShareRefused(f"a room key message from {came_from} was refused: {why}")

    if len(data) > MAX_PAYLOAD:
        raise bad("it is too large")
    try:
        fields: Any = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise bad("it is not valid JSON") from None
    if not isinstance(fields, dict) or fields.get("v") != PAYLOAD_VERSION:
        raise bad("it has an unknown format")
    kind = fields.get("kind")
    expected = _REQUEST_FIELDS if kind == KEY_REQUEST else _KEY_FIELDS
    if kind not in {ROOM_KEY, FORWARDED_ROOM_KEY, KEY_REQUEST} or set(fields) != expected:
        raise bad("it is not a room key, a forwarded key or a key request")
    room = fields["room"]
    if not isinstance(room, str) or valid_room(room):
        raise bad("its room name is malformed")
    if kind == KEY_REQUEST:
        return KeyRequest(room)
    return _room_key(fields, bad)


def _room_key(fields: dict[str, Any], bad: Callable[[str], KeyShareRefused]) -> RoomKey:
    """The RoomKey in the fields of a room key or forwarded key, whose set parse() checked."""
    sender, device = fields["sender"], fields["device"]
    if not isinstance(sender, str) or valid_name(sender):
        raise bad("its sender name is malformed")
    if not isinstance(device, str) or not DEVICE_ID_RE.fullmatch(device):
        raise bad("its device id is malformed")
    session_id, session_key = fields["session_id"], fields["session_key"]
    for value in (session_id, session_key):
        if not isinstance(value, str) or len(value) > 1024 or not _B64.fullmatch(value):
            raise bad("its session fields are malformed")
    index = fields["first_index"]
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index <= _INDEX_MAX:
        raise bad("its first index is malformed")
    return RoomKey(
        room=fields["room"],
        owner=DeviceRef(sender, device),
        session_id=session_id,
        session_key=session_key,
        first_index=index,
        forwarded=fields["kind"] == FORWARDED_ROOM_KEY,
    )
