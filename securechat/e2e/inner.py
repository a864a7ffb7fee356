"""The inner DM record (version 2): what Olm encrypts, one copy per recipient device.

    {"body":str,"chain":hex,"from":name,"from_device":id,"id":str,"kind":"dm"|"sas"|"room_key",
     "prev":hex,"seq":int,"to":name,"to_device":id,"ts":int ms,"v":2}

`kind` "dm" is a chat message (its body is the text); "sas" is a step of an emoji verification
between two devices (its body is the canonical SAS message, e2e/sas.py); "room_key" carries a
room key, a forwarded key or a key request (its body is a megolm/keyshare.py payload). The last
two go to exactly one device and are never shown as text.

exactly those keys, as json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=False) in
UTF-8: one encoding only; decoding re-encodes and refuses any other byte form. Each sending device
keeps one chain per recipient device: `chain` is its random id, `seq` counts from 1, and `prev`
is the SHA-256 (hex) of the previous record's canonical bytes in that chain ("" for seq 1), so a
dropped, reordered or replayed message shows (conversations.py).

Before encryption the canonical bytes are padded with spaces to the smallest of BUCKETS that
holds them, so the ciphertext tells only which bucket the text falls in. A decoded record must
be exactly a bucket long. No I/O here; no text in any error message.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from securechat.canonical import canonical_json
from securechat.e2e.device import valid_device_id
from securechat.errors import InvalidRecord
from securechat.protocol import TEXT_MAX, valid_name

RECORD_VERSION = 2
RECORD_KIND = "dm"
SAS_KIND = "sas"  # a verification message between two devices (e2e/sas.py), not chat text
ROOM_KEY_KIND = "room_key"  # a Megolm key share or key request (megolm/keyshare.py)
RECORD_KINDS = frozenset({RECORD_KIND, SAS_KIND, ROOM_KEY_KIND})
# An envelope of the largest bucket, with Olm's overhead (under 200 bytes) and base64, still fits
# a 64 KiB frame.
BUCKETS = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 48000)
MAX_RECORD_BYTES = BUCKETS[-1]
_MESSAGE_ID_RE = re.compile(r"[A-Za-z0-9_-]{8,64}")  # the wire protocol's DM id form
_CHAIN_RE = re.compile(r"[0-9a-f]{16}")
_HASH_RE = re.compile(r"[0-9a-f]{64}")
_TS_MAX = 2**53
_ATTRS = {  # wire key -> InnerRecord attribute
    "from": "sender",
    "from_device": "sender_device",
    "to": "recipient",
    "to_device": "recipient_device",
    "id": "message_id",
    "ts": "ts",
    "body": "body",
    "chain": "chain",
    "seq": "seq",
    "prev": "prev",
    "kind": "kind",
}
_WIRE_KEYS = frozenset({"v", *_ATTRS})


@dataclass(frozen=True)
class InnerRecord:
    sender: str
    sender_device: str
    recipient: str
    recipient_device: str
    message_id: str
    ts: int  # ms since the epoch, by the sender's clock
    body: str = field(repr=False)  # DM text never reaches a log through a repr
    chain: str  # 16 hex digits, the sending device's chain to the recipient device
    seq: int  # 1, 2, 3, ... within the chain
    prev: str  # SHA-256 hex of the previous record in the chain, "" for seq 1
    kind: str = RECORD_KIND  # "dm" (chat text), "sas" (a verification step) or "room_key"

    def canonical(self) -> bytes:
        fields: dict[str, Any] = {wire: getattr(self, attr) for wire, attr in _ATTRS.items()}
        fields["v"] = RECORD_VERSION
        return canonical_json(fields)

    @property
    def digest(self) -> str:
        """What the next record in the chain carries as `prev`."""
        return hashlib.sha256(self.canonical()).hexdigest()


def _problem(r: InnerRecord) -> str | None:
    """What is wrong with a record's fields, or None."""
    for role, name in (("sender", r.sender), ("recipient", r.recipient)):
        if not isinstance(name, str) or valid_name(name):
            return f"the {role} name is malformed"
    if not valid_device_id(r.sender_device) or not valid_device_id(r.recipient_device):
        return "a device id is malformed"
    if not isinstance(r.message_id, str) or not _MESSAGE_ID_RE.fullmatch(r.message_id):
        return "the message id must be 8 to 64 characters of A-Z, a-z, 0-9, _ and -"
    for what, value in (("timestamp", r.ts), ("sequence number", r.seq)):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < _TS_MAX:
            return f"the {what} is out of range"
    if r.kind not in RECORD_KINDS:
        return "the kind is unknown"
    if r.seq < 1:
        return "the sequence number is out of range"
    if not isinstance(r.chain, str) or not _CHAIN_RE.fullmatch(r.chain):
        return "the chain id is malformed"
    if not isinstance(r.prev, str) or not (
        (r.seq == 1 and r.prev == "") or (r.seq > 1 and _HASH_RE.fullmatch(r.prev))
    ):
        return "the previous-message hash is malformed"
    if not isinstance(r.body, str) or not r.body.strip() or len(r.body) > TEXT_MAX:
        return f"the text must be 1 to {TEXT_MAX} characters and not blank"
    return None


def bucket_for(length: int) -> int:
    """The padded size of a record whose canonical form is `length` bytes."""
    for size in BUCKETS:
        if length <= size:
            return size
    raise InvalidRecord(
        f"the message is too long once encoded (over {MAX_RECORD_BYTES} bytes); shorten it"
    )


def encode(record: InnerRecord) -> bytes:
    """The padded plaintext to encrypt; InvalidRecord if the record cannot be sent."""
    why = _problem(record)
    if why:
        raise InvalidRecord(f"cannot send the direct message: {why}")
    try:
        raw = record.canonical()
    except UnicodeEncodeError:
        raise InvalidRecord(
            "cannot send the direct message: the text holds characters that are not valid Unicode"
        ) from None
    return raw + b" " * (bucket_for(len(raw)) - len(raw))


def decode(padded: bytes) -> InnerRecord:
    """The record in a decrypted plaintext; InvalidRecord (naming no content) if malformed."""
    if len(padded) not in BUCKETS:
        raise InvalidRecord("a decrypted direct message is not padded to a size bucket")
    raw = padded.rstrip(b" ")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise InvalidRecord("a decrypted direct message is not a JSON record") from None
    if not isinstance(data, dict) or set(data) != _WIRE_KEYS:
        raise InvalidRecord("a decrypted direct message does not have the version 2 fields")
    if (
        data["v"] != RECORD_VERSION
        or isinstance(data["v"], bool)
        or not isinstance(data["kind"], str)
        or data["kind"] not in RECORD_KINDS
    ):
        raise InvalidRecord("a decrypted direct message has an unknown version or kind")
    record = InnerRecord(**{attr: data[wire] for wire, attr in _ATTRS.items()})
    why = _problem(record)
    if why:
        raise InvalidRecord(f"a decrypted direct message is malformed: {why}")
    if record.canonical() != raw:
        raise InvalidRecord("a decrypted direct message is not in canonical form")
    return record
