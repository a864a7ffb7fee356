"""Frame types, field validation, the login transcript, and the session state tables.

No I/O here: the server and client sessions take bytes in and give frames and bytes out, so every
rule can be tested by feeding bytes. The server never trusts a name or time the client writes;
it stamps both itself.

Rules of the server session (the tables below are the whole truth):
  1. A session starts CONNECTED and may only say hello (or ping).
  2. hello moves it to CHALLENGED, with a fresh random nonce; only auth may follow.
  3. A valid signature over the login transcript moves it to AUTHENTICATING while the name is
     bound in the store; only then, AUTHENTICATED, are room frames accepted.
  4. A frame not allowed in the current state is refused with error "not_allowed"; MAX_STRIKES
     refusals of any kind close the connection.
"""

from __future__ import annotations

import base64
import binascii
import enum
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import nacl.exceptions
import nacl.signing

from securechat import framing
from securechat.errors import ErrorCode, ProtocolError

PROTOCOL_VERSION = 1
LOGIN_CONTEXT = b"securechat/login/v1"
NONCE_BYTES = 32
MAX_STRIKES = 5

NAME_MAX = 32
ROOM_MAX = 32
TEXT_MAX = 8000
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]*")
_ROOM_RE = re.compile(r"#[a-z0-9][a-z0-9_.-]*")
LOBBY = "#lobby"


class State(enum.Enum):
    CONNECTED = "connected"
    CHALLENGED = "challenged"
    AUTHENTICATING = "authenticating"
    AUTHENTICATED = "authenticated"
    CLOSING = "closing"


# Rule table: the client frame types each server-session state accepts.
ALLOWED: dict[State, frozenset[str]] = {
    State.CONNECTED: frozenset({"hello", "ping"}),
    State.CHALLENGED: frozenset({"auth", "ping"}),
    State.AUTHENTICATING: frozenset({"ping"}),
    State.AUTHENTICATED: frozenset(
        {"join", "part", "say", "rooms", "who", "history", "keys", "dm", "ack", "bye"}
        | {"ping", "pong"}
    ),
    State.CLOSING: frozenset(),
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


_MESSAGE_ID_RE = re.compile(r"[A-Za-z0-9_-]{8,64}")


def _message_id(value: Any, field: str) -> str:
    if not isinstance(value, str) or not _MESSAGE_ID_RE.fullmatch(value):
        raise _bad(field, "must be 8 to 64 characters of A-Z a-z 0-9 _ -")
    return value


ACK_MAX = 500
HISTORY_MAX = 1000


def _message_ids(value: Any, field: str) -> list[str]:
    if not isinstance(value, list) or not 1 <= len(value) <= ACK_MAX:
        raise _bad(field, f"must be a list of 1 to {ACK_MAX} message ids")
    return [_message_id(v, field) for v in value]


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
# Client frame schemas: field -> (check, required). Unknown extra fields are ignored so that a
# newer client can talk to an older server.
CLIENT_FRAMES: dict[str, dict[str, tuple[Check, bool]]] = {
    "hello": {"user": (_name, True), "key": (_b64(32), True), "version": (_version, True)},
    "auth": {"signature": (_b64(64), True)},
    "join": {"id": (_request_id, True), "room": (_room, True)},
    "part": {"id": (_request_id, True), "room": (_room, True)},
    "say": {
        "id": (_request_id, True),
        "room": (_room, True),
        "text": (_text, True),
        "action": (_flag, False),
    },
    "rooms": {"id": (_request_id, True)},
    "who": {"id": (_request_id, True), "room": (_room, True)},
    "keys": {"id": (_request_id, True), "user": (_name, True)},
    "dm": {
        "id": (_request_id, True),
        "to": (_name, True),
        "msg_id": (_message_id, True),
        "box": (_b64_blob, True),
    },
    "ack": {"msg_ids": (_message_ids, True)},
    "history": {"id": (_request_id, True), "room": (_room, True), "limit": (_limit, False)},
    "ping": {"id": (_request_id, True)},
    "pong": {},  # the answer to the server's keep-alive ping
    "bye": {},
}


def validate_client_frame(frame: Mapping[str, Any]) -> dict[str, Any]:
    """Check a client frame against its schema; return the checked fields plus "type"."""
    ftype = frame["type"]
    schema = CLIENT_FRAMES.get(ftype)
    if schema is None:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f'unknown frame type "{ftype[:40]}"')
    out: dict[str, Any] = {"type": ftype}
    for field, (check, required) in schema.items():
        if field in frame:
            out[field] = check(frame[field], field)
        elif required:
            raise _bad(field, "is missing")
    return out


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


def error_frame(code: ErrorCode, message: str, request_id: int | None = None) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if request_id is not None:
        frame["id"] = request_id
    return frame


# -- server session -------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoginVerified:
    """The client proved it holds `public_key`; the name is not yet bound to it."""

    user: str
    public_key: bytes


@dataclass(frozen=True)
class Request:
    """A checked frame from an authenticated client, for the hub to act on."""

    frame: dict[str, Any]

    @property
    def type(self) -> str:
        return self.frame["type"]


@dataclass(frozen=True)
class Close:
    """The session is over; tell the peer `reason` (a frame is already queued) and close."""

    reason: str


Event = LoginVerified | Request | Close


class ServerSession:
    """The server side of one connection: bytes in, events and frames out.

    Outgoing frames are collected in `outbox` (encoded bytes); the owner of the connection sends
    them. The session never touches a socket, the store or the hub.
    """

    def __init__(
        self,
        server_cert_sha256: bytes,
        max_frame: int = framing.MAX_FRAME_DEFAULT,
        nonce_source: Callable[[int], bytes] = os.urandom,
    ) -> None:
        if max_frame < framing.MIN_FRAME:
            # Below it a refusal could not be encoded, and receive_data would raise.
            raise ValueError(f"max_frame must be at least {framing.MIN_FRAME} bytes")
        self.state = State.CONNECTED
        self.user: str | None = None
        self.public_key: bytes | None = None
        self.strikes = 0
        self.outbox: list[bytes] = []
        self._server_fp = server_cert_sha256
        self._decoder = framing.FrameDecoder(max_frame)
        self._max_frame = max_frame
        self._nonce_source = nonce_source
        self._nonce: bytes | None = None
        self._claimed_user: str | None = None
        self._claimed_key: bytes | None = None

    # output
    def send(self, frame: Mapping[str, Any]) -> None:
        self.outbox.append(framing.encode(frame, self._max_frame))

    def take_outbox(self) -> list[bytes]:
        out, self.outbox = self.outbox, []
        return out

    # input
    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes from the peer; return the events they complete."""
        if self.state is State.CLOSING:
            return []
        self._decoder.feed(data)
        events: list[Event] = []
        while self.state is not State.CLOSING:
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
        self.send(error_frame(exc.code, exc.message, request_id))
        if exc.fatal or self.strikes >= MAX_STRIKES:
            self.state = State.CLOSING
            reason = exc.message if exc.fatal else "too many protocol errors"
            return Close(reason)
        return None

    def _handle(self, raw: dict[str, Any]) -> Event | None:
        ftype = raw["type"]
        if ftype not in ALLOWED[self.state]:
            if ftype not in CLIENT_FRAMES:
                raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f'unknown frame type "{ftype[:40]}"')
            raise ProtocolError(
                ErrorCode.NOT_ALLOWED, f'"{ftype}" is not allowed while {self.state.value}'
            )
        try:
            request_id: int | None = _request_id(raw.get("id"), "id")
        except ProtocolError:
            request_id = None  # an error reply carries the id only when it was a valid one
        try:
            frame = validate_client_frame(raw)
        except ProtocolError as exc:
            return self._refuse(exc, request_id)
        if ftype == "ping":
            self.send({"type": "pong", "id": frame["id"]})
            return None
        if ftype == "pong":
            return None  # a sign of life is all it is
        if ftype == "hello":
            self._nonce = self._nonce_source(NONCE_BYTES)
            self._claimed_user = frame["user"]
            self._claimed_key = frame["key"]
            self.state = State.CHALLENGED
            self.send({"type": "challenge", "nonce": b64(self._nonce)})
            return None
        if ftype == "auth":
            return self._auth(frame["signature"])
        if ftype == "bye":
            self.state = State.CLOSING
            return Close("quit")
        return Request(frame)

    def _auth(self, signature: bytes) -> Event | None:
        assert self._nonce is not None and self._claimed_user and self._claimed_key
        transcript = login_transcript(
            self._nonce, self._claimed_user, self._claimed_key, self._server_fp
        )
        self._nonce = None  # one signature per challenge, right or wrong
        try:
            nacl.signing.VerifyKey(self._claimed_key).verify(transcript, signature)
        except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError):
            self.state = State.CLOSING
            self.send(error_frame(ErrorCode.BAD_SIGNATURE, "login signature does not verify"))
            return Close("bad login signature")
        self.state = State.AUTHENTICATING
        return LoginVerified(self._claimed_user, self._claimed_key)

    # outcomes decided by the owner (after the store has answered)
    def login_accepted(self, welcome: Mapping[str, Any]) -> None:
        assert self.state is State.AUTHENTICATING
        self.user, self.public_key = self._claimed_user, self._claimed_key
        self.state = State.AUTHENTICATED
        self.send({"type": "welcome", "user": self.user, **welcome})

    def close_with_error(
        self, code: ErrorCode, message: str, request_id: int | None = None
    ) -> Close:
        """Refuse for good (a login the store refused, a full server, a store failure): the
        error frame is the last thing the peer hears."""
        self.state = State.CLOSING
        self.send(error_frame(code, message, request_id))
        return Close(message)

    def reply_error(self, request_id: int, code: ErrorCode, message: str) -> None:
        """Refuse one well-formed request the hub cannot do (not in that room, say): an
        ordinary user mistake, so it is no strike."""
        self.send(error_frame(code, message, request_id))

    def close(self, reason: str) -> None:
        """Tell the peer we are closing (shutdown, replaced, dropped)."""
        if self.state is not State.CLOSING:
            self.state = State.CLOSING
            self.send({"type": "bye", "reason": reason})


def now_ms() -> int:
    return int(time.time() * 1000)
