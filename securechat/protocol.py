"""Frame types, field validation, the login transcript, and the session state machine.

No I/O here: the server and client sessions take bytes in and give frames and bytes out, so every
rule can be tested by feeding bytes. The server never trusts a name or time the client writes;
it stamps both itself. This module owns the wire vocabulary: the frames a client may send (one
frozen dataclass each), the error codes (`ErrorCode`) and the states.

Rules of the server session (TRANSITIONS below is the whole truth; the session consults it for
every move and checks nothing else; a say's quick path uses what the table says of a say,
read once at import):
  1. A session starts CONNECTED and may only say hello (or ping).
  2. hello moves it to CHALLENGED, with a fresh random nonce; only auth may follow.
  3. A valid signature over the login transcript moves it to AUTHENTICATING while the name is
     bound in the store; only then, AUTHENTICATED, are room frames accepted.
  4. A frame with no entry for the current state is refused with error "not_allowed";
     MAX_STRIKES refusals of any kind close the connection.
  5. Every open state may close (CLOSING): a fatal error, too many strikes, or the owner's
     decision (shutdown, a refused login, a full server). CLOSING accepts nothing and is final.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import enum
import json
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import nacl.exceptions
import nacl.signing

from securechat import framing
from securechat.errors import ErrorCode, ProtocolError

PROTOCOL_VERSION = 2  # direct messages between devices over Olm; version 1 (Box DMs) is refused
LOGIN_CONTEXT = b"securechat/login/v1"
NONCE_BYTES = 32
MAX_STRIKES = 5

NAME_MAX = 32
ROOM_MAX = 32
TEXT_MAX = 8000
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]*")
_ROOM_RE = re.compile(r"#[a-z0-9][a-z0-9_.-]*")
LOBBY = "#lobby"
# A room's mode: its messages are end-to-end encrypted (say_encrypted), or plain text the server
# reads (say). The server picks it when the room is made; #lobby is always plain.
MODE_ENCRYPTED = "encrypted"
MODE_PLAIN = "plain"


class State(enum.Enum):
    CONNECTED = "connected"
    CHALLENGED = "challenged"
    AUTHENTICATING = "authenticating"
    AUTHENTICATED = "authenticated"
    CLOSING = "closing"


class Step(str, enum.Enum):
    """What moves a session besides a client frame: an outcome the session or its owner reaches.
    (Frame types are lower-case words; these are written so that no frame type can equal one.)"""

    SIGNATURE_OK = "Signature verified"
    LOGIN_ACCEPTED = "Name bound to the key"
    CLOSE = "Close"  # rule 5

    def __str__(self) -> str:
        return self.value


_OPEN = (State.CONNECTED, State.CHALLENGED, State.AUTHENTICATING, State.AUTHENTICATED)
_REQUESTS = (
    "join", "part", "say", "say_encrypted", "rooms", "who", "history", "keys", "dm", "dms", "ack",
    "publish_device", "devices", "publish_prekeys", "prekey_count", "claim_prekeys", "revoke",
)  # fmt: skip

# Every legal (state, frame type or step) -> next state. Nothing else moves a session.
TRANSITIONS: dict[State, dict[str, State]] = {
    State.CONNECTED: {"hello": State.CHALLENGED, "ping": State.CONNECTED},
    State.CHALLENGED: {"auth": State.CHALLENGED, "ping": State.CHALLENGED,
                       Step.SIGNATURE_OK: State.AUTHENTICATING},
    State.AUTHENTICATING: {"ping": State.AUTHENTICATING,
                           Step.LOGIN_ACCEPTED: State.AUTHENTICATED},
    State.AUTHENTICATED: {
        **{ftype: State.AUTHENTICATED for ftype in (*_REQUESTS, "ping", "pong")},
        "bye": State.CLOSING,
    },
    State.CLOSING: {},
}  # fmt: skip
for _state in _OPEN:
    TRANSITIONS[_state][Step.CLOSE] = State.CLOSING

# The one state that accepts a room message (say, say_encrypted), which it keeps (checked at
# import): their quick path compares the state with it, where a table lookup would hash an Enum in
# Python every message.
(_SAYING,) = (state for state, moves in TRANSITIONS.items() if "say" in moves)

# The client frame types each state accepts: the frame keys of the table.
ALLOWED: dict[State, frozenset[str]] = {
    state: frozenset(k for k in moves if not isinstance(k, Step))
    for state, moves in TRANSITIONS.items()
}


# -- field checks -------------------------------------------------------------------------------


def _bad(field: str, why: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_FIELD, f'field "{field}" {why}')


def valid_name(name: str) -> str | None:
    """Why a user name is unacceptable, or None when it is fine."""
    if not 1 <= len(name) <= NAME_MAX:
        return f"must be 1 to {NAME_MAX} characters"
    if not _NAME_RE.fullmatch(name):
        return "may hold only a-z, 0-9 and _ . - and must start with a letter or digit"
    return None


def valid_room(room: str) -> str | None:
    """Why a room name is unacceptable, or None when it is fine."""
    if not 2 <= len(room) <= ROOM_MAX:
        return f"must be # and 1 to {ROOM_MAX - 1} characters"
    if not _ROOM_RE.fullmatch(room):
        return "must start with # and hold only a-z, 0-9 and _ . -"
    return None


def _name(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise _bad(field, "must be a string")
    why = valid_name(value)
    if why:
        raise ProtocolError(ErrorCode.BAD_NAME, f"user name {why}")
    return value


def _room(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise _bad(field, "must be a string")
    why = valid_room(value)
    if why:
        raise ProtocolError(ErrorCode.BAD_ROOM, f"room name {why}")
    return value


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise _bad(field, "must be a string")
    if not value.strip():
        raise _bad(field, "must not be empty")
    if len(value) > TEXT_MAX:
        raise _bad(field, f"must be at most {TEXT_MAX} characters")
    return value


def _request_id(value: Any, field: str) -> int:
    # bool is an int subclass in Python; true/false are not ids.
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**53:
        raise _bad(field, "must be an integer from 0 to 2^53")
    return value


def _flag(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise _bad(field, "must be true or false")
    return value


def _b64(size: int) -> Callable[[Any, str], bytes]:
    def check(value: Any, field: str) -> bytes:
        if not isinstance(value, str):
            raise _bad(field, "must be a base64 string")
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise _bad(field, "is not valid base64") from None
        if len(raw) != size:
            raise _bad(field, f"must decode to {size} bytes")
        return raw

    return check


def _b64_blob(value: Any, field: str) -> str:
    """Opaque base64 (a sealed DM): checked for form and size, relayed as the same string."""
    if not isinstance(value, str) or not value:
        raise _bad(field, "must be a non-empty base64 string")
    try:
        base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise _bad(field, "is not valid base64") from None
    return value


# The Megolm session id (vodozemac's base64) and message of an encrypted room message. The bound is
# megolm.envelope.MAX_CIPHERTEXT, which this module cannot import (megolm imports it);
# tests/test_protocol.py checks that the two agree.
SESSION_ID_MAX = 128
_SESSION_ID_RE = re.compile(rf"[A-Za-z0-9+/=_-]{{1,{SESSION_ID_MAX}}}")
CIPHERTEXT_MAX = 48_384 + 128
_CIPHERTEXT_B64_MAX = -(-CIPHERTEXT_MAX // 3) * 4


def _session_id(value: Any, field: str) -> str:
    if not isinstance(value, str) or not _SESSION_ID_RE.fullmatch(value):
        raise _bad(field, f"must be 1 to {SESSION_ID_MAX} characters of A-Z a-z 0-9 + / = _ -")
    return value


def _ciphertext_problem(value: str) -> str | None:
    """Why a ciphertext string is refused, or None: standard padded base64, in its one canonical
    form, of 1 to CIPHERTEXT_MAX bytes (the length is checked before anything is decoded)."""
    if len(value) > _CIPHERTEXT_B64_MAX:
        return f"must decode to at most {CIPHERTEXT_MAX} bytes"
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return "is not valid base64"
    if base64.b64encode(raw) != value.encode("ascii"):
        return "is not valid base64"  # not the one canonical form (stray bits or padding)
    size = len(raw)
    if size > CIPHERTEXT_MAX:
        return f"must decode to at most {CIPHERTEXT_MAX} bytes"
    return None if size else "must not be empty"


def _ciphertext(value: Any, field: str) -> str:
    """Opaque base64 (a Megolm message): checked for form and size, relayed as the same string."""
    if not isinstance(value, str):
        raise _bad(field, "must be a base64 string")
    why = _ciphertext_problem(value)
    if why:
        raise _bad(field, why)
    return value


_MESSAGE_ID_RE = re.compile(r"[A-Za-z0-9_-]{8,64}")


def _message_id(value: Any, field: str) -> str:
    if not isinstance(value, str) or not _MESSAGE_ID_RE.fullmatch(value):
        raise _bad(field, "must be 8 to 64 characters of A-Z a-z 0-9 _ -")
    return value


ACK_MAX = 500
HISTORY_MAX = 1000


def _message_ids(value: Any, field: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not 1 <= len(value) <= ACK_MAX:
        raise _bad(field, f"must be a list of 1 to {ACK_MAX} message ids")
    return tuple(_message_id(v, field) for v in value)


_DEVICE_ID_RE = re.compile(r"[A-Z2-7]{16}")  # e2e.device.DEVICE_ID_RE
PREKEYS_MAX = 100
DEVICES_MAX = 64
USERS_MAX = 100  # names one `devices` request may ask about (the reply is cut to a frame)
# A batched claim_prekeys: most users, and most devices claimed for (null counts every active
# device of its user; see claim_devices_max).
CLAIM_USERS_MAX = 64
CLAIM_DEVICES_MAX = 128
_CLAIMED_KEY_ROOM = 400  # bytes a claimed prekey may take in the reply, device id included
# A dms request carries at most this many envelopes (and the frame size bounds it too).
DMS_MAX = 256
OBJECT_MAX = 2048  # bytes of JSON a record, revocation or prekey may take


def _device_id(value: Any, field: str) -> str:
    if not isinstance(value, str) or not _DEVICE_ID_RE.fullmatch(value):
        raise _bad(field, "must be a device id: 16 characters of A-Z and 2-7")
    return value


def _device_ids(value: Any, field: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not 1 <= len(value) <= DEVICES_MAX:
        raise _bad(field, f"must be a list of 1 to {DEVICES_MAX} device ids")
    return tuple(_device_id(v, field) for v in value)


def _names(value: Any, field: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not 1 <= len(value) <= USERS_MAX:
        raise _bad(field, f"must be a list of 1 to {USERS_MAX} user names")
    names = tuple(_name(v, field) for v in value)
    if len(set(names)) != len(names):
        raise _bad(field, "must not name anyone twice")
    return names


def _claims(value: Any, field: str) -> tuple[tuple[str, tuple[str, ...] | None], ...]:
    """`users` of a claim_prekeys: {name: [device ids] or null (every active device)}."""
    if not isinstance(value, dict) or not 1 <= len(value) <= CLAIM_USERS_MAX:
        raise _bad(field, f"must be an object of 1 to {CLAIM_USERS_MAX} user names")
    return tuple(
        (_name(user, field), None if ids is None else _device_ids(ids, f"{field}.{user}"))
        for user, ids in value.items()
    )


def claim_devices_max(max_frame: int) -> int:
    """Most devices one claim_prekeys may claim for on a server whose frames hold `max_frame`
    bytes: CLAIM_DEVICES_MAX, or fewer (at least 1) when the reply would not fit one frame."""
    return max(1, min(CLAIM_DEVICES_MAX, (max_frame - 2048) // _CLAIMED_KEY_ROOM))


def _object(value: Any, field: str) -> Mapping[str, Any]:
    """A signed object (a device record, a revocation, a prekey): a small JSON object. Its
    signature is checked by its handler, against the key bound to the name."""
    if not isinstance(value, dict) or len(json.dumps(value)) > OBJECT_MAX:
        raise _bad(field, f"must be an object of at most {OBJECT_MAX} bytes")
    return value


def _objects(value: Any, field: str) -> tuple[Mapping[str, Any], ...]:
    if not isinstance(value, list) or not 1 <= len(value) <= PREKEYS_MAX:
        raise _bad(field, f"must be a list of 1 to {PREKEYS_MAX} objects")
    return tuple(_object(v, field) for v in value)


def _limit(value: Any, field: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= HISTORY_MAX:
        raise _bad(field, f"must be an integer from 1 to {HISTORY_MAX}")
    return value


def _version(value: Any, field: str) -> int:
    if value != PROTOCOL_VERSION or isinstance(value, bool):
        # Echo at most a short piece: the value is whatever the client sent, and an error frame
        # must stay small (an unbounded echo overflowed the frame limit and cost two strikes).
        raise ProtocolError(
            ErrorCode.BAD_VERSION,
            f"protocol version {value!r:.40} is not supported (need {PROTOCOL_VERSION})",
        )
    return PROTOCOL_VERSION


Check = Callable[[Any, str], Any]


def _field(check: Check, default: Any = dataclasses.MISSING) -> Any:
    """A frame field with the check that parses it; without a default it is required."""
    return dataclasses.field(default=default, metadata={"check": check})


def _resume() -> Any:
    """On every rate-limited request: the sender has seen its earlier rate_limited refusals (see
    TokenBucket.take_in_order)."""
    return _field(_flag, False)


# -- client frames: one frozen, validated class per frame type a client may send -----------------
# Parsed once, at the boundary (ServerSession), and passed as these types from there on. Unknown
# extra fields are ignored so that a newer client can talk to an older server.


@dataclass(frozen=True)
class Hello:
    TYPE: ClassVar[str] = "hello"
    user: str = _field(_name)
    key: bytes = _field(_b64(32))
    version: int = _field(_version)
    device: str = _field(_device_id)  # the device logging in; one connection per (user, device)


@dataclass(frozen=True)
class Auth:
    TYPE: ClassVar[str] = "auth"
    signature: bytes = _field(_b64(64))


@dataclass(frozen=True)
class Join:
    """Join a room, making it if the server does not know it: end-to-end encrypted, unless
    `plain` (or it is #lobby). `create` insists on a new room (room_exists otherwise)."""

    TYPE: ClassVar[str] = "join"
    id: int = _field(_request_id)
    room: str = _field(_room)
    create: bool = _field(_flag, False)
    plain: bool = _field(_flag, False)
    resume: bool = _resume()

    def __post_init__(self) -> None:
        if self.plain and not self.create:
            # A join of a room that exists must not look as if it chose that room's mode.
            raise ProtocolError(
                ErrorCode.BAD_FRAME,
                '"plain" chooses the mode of a new room: send it with "create": true',
            )


@dataclass(frozen=True)
class Part:
    TYPE: ClassVar[str] = "part"
    id: int = _field(_request_id)
    room: str = _field(_room)
    resume: bool = _resume()


@dataclass(frozen=True)
class Say:
    TYPE: ClassVar[str] = "say"
    id: int = _field(_request_id)
    room: str = _field(_room)
    text: str = _field(_text)
    action: bool = _field(_flag, False)
    resume: bool = _resume()


@dataclass(frozen=True)
class SayEncrypted:
    """A Megolm room message (securechat/megolm/envelope.py), opaque to the server: relayed and
    kept as these same strings, stamped with the sending user and device."""

    TYPE: ClassVar[str] = "say_encrypted"
    id: int = _field(_request_id)
    room: str = _field(_room)
    session_id: str = _field(_session_id)
    ciphertext: str = _field(_ciphertext)
    resume: bool = _resume()


@dataclass(frozen=True)
class Rooms:
    TYPE: ClassVar[str] = "rooms"
    id: int = _field(_request_id)
    resume: bool = _resume()


@dataclass(frozen=True)
class Who:
    TYPE: ClassVar[str] = "who"
    id: int = _field(_request_id)
    room: str = _field(_room)
    resume: bool = _resume()


@dataclass(frozen=True)
class History:
    TYPE: ClassVar[str] = "history"
    id: int = _field(_request_id)
    room: str = _field(_room)
    limit: int | None = _field(_limit, None)  # None: all that is kept
    resume: bool = _resume()


@dataclass(frozen=True)
class Keys:
    TYPE: ClassVar[str] = "keys"
    id: int = _field(_request_id)
    user: str = _field(_name)
    resume: bool = _resume()


@dataclass(frozen=True)
class DM:
    """One Olm envelope for one device (`user`/`device`) of a DM in the conversation with `to`."""

    TYPE: ClassVar[str] = "dm"
    id: int = _field(_request_id)
    to: str = _field(_name)  # the conversation's other person
    user: str = _field(_name)  # `to`, or the sender themself (a copy for their other devices)
    device: str = _field(_device_id)
    msg_id: str = _field(_message_id)
    data: str = _field(_b64_blob)  # the envelope, opaque to the server: relayed as this string
    resume: bool = _resume()


# The fields of a `dm` that name one envelope: a `dms` carries a list of them.
_ENVELOPE_FIELDS = ("to", "user", "device", "msg_id", "data")


@dataclass(frozen=True)
class Envelope:
    """One item of a `dms`: the fields of a `dm` for one device, checked by the same checks."""

    to: str
    user: str
    device: str
    msg_id: str
    data: str


def _envelopes(value: Any, field: str) -> tuple[Envelope, ...]:
    if not isinstance(value, list) or not 1 <= len(value) <= DMS_MAX:
        raise _bad(field, f"must be a list of 1 to {DMS_MAX} messages")
    checks = {f.name: f.metadata["check"] for f in dataclasses.fields(DM)}
    out, seen = [], set()
    for i, item in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(item, dict):
            raise _bad(where, "must be an object")
        values = {}
        for name in _ENVELOPE_FIELDS:
            if name not in item:
                raise _bad(f"{where}.{name}", "is missing")
            values[name] = checks[name](item[name], f"{where}.{name}")
        env = Envelope(**values)
        key = (env.user, env.device, env.msg_id)
        if key in seen:
            raise _bad(where, "repeats the user, device and msg_id of an earlier message")
        seen.add(key)
        out.append(env)
    return tuple(out)


@dataclass(frozen=True)
class DMs:
    """Many Olm envelopes, each for one device, in one request (a room key to every member's
    devices): each is checked, stored and answered as its own `dm` would be."""

    TYPE: ClassVar[str] = "dms"
    id: int = _field(_request_id)
    messages: tuple[Envelope, ...] = _field(_envelopes)
    resume: bool = _resume()


@dataclass(frozen=True)
class Ack:
    TYPE: ClassVar[str] = "ack"
    msg_ids: tuple[str, ...] = _field(_message_ids)


@dataclass(frozen=True)
class PublishDevice:
    TYPE: ClassVar[str] = "publish_device"
    id: int = _field(_request_id)
    record: Mapping[str, Any] = _field(_object)
    resume: bool = _resume()


def _user_or_users(ftype: str, user: object, users: object) -> None:
    """A request for one user or for many names exactly one of the two."""
    if (user is None) == (users is None):
        why = "not both" if user is not None else "one is missing"
        raise ProtocolError(ErrorCode.BAD_FRAME, f'{ftype} takes either "user" or "users" ({why})')


@dataclass(frozen=True)
class Devices:
    """The device lists of one `user`, or of several (`users`: a room's members in a few
    requests rather than one each); exactly one of the two."""

    TYPE: ClassVar[str] = "devices"
    id: int = _field(_request_id)
    user: str | None = _field(_name, None)
    users: tuple[str, ...] | None = _field(_names, None)
    resume: bool = _resume()

    def __post_init__(self) -> None:
        _user_or_users(self.TYPE, self.user, self.users)


@dataclass(frozen=True)
class PublishPrekeys:
    TYPE: ClassVar[str] = "publish_prekeys"
    id: int = _field(_request_id)
    keys: tuple[Mapping[str, Any], ...] = _field(_objects)
    resume: bool = _resume()


@dataclass(frozen=True)
class PrekeyCount:
    TYPE: ClassVar[str] = "prekey_count"
    id: int = _field(_request_id)
    resume: bool = _resume()


@dataclass(frozen=True)
class ClaimPrekeys:
    """A prekey of each device named: of one `user` (`devices`, None: every active one), or
    of many, `users`: ((name, device ids or None), ...)."""

    TYPE: ClassVar[str] = "claim_prekeys"
    id: int = _field(_request_id)
    user: str | None = _field(_name, None)
    devices: tuple[str, ...] | None = _field(_device_ids, None)  # None: every active device
    users: tuple[tuple[str, tuple[str, ...] | None], ...] | None = _field(_claims, None)
    resume: bool = _resume()

    def __post_init__(self) -> None:
        _user_or_users(self.TYPE, self.user, self.users)
        if self.users is not None and self.devices is not None:
            raise ProtocolError(
                ErrorCode.BAD_FRAME,
                '"devices" goes with "user"; with "users", list each user\'s devices there',
            )

    def wanted(self) -> tuple[tuple[str, tuple[str, ...] | None], ...]:
        """Each user claimed for, with the devices named (None: every active one)."""
        if self.users is not None:
            return self.users
        assert self.user is not None
        return ((self.user, self.devices),)


@dataclass(frozen=True)
class Revoke:
    TYPE: ClassVar[str] = "revoke"
    id: int = _field(_request_id)
    revocation: Mapping[str, Any] = _field(_object)
    resume: bool = _resume()


@dataclass(frozen=True)
class Ping:
    TYPE: ClassVar[str] = "ping"
    id: int = _field(_request_id)


@dataclass(frozen=True)
class Pong:
    """The answer to the server's keep-alive ping."""

    TYPE: ClassVar[str] = "pong"


@dataclass(frozen=True)
class Bye:
    TYPE: ClassVar[str] = "bye"


# What an authenticated client asks the server to do; the server answers each with "ok" (or an
# error) carrying its id, except Ack, which is answered by nothing.
RequestFrame = (
    Join | Part | Say | SayEncrypted | Rooms | Who | History | Keys | DM | DMs | Ack
    | PublishDevice | Devices | PublishPrekeys | PrekeyCount | ClaimPrekeys | Revoke
)  # fmt: skip
ClientFrame = Hello | Auth | Ping | Pong | Bye | RequestFrame

REQUEST_CLASSES: tuple[type[RequestFrame], ...] = (
    Join, Part, Say, SayEncrypted, Rooms, Who, History, Keys, DM, DMs, Ack,
    PublishDevice, Devices, PublishPrekeys, PrekeyCount, ClaimPrekeys, Revoke,
)  # fmt: skip
FRAME_CLASSES: dict[str, type[ClientFrame]] = {
    cls.TYPE: cls for cls in (Hello, Auth, Ping, Pong, Bye, *REQUEST_CLASSES)
}

# Client frame schemas, derived from the classes: type -> field -> (check, required).
CLIENT_FRAMES: dict[str, dict[str, tuple[Check, bool]]] = {
    ftype: {
        f.name: (f.metadata["check"], f.default is dataclasses.MISSING)
        for f in dataclasses.fields(cls)
    }
    for ftype, cls in FRAME_CLASSES.items()
}


def parse_client_frame(frame: Mapping[str, Any]) -> ClientFrame:
    """Check a client frame (a parsed JSON object with a string "type") against its class."""
    ftype = frame["type"]
    cls = FRAME_CLASSES.get(ftype)
    if cls is None:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f'unknown frame type "{ftype[:40]}"')
    values: dict[str, Any] = {}
    for field, (check, required) in CLIENT_FRAMES[ftype].items():
        if field in frame:
            values[field] = check(frame[field], field)
        elif required:
            raise _bad(field, "is missing")
    return cls(**values)


def _quick_room_head(frame: Mapping[str, Any]) -> tuple[int, str] | None:
    """The id and room of a room message, when both pass their checks (exact types, never
    looser); None when either may not."""
    request_id, room = frame.get("id"), frame.get("room")
    if (
        type(request_id) is int
        and 0 <= request_id < 2**53
        and type(room) is str
        and 2 <= len(room) <= ROOM_MAX
        and _ROOM_RE.fullmatch(room)
    ):
        return request_id, room
    return None


def _quick_say(frame: Mapping[str, Any]) -> Say | None:
    """The Say that parse_client_frame would make of `frame` (a say), when every field passes
    its check; None when one may not (the caller then takes parse_client_frame's path, and its
    errors). Each test here is the field's check, or stricter (exact types), never looser."""
    head, text = _quick_room_head(frame), frame.get("text")
    action, resume = frame.get("action", False), frame.get("resume", False)
    if (
        head is not None
        and type(text) is str
        and len(text) <= TEXT_MAX
        and text.strip()
        and type(action) is bool
        and type(resume) is bool
    ):
        return Say(*head, text, action, resume)
    return None


def _quick_say_encrypted(frame: Mapping[str, Any]) -> SayEncrypted | None:
    """_quick_say for a say_encrypted: the room message of every encrypted room."""
    head, session_id = _quick_room_head(frame), frame.get("session_id")
    ciphertext, resume = frame.get("ciphertext"), frame.get("resume", False)
    if (
        head is not None
        and type(session_id) is str
        and _SESSION_ID_RE.fullmatch(session_id)
        and type(ciphertext) is str
        and _ciphertext_problem(ciphertext) is None
        and type(resume) is bool
    ):
        return SayEncrypted(*head, session_id, ciphertext, resume)
    return None


# The room messages, each with its quick check (both kept in _SAYING, checked at import).
_QUICK: dict[str, Callable[[Mapping[str, Any]], RequestFrame | None]] = {
    "say": _quick_say,
    "say_encrypted": _quick_say_encrypted,
}


# -- login ----------------------------------------------------------------------------------------


def login_transcript(
    nonce: bytes, user: str, public_key: bytes, server_cert_sha256: bytes
) -> bytes:
    """The bytes a client signs to log in.

    Domain-separated and length-prefixed, so no other message of ours, another login (a fresh
    nonce) or another server (its certificate's hash) can reuse the signature.
    """
    parts = (LOGIN_CONTEXT, nonce, user.encode("utf-8"), public_key, server_cert_sha256)
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def error_frame(
    code: ErrorCode, message: str, request_id: int | None = None, **extra: Any
) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "error", "code": code, "message": message, **extra}
    if request_id is not None:
        frame["id"] = request_id
    return frame


# -- server session -------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoginVerified:
    """The client proved it holds `public_key`; the name is not yet bound to it."""

    user: str
    public_key: bytes
    device: str


@dataclass(frozen=True)
class Request:
    """A checked frame from an authenticated client, for the server to act on."""

    frame: RequestFrame

    @property
    def type(self) -> str:
        return self.frame.TYPE


@dataclass(frozen=True)
class Close:
    """The session is over; tell the peer `reason` (a frame is already queued) and close."""

    reason: str


Event = LoginVerified | Request | Close


class ServerSession:
    """The server side of one connection: bytes in, events and frames out.

    Each outgoing frame (encoded bytes) goes to `emit` as soon as it is made, or, without one,
    into an outbox that take_outbox() empties (tests and fuzzing read it that way). The session
    never touches a socket, the store or the hub.
    """

    def __init__(
        self,
        server_cert_sha256: bytes,
        max_frame: int = framing.MAX_FRAME_DEFAULT,
        nonce_source: Callable[[int], bytes] = os.urandom,
        emit: Callable[[bytes], None] | None = None,
    ) -> None:
        if max_frame < framing.MIN_FRAME:
            # Below it a refusal could not be encoded, and receive_data would raise.
            raise ValueError(f"max_frame must be at least {framing.MIN_FRAME} bytes")
        self.state = State.CONNECTED
        self.user: str | None = None
        self.public_key: bytes | None = None
        self.strikes = 0
        self._outbox: list[bytes] = []
        self._emit = emit if emit is not None else self._outbox.append
        self._has_emit = emit is not None
        self._server_fp = server_cert_sha256
        self._decoder = framing.FrameDecoder(max_frame)
        self._max_frame = max_frame
        self._nonce_source = nonce_source
        self._nonce: bytes | None = None
        self._claimed_user: str | None = None
        self._claimed_key: bytes | None = None
        self._claimed_device = ""
        self.device = ""

    def _move(self, key: str) -> None:
        """Take the transition `key` (a frame type or a Step) names from the current state."""
        try:
            self.state = TRANSITIONS[self.state][key]
        except KeyError:
            raise RuntimeError(f'no transition for "{key}" while {self.state.value}') from None

    # output
    def send(self, frame: Mapping[str, Any]) -> None:
        self._emit(framing.encode(frame, self._max_frame))

    def take_outbox(self) -> list[bytes]:
        """The frames made since the last call, oldest first (a session without `emit`)."""
        if self._has_emit:
            raise RuntimeError("this session hands its frames to emit; it keeps no outbox")
        out = self._outbox[:]
        self._outbox.clear()
        return out

    # input
    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes from the peer; return the events they complete."""
        if self.state is State.CLOSING:
            return []
        self._decoder.feed(data)
        events: list[Event] = []
        # _handle and _refuse move the state; mypy keeps the narrowing from the check above.
        while self.state is not State.CLOSING:  # type: ignore[comparison-overlap]
            try:
                payload = self._decoder.next_payload()
                if payload is None:
                    break
                event = self._handle(framing.parse(payload))
            except ProtocolError as exc:
                event = self._refuse(exc)
            if event is not None:
                events.append(event)
        return events

    def _refuse(self, exc: ProtocolError, request_id: int | None = None) -> Close | None:
        self.strikes += 1
        self.send(error_frame(ErrorCode(exc.code), exc.message, request_id))
        if exc.fatal or self.strikes >= MAX_STRIKES:
            self._move(Step.CLOSE)
            reason = exc.message if exc.fatal else "too many protocol errors"
            return Close(reason)
        return None

    def _handle(self, raw: dict[str, Any]) -> Event | None:
        ftype = raw["type"]
        quick = _QUICK.get(ftype)
        if quick is not None and self.state is _SAYING:
            # The frame of every room message: when all its fields pass, the checks below
            # (which it would pass too) are skipped; otherwise it takes them, to the same error.
            # The table keeps a room message in _SAYING (checked at import): no move to make.
            say = quick(raw)
            if say is not None:
                return Request(say)
        if ftype not in FRAME_CLASSES:
            raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f'unknown frame type "{ftype[:40]}"')
        if ftype not in ALLOWED[self.state]:
            raise ProtocolError(
                ErrorCode.NOT_ALLOWED, f'"{ftype}" is not allowed while {self.state.value}'
            )
        try:
            request_id: int | None = _request_id(raw.get("id"), "id")
        except ProtocolError:
            request_id = None  # an error reply carries the id only when it was a valid one
        try:
            frame = parse_client_frame(raw)
        except ProtocolError as exc:
            return self._refuse(exc, request_id)
        self._move(ftype)
        handler = _SESSION_HANDLERS.get(type(frame))
        if handler is None:
            return Request(frame)  # type: ignore[arg-type]  # the rest are requests (checked)
        return handler(self, frame)

    def _hello(self, frame: Hello) -> None:
        self._nonce = self._nonce_source(NONCE_BYTES)
        self._claimed_user = frame.user
        self._claimed_key = frame.key
        self._claimed_device = frame.device
        self.send({"type": "challenge", "nonce": b64(self._nonce)})

    def _auth(self, frame: Auth) -> Event:
        assert self._nonce is not None and self._claimed_user and self._claimed_key
        transcript = login_transcript(
            self._nonce, self._claimed_user, self._claimed_key, self._server_fp
        )
        self._nonce = None  # one signature per challenge, right or wrong
        try:
            nacl.signing.VerifyKey(self._claimed_key).verify(transcript, frame.signature)
        except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError):
            self._move(Step.CLOSE)
            self.send(error_frame(ErrorCode.BAD_SIGNATURE, "login signature does not verify"))
            return Close("bad login signature")
        self._move(Step.SIGNATURE_OK)
        return LoginVerified(self._claimed_user, self._claimed_key, self._claimed_device)

    def _ping(self, frame: Ping) -> None:
        self.send({"type": "pong", "id": frame.id})

    def _pong(self, frame: Pong) -> None:
        return None  # a sign of life is all it is

    def _bye(self, frame: Bye) -> Close:
        return Close("quit")

    # outcomes decided by the owner (after the store has answered)
    def login_accepted(self, welcome: Mapping[str, Any]) -> None:
        self._move(Step.LOGIN_ACCEPTED)
        self.user, self.public_key = self._claimed_user, self._claimed_key
        self.device = self._claimed_device
        self.send(
            {
                "type": "welcome",
                "user": self.user,
                "device": self.device,
                "version": PROTOCOL_VERSION,
                **welcome,
            }
        )

    def close_with_error(
        self, code: ErrorCode, message: str, request_id: int | None = None
    ) -> Close:
        """Refuse for good (a login the store refused, a full server, a store failure): the
        error frame is the last thing the peer hears."""
        self._move(Step.CLOSE)
        self.send(error_frame(code, message, request_id))
        return Close(message)

    def reply_error(self, request_id: int, code: ErrorCode, message: str, **extra: Any) -> None:
        """Refuse one well-formed request the server cannot do (not in that room, say): an
        ordinary user mistake, so it is no strike."""
        self.send(error_frame(code, message, request_id, **extra))

    def close(self, reason: str) -> None:
        """Tell the peer we are closing (shutdown, replaced, dropped)."""
        if self.state is not State.CLOSING:
            self._move(Step.CLOSE)
            self.send({"type": "bye", "reason": reason})


# The frames the session answers itself; every other accepted frame is a Request for its owner.
_SESSION_HANDLERS: dict[type, Callable[[ServerSession, Any], Event | None]] = {
    Hello: ServerSession._hello,
    Auth: ServerSession._auth,
    Ping: ServerSession._ping,
    Pong: ServerSession._pong,
    Bye: ServerSession._bye,
}


def _check_tables() -> None:
    """At import: the transitions, the frame classes and the handlers name the same things."""
    keys = {k for moves in TRANSITIONS.values() for k in moves}
    frames_in_table = {k for k in keys if not isinstance(k, Step)}
    problems = []
    if set(TRANSITIONS) != set(State):
        problems.append("TRANSITIONS must have a row for every state")
    if frames_in_table != set(FRAME_CLASSES):
        problems.append(f"frame types in TRANSITIONS {sorted(frames_in_table)} != frame classes")
    if set(Step) - keys:
        problems.append(f"steps never taken: {sorted(set(Step) - keys)}")
    handled = set(_SESSION_HANDLERS) | set(REQUEST_CLASSES)
    if handled != set(FRAME_CLASSES.values()) or set(_SESSION_HANDLERS) & set(REQUEST_CLASSES):
        problems.append("every frame class needs exactly one of: a session handler, a request")
    requests_in_table = {FRAME_CLASSES[t] for t in ALLOWED[State.AUTHENTICATED]}
    if set(REQUEST_CLASSES) - requests_in_table:
        problems.append("every request must be accepted when authenticated")
    if any(TRANSITIONS[_SAYING].get(ftype) is not _SAYING for ftype in _QUICK):
        problems.append(
            "a room message must leave the state as it is (the quick path makes no move)"
        )
    if problems:
        raise RuntimeError("protocol tables disagree: " + "; ".join(problems))


_check_tables()


def now_ms() -> int:
    return int(time.time() * 1000)
