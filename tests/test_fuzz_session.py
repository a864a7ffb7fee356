"""Property-based tests of the server session state machine: any bytes, in any state, cut into
reads anywhere, give only the session's own events and error frames, and its rules hold.

The stateful test drives one session the way its connection does (real logins with real
signatures, the store's answer, junk and lies in between) and checks the rules after every step.
"""

from __future__ import annotations

import base64
import json

import nacl.signing
from hypothesis import given, note
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from securechat import framing, protocol
from securechat.protocol import Close, LoginVerified, Request, ServerSession, State

from .fuzz_strategies import (
    JSON_VALUES,
    PAYLOADS,
    STREAM_PARTS,
    STREAMS,
    chunked,
    frame_bytes,
    near_valid_frames,
    valid_frames,
)

SERVER_FP = bytes(range(32))
KEY = nacl.signing.SigningKey(b"f" * 32)
OPEN_STATES = [State.CONNECTED, State.CHALLENGED, State.AUTHENTICATING, State.AUTHENTICATED]
REPLY_TYPES = {"error", "pong", "challenge", "welcome", "bye"}
ERROR_MESSAGE_MAX = 200  # an error never echoes more than a short piece of what it refuses
REQUEST_TYPES = protocol.ALLOWED[State.AUTHENTICATED] - {"ping", "bye"}


def wire(frame: dict) -> bytes:
    return framing.encode(frame)


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def counting_nonces() -> object:
    count = iter(range(1 << 30))
    return lambda n: next(count).to_bytes(n, "big")


def hello(user: str = "alice") -> bytes:
    return wire({"type": "hello", "user": user, "key": b64(bytes(KEY.verify_key)), "version": 1})


def auth_for(nonce: bytes, user: str = "alice") -> bytes:
    transcript = protocol.login_transcript(nonce, user, bytes(KEY.verify_key), SERVER_FP)
    return wire({"type": "auth", "signature": b64(KEY.sign(transcript).signature)})


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


def session_in(state: State) -> ServerSession:
    """A session brought to `state` by a real login."""
    s = ServerSession(SERVER_FP, nonce_source=counting_nonces())
    if state is State.CONNECTED:
        return s
    s.receive_data(hello())
    if state is not State.CHALLENGED:
        [challenge] = replies(s)
        [verified] = s.receive_data(auth_for(base64.b64decode(challenge["nonce"])))
        assert isinstance(verified, LoginVerified)
        if state is State.AUTHENTICATED:
            s.login_accepted({})
    s.take_outbox()
    assert s.state is state
    return s


def check_outcome(start: State, s: ServerSession, events: list, frames: list[dict]) -> None:
    """The rules every run of receive_data obeys, whatever it was fed."""
    assert all(isinstance(e, LoginVerified | Request | Close) for e in events)
    closes = [e for e in events if isinstance(e, Close)]
    assert len(closes) <= 1
    if closes:
        assert events[-1] is closes[0]
        assert s.state is State.CLOSING
    # Junk cannot sign a login, so no login is verified from it.
    assert not any(isinstance(e, LoginVerified) for e in events)
    for e in events:
        if isinstance(e, Request):
            assert start is State.AUTHENTICATED, "a request before login"
            assert e.type in REQUEST_TYPES
            assert protocol.validate_client_frame(e.frame) == e.frame
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
    if start is not State.AUTHENTICATED:
        assert s.state in {start, State.CLOSING} or (start, s.state) == (
            State.CONNECTED,
            State.CHALLENGED,
        )


@given(st.sampled_from(OPEN_STATES), STREAMS, st.data())
def test_any_stream_in_any_state_gives_only_events_and_error_frames(state, stream, data):
    reads = data.draw(chunked(stream))
    s = session_in(state)
    events = [e for read in reads for e in s.receive_data(read)]
    frames = replies(s)
    check_outcome(state, s, events, frames)
    # The same bytes in one read give exactly the same result: reads are not messages.
    whole = session_in(state)
    assert whole.receive_data(stream) == events
    assert (replies(whole), whole.state, whole.strikes) == (frames, s.state, s.strikes)


@given(st.sampled_from(OPEN_STATES), st.lists(near_valid_frames() | valid_frames(), max_size=8))
def test_frames_of_any_shape_in_any_state(state, frames):
    s = session_in(state)
    events = s.receive_data(b"".join(frame_bytes(json.dumps(f).encode()) for f in frames))
    check_outcome(state, s, events, replies(s))


LONG_VALUES = st.builds(
    lambda ch, n: ch * n,
    st.sampled_from(["\\", '"', "\x00", "\u2028", "é", "a"]),
    st.integers(min_value=1_000, max_value=40_000),
)


@given(
    st.sampled_from(OPEN_STATES),
    valid_frames(),
    st.sampled_from(["type", "version", "user", "room", "text", "id", "extra"]),
    LONG_VALUES,
)
def test_a_long_value_in_any_field_is_refused_briefly(state, frame, field, value):
    s = session_in(state)
    if field == "version":
        frame = {"type": "hello", "user": "alice", "key": b64(bytes(32)), "version": value}
    frame[field] = value
    payload = json.dumps(frame, ensure_ascii=False).encode()
    events = s.receive_data(frame_bytes(payload))
    check_outcome(state, s, events, replies(s))


@given(st.sampled_from(OPEN_STATES), st.lists(STREAM_PARTS, min_size=1, max_size=8))
def test_after_a_close_nothing_more_happens(state, parts):
    s = session_in(state)
    s.receive_data(b"".join(frame_bytes(b'{"type":"nope"}') for _ in range(protocol.MAX_STRIKES)))
    assert s.state is State.CLOSING
    s.take_outbox()
    for part in parts:
        assert s.receive_data(part) == []
    assert s.take_outbox() == []
    s.close("again")
    assert (s.state, s.take_outbox()) == (State.CLOSING, [])


class SessionMachine(RuleBasedStateMachine):
    """One session driven as its connection drives it, with hostile input mixed in.

    `in_sync` is False once raw bytes may have left a partial frame in the decoder: from then on
    the exact outcome of a frame cannot be predicted, but the safety rules still must hold.
    """

    def __init__(self) -> None:
        super().__init__()
        self.s = ServerSession(SERVER_FP, nonce_source=counting_nonces())
        self.in_sync = True
        self.closed = False
        self.nonce: bytes | None = None
        self.logged_in = False
        self.signing = False  # only a correctly signed auth may verify a login
        self.strikes_seen = 0

    def feed(self, data: bytes, reads: list[bytes]) -> tuple[list, list[dict]]:
        start = self.s.state
        events = [e for read in reads for e in self.s.receive_data(read)]
        frames = replies(self.s)
        note(f"{start.value} + {data[:60]!r}... -> {events} {[f['type'] for f in frames]}")
        if start is State.CLOSING:
            assert (events, frames) == ([], [])
        for frame in frames:
            if frame["type"] == "challenge":
                self.nonce = base64.b64decode(frame["nonce"])
        for event in events:
            if isinstance(event, Request):
                assert self.logged_in and not self.closed
            if isinstance(event, LoginVerified):
                assert self.signing and start is State.CHALLENGED
            if isinstance(event, Close):
                self.closed = True
        assert self.s.strikes >= self.strikes_seen  # strikes are never forgiven
        self.strikes_seen = self.s.strikes
        return events, frames

    @rule(data=st.data())
    def say_hello(self, data):
        raw = hello()
        start = self.s.state
        events, frames = self.feed(raw, data.draw(chunked(raw)))
        if self.in_sync and start is State.CONNECTED:
            assert events == [] and [f["type"] for f in frames] == ["challenge"]
            assert self.s.state is State.CHALLENGED
        elif self.in_sync and start is not State.CLOSING:
            assert frames[0]["code"] == "not_allowed"

    @precondition(lambda self: self.nonce is not None)
    @rule(data=st.data(), right=st.booleans())
    def answer_the_challenge(self, data, right):
        raw = auth_for(self.nonce if right else b"\xff" * protocol.NONCE_BYTES)
        start = self.s.state
        self.signing = right
        events, _ = self.feed(raw, data.draw(chunked(raw)))
        self.signing = False
        if self.in_sync and start is State.CHALLENGED:
            self.nonce = None  # one signature per challenge
            if right:
                assert events == [LoginVerified("alice", bytes(KEY.verify_key))]
                assert self.s.state is State.AUTHENTICATING
            else:
                assert events == [Close("bad login signature")]

    @rule(accept=st.booleans())
    def the_store_answers(self, accept):
        # The connection answers a verified login only while the session still waits for it.
        if self.s.state is not State.AUTHENTICATING:
            return
        if accept:
            self.s.login_accepted({"server": "test"})
            self.logged_in = True
            assert [f["type"] for f in replies(self.s)] == ["welcome"]
            assert self.s.state is State.AUTHENTICATED
        else:
            assert self.s.login_refused("name_taken", "taken") == Close("taken")
            self.closed = True
            assert replies(self.s)[0]["code"] == "name_taken"

    @rule(data=st.data(), frame=valid_frames() | near_valid_frames())
    def send_a_frame(self, data, frame):
        try:
            raw = wire(frame)
        except (TypeError, ValueError, UnicodeEncodeError):
            return  # not representable as a frame at all
        start = self.s.state
        events, _ = self.feed(raw, data.draw(chunked(raw)))
        if self.in_sync and start not in {State.CLOSING, State.AUTHENTICATED}:
            assert not any(isinstance(e, Request) for e in events)

    @rule(data=st.data(), payload=PAYLOADS)
    def send_a_payload(self, data, payload):
        raw = frame_bytes(payload)
        if len(payload) > framing.MAX_FRAME_DEFAULT:
            self.in_sync = False
        self.feed(raw, data.draw(chunked(raw)))

    @rule(data=st.data(), part=STREAM_PARTS)
    def send_raw_bytes(self, data, part):
        self.in_sync = False
        self.feed(part, data.draw(chunked(part)))

    @rule(junk=JSON_VALUES)
    def the_server_closes(self, junk):
        was_open = self.s.state is not State.CLOSING
        self.s.close(str(junk)[:50])
        self.closed = True
        # A bye with the reason the first time, and nothing once closed.
        assert [f["type"] for f in replies(self.s)] == (["bye"] if was_open else [])

    @invariant()
    def closed_stays_closed(self):
        if self.closed:
            assert self.s.state is State.CLOSING
        if self.s.state is State.CLOSING:
            self.closed = True

    @invariant()
    def nothing_but_login_before_login(self):
        if not self.logged_in:
            assert self.s.user is None
            assert self.s.state is not State.AUTHENTICATED

    @invariant()
    def strikes_are_bounded(self):
        assert self.s.strikes <= protocol.MAX_STRIKES
        if self.s.strikes == protocol.MAX_STRIKES:
            assert self.s.state is State.CLOSING


TestSessionMachine = SessionMachine.TestCase
