"""The inner room record: what a Megolm room message encrypts, in one canonical byte form.

    {"body":str,"device":str,"from":name,"id":str,"kind":"room","room":"#x","ts":int ms,"v":1}

exactly those keys, as json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=False) in
UTF-8 (a /me line has "kind":"room_action", with the same keys), then padded with spaces to a
size bucket so the ciphertext length says little about the text. The sender user and device are
inside because Megolm proves only which session encrypted a message; the reader checks them
against the session's owner and the server's stamp. Decoding refuses any other byte form: one
record, one encoding.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from securechat.canonical import canonical_json
from securechat.megolm.errors import InvalidRoomRecord, TamperedRoomMessage
from securechat.megolm.port import DEVICE_ID_RE
from securechat.protocol import TEXT_MAX, valid_name, valid_room
from securechat.sealing import MESSAGE_ID_MAX, MESSAGE_ID_MIN

RECORD_VERSION = 1
RECORD_KIND = "room"
ACTION_KIND = "room_action"  # a /me line: shown as an action, never as said text
_KINDS = {RECORD_KIND: False, ACTION_KIND: True}  # kind -> action
_KEYS = frozenset({"v", "kind", "room", "from", "device", "id", "ts", "body"})
_MESSAGE_ID_RE = re.compile(rf"[A-Za-z0-9_-]{{{MESSAGE_ID_MIN},{MESSAGE_ID_MAX}}}")
_TS_MAX = 2**53
# Powers of two up to 16 KiB, then 256-byte steps: the largest record (TEXT_MAX control characters,
# each escaped to 6 bytes, and the longest names) pads to 48,384 bytes, so its Megolm message in
# base64 (about 64.6 KB) still fits a 64 KiB frame beside the frame's other fields.
_SMALL_BUCKETS = (256, 512, 1024, 2048, 4096, 8192, 16384)
_LARGE_STEP = 256
MAX_PADDED = 48_384


@dataclass(frozen=True)
class RoomRecord:
    room: str
    sender: str
    device: str
    message_id: str
    ts: int  # milliseconds since the epoch, by the sender's clock
    body: str
    action: bool = False  # a /me line (kind "room_action")


def bucket(size: int) -> int:
    """The padded size for `size` bytes of record."""
    for b in _SMALL_BUCKETS:
        if size <= b:
            return b
    return -(-size // _LARGE_STEP) * _LARGE_STEP


def _problem(record: RoomRecord) -> str | None:
    if not isinstance(record.room, str) or valid_room(record.room):
        return "the room name is malformed"
    if not isinstance(record.sender, str) or valid_name(record.sender):
        return "the sender name is malformed"
    if not isinstance(record.device, str) or not DEVICE_ID_RE.fullmatch(record.device):
        return "the device id is malformed"
    if not isinstance(record.message_id, str) or not _MESSAGE_ID_RE.fullmatch(record.message_id):
        return "the message id is malformed"
    ts = record.ts
    if not isinstance(ts, int) or isinstance(ts, bool) or not 0 <= ts < _TS_MAX:
        return "the timestamp is out of range"
    body = record.body
    if not isinstance(body, str) or not body.strip() or len(body) > TEXT_MAX:
        return f"the text is empty, not text, or longer than {TEXT_MAX} characters"
    return None


def encode(record: RoomRecord) -> bytes:
    """The padded plaintext for Megolm; InvalidRoomRecord if a field is bad (nothing is sent)."""
    why = _problem(record)
    if why:
        raise InvalidRoomRecord(f"cannot encrypt a room message: {why}")
    fields = {
        "v": RECORD_VERSION,
        "kind": ACTION_KIND if record.action else RECORD_KIND,
        "room": record.room,
        "from": record.sender,
        "device": record.device,
        "id": record.message_id,
        "ts": record.ts,
        "body": record.body,
    }
    try:
        raw = canonical_json(fields)
    except UnicodeEncodeError:
        raise InvalidRoomRecord(
            "cannot encrypt a room message: the text holds characters that are not valid Unicode"
        ) from None
    return raw + b" " * (bucket(len(raw)) - len(raw))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def decode(plaintext: bytes, where: str) -> RoomRecord:
    """The record inside a decrypted message; TamperedRoomMessage naming `where` otherwise."""

    def bad(why: str) -> TamperedRoomMessage:
        return TamperedRoomMessage(f"an encrypted message {where} was dropped: {why}")

    if len(plaintext) > MAX_PADDED or len(plaintext) != bucket(len(plaintext.rstrip(b" "))):
        raise bad("its padding is wrong")
    raw = plaintext.rstrip(b" ")
    try:
        fields = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise bad("its record is not valid JSON") from None
    if not isinstance(fields, dict) or set(fields) != _KEYS:
        raise bad("its record does not have the expected fields")
    if fields["v"] != RECORD_VERSION or isinstance(fields["v"], bool):
        raise bad("its record has an unknown version")
    kind = fields["kind"]
    if not isinstance(kind, str) or kind not in _KINDS:
        raise bad("its record is not a room message")
    record = RoomRecord(
        room=fields["room"],
        sender=fields["from"],
        device=fields["device"],
        message_id=fields["id"],
        ts=fields["ts"],
        body=fields["body"],
        action=_KINDS[kind],
    )
    why = _problem(record)
    if why:
        raise bad(why)
    if canonical_json(fields) != raw:
        raise bad("its record is not in canonical form")
    return record
