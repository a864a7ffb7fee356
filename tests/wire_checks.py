"""Checks shared by the property-based tests and the coverage-guided harness
(scripts/fuzz_codec.py): sessions brought to a state by a real login, and a decoder run over
reads as a connection runs it. No test framework here, so the harness can import it."""

from __future__ import annotations

import base64
import json

import nacl.signing

from securechat import framing, protocol
from securechat.e2e.device import valid_device_id
from securechat.errors import ProtocolError
from securechat.protocol import Close, LoginVerified, Request, ServerSession, State

SERVER_FP = bytes(range(32))
NONCE = b"\x07" * protocol.NONCE_BYTES  # fixed, so that AUTH below answers every challenge
KEY = nacl.signing.SigningKey(b"f" * 32)
OPEN_STATES = [State.CONNECTED, State.CHALLENGED, State.AUTHENTICATING, State.AUTHENTICATED]
ORDER = [*OPEN_STATES, State.CLOSING]
REPLY_TYPES = {"error", "pong", "challenge", "bye"}
ERROR_MESSAGE_MAX = 200  # an error never echoes more than a short piece of what it refuses
REQUEST_TYPES = protocol.ALLOWED[State.AUTHENTICATED] - {"ping", "bye"}


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


HELLO = framing.encode(
    {
        "type": "hello",
        "user": "alice",
        "key": b64(bytes(KEY.verify_key)),
        "version": 2,
        "device": "ABCDEFGHIJKLMNOP",
    }
)
AUTH = framing.encode(
    {
        "type": "auth",
        "signature": b64(
            KEY.sign(
                protocol.login_transcript(NONCE, "alice", bytes(KEY.verify_key), SERVER_FP)
            ).signature
        ),
    }
)


def session_in(state: State, max_frame: int = framing.MAX_FRAME_DEFAULT) -> ServerSession:
    """A session brought to `state` by a real login, its outbox emptied."""
    s = ServerSession(SERVER_FP, max_frame=max_frame, nonce_source=lambda n: NONCE[:n])
    if state is not State.CONNECTED:
        s.receive_data(HELLO)
    if state in (State.AUTHENTICATING, State.AUTHENTICATED):
        [verified] = s.receive_data(AUTH)
        assert isinstance(verified, LoginVerified)
    if state is State.AUTHENTICATED:
        s.login_accepted({})
    s.take_outbox()
    assert s.state is state
    return s


def decode_all(reads: list[bytes], max_frame: int) -> tuple[list[bytes], str | None, int | None]:
    """Feed reads one by one as a connection would: (payloads, None, bytes left buffered), or
    (payloads, the fatal error's code, None) when the stream went bad."""
    decoder = framing.FrameDecoder(max_frame)
    payloads: list[bytes] = []
    for data in reads:
        decoder.feed(data)
        try:
            while (payload := decoder.next_payload()) is not None:
                payloads.append(payload)
        except ProtocolError as exc:
            assert exc.fatal, exc.code
            assert exc.code in {"frame_too_large", "bad_frame"}
            return payloads, exc.code, None
        # What is left is the start of one frame, never more than a legal frame could be.
        assert decoder.buffered < framing.HEADER.size + max_frame
    return payloads, None, decoder.buffered


def replies(session: ServerSession) -> list[dict]:
    """The frames the session queued, each checked to be one well-formed frame."""
    frames = []
    for chunk in session.take_outbox():
        decoder = framing.FrameDecoder()
        decoder.feed(chunk)
        [payload] = decoder.payloads()
        assert decoder.buffered == 0
        frames.append(json.loads(payload))
    return frames


def check_outcome(start: State, s: ServerSession, events: list, frames: list[dict]) -> None:
    """The rules every run of receive_data obeys, whatever it was fed."""
    assert all(isinstance(e, LoginVerified | Request | Close) for e in events)
    closes = [e for e in events if isinstance(e, Close)]
    assert len(closes) <= 1
    if closes:
        assert events[-1] is closes[0]
        assert s.state is State.CLOSING
    # Only AUTH above can sign a login, and only in answer to a challenge.
    for e in events:
        if isinstance(e, LoginVerified):
            # The signature proves the user's key; the device id is the client's claim (any
            # well-formed one: it is proven later, by the device record the identity signs).
            assert (e.user, e.public_key) == ("alice", bytes(KEY.verify_key))
            assert valid_device_id(e.device)
            assert start in (State.CONNECTED, State.CHALLENGED)
    for e in events:
        if isinstance(e, Request):
            assert start is State.AUTHENTICATED, "a request before login"
            assert e.type in REQUEST_TYPES
            assert isinstance(e.frame, protocol.REQUEST_CLASSES)
    assert {f["type"] for f in frames} <= REPLY_TYPES
    errors = [f for f in frames if f["type"] == "error"]
    for f in errors:
        assert isinstance(f["code"], str)
        assert isinstance(f["message"], str)
        assert len(f["message"]) <= ERROR_MESSAGE_MAX, f["message"][:80]
    # One error frame per strike; a bad login signature closes at once without one.
    bad_signature = [f for f in errors if f["code"] == "bad_signature"]
    assert len(errors) == s.strikes + len(bad_signature)
    assert s.strikes <= protocol.MAX_STRIKES
    if s.strikes == protocol.MAX_STRIKES:
        assert s.state is State.CLOSING
    # States only move forward, and only the owner's login_accepted() authenticates.
    assert ORDER.index(s.state) >= ORDER.index(start)
    if start is not State.AUTHENTICATED:
        assert s.state is not State.AUTHENTICATED
