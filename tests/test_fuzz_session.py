"""Property-based tests of the server session state machine: any bytes, in any state, cut into
reads anywhere, give only the session's own events and error frames, and its rules hold.

The stateful test drives one session the way its connection does (real logins with real
signatures, the store's answer, junk and lies in between) and checks the rules after every step.
"""

from __future__ import annotations

import base64
import json

from hypothesis import given, note
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from securechat import framing, protocol
from securechat.errors import ErrorCode, ProtocolError
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
from .wire_checks import (
    HELLO,
    KEY,
    OPEN_STATES,
    SERVER_FP,
    b64,
    check_outcome,
    replies,
    session_in,
)


def counting_nonces() -> object:
    count = iter(range(1 << 30))
    return lambda n: next(count).to_bytes(n, "big")


def auth_for(nonce: bytes, user: str = "alice") -> bytes:
    transcript = protocol.login_transcript(nonce, user, bytes(KEY.verify_key), SERVER_FP)
    return framing.encode({"type": "auth", "signature": b64(KEY.sign(transcript).signature)})


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


# Values at and past the edge of each say field's check.
SAY_EDGE_VALUES: dict[str, list[object]] = {
    "id": [0, 2**53 - 1, 2**53, -1, True, False, 1.0, "1", None],
    "room": ["#a", "#" + "a" * 31, "#" + "a" * 32, "#", "#A", "lobby", "#a\n", 5, None],
    "text": ["x", "x" * 8000, "x" * 8001, "", " \t", "\u2028", 5, None, []],
    "action": [True, False, None, 0, 1, "yes"],
    "resume": [True, False, None, 0, 1, "yes"],
}
SAY_EDGES = {field: st.sampled_from(values) for field, values in SAY_EDGE_VALUES.items()}
_LONGEST = base64.b64encode(bytes(protocol.CIPHERTEXT_MAX)).decode()
SAY_ENCRYPTED_EDGE_VALUES: dict[str, list[object]] = {
    **{field: SAY_EDGE_VALUES[field] for field in ("id", "room", "resume")},
    "session_id": ["a", "+/=_-", "a" * 128, "a" * 129, "", "a b", "\u00e9", 5, None],
    "ciphertext": ["AA==", "AB==", "AA", "A===", "", "QUJD\n", "-_8=", _LONGEST, _LONGEST[:-4]
                   + "AAAA", "\u00e9AA=", 5, None],
}  # fmt: skip
SAY_ENCRYPTED_EDGES = {
    field: st.sampled_from(values) for field, values in SAY_ENCRYPTED_EDGE_VALUES.items()
}


@st.composite
def say_frames(draw: st.DrawFn) -> dict:
    """A say or say_encrypted, valid or with fields dropped, set to edge values or to any JSON
    value."""
    ftype = draw(st.sampled_from(["say", "say_encrypted"]))
    edges = SAY_EDGES if ftype == "say" else SAY_ENCRYPTED_EDGES
    frame = draw(valid_frames((ftype,)))
    for field in draw(st.lists(st.sampled_from(sorted(edges)), max_size=3)):
        how = draw(st.sampled_from(["drop", "edge", "any"]))
        if how == "drop":
            frame.pop(field, None)
        else:
            frame[field] = draw(edges[field] if how == "edge" else JSON_VALUES)
    return frame


def check_quick_say(frame: dict) -> None:
    quick = protocol._QUICK[frame["type"]](frame)
    try:
        full = protocol.parse_client_frame(frame)
    except ProtocolError:
        assert quick is None
    else:
        assert quick is None or quick == full


@given(say_frames())
def test_the_quick_say_check_passes_only_what_the_full_check_passes(frame):
    check_quick_say(frame)


def test_every_edge_value_of_every_say_field() -> None:
    base = {"type": "say", "id": 1, "room": "#lobby", "text": "hi"}
    for field, values in SAY_EDGE_VALUES.items():
        check_quick_say({k: v for k, v in base.items() if k != field})
        for value in values:
            check_quick_say({**base, field: value})


def test_every_edge_value_of_every_say_encrypted_field() -> None:
    base = {"type": "say_encrypted", "id": 1, "room": "#team"}
    base |= {"session_id": "s", "ciphertext": "AA=="}
    assert protocol._quick_say_encrypted(base) == protocol.parse_client_frame(base)
    for field, values in SAY_ENCRYPTED_EDGE_VALUES.items():
        check_quick_say({k: v for k, v in base.items() if k != field})
        for value in values:
            check_quick_say({**base, field: value})


def valid_id(value: object) -> int | None:
    try:
        return protocol._request_id(value, "id")
    except ProtocolError:
        return None


@given(st.lists(say_frames(), min_size=1, max_size=8))
def test_says_of_any_shape_get_what_the_full_check_gives(frames):
    s = session_in(State.AUTHENTICATED)
    events = s.receive_data(b"".join(frame_bytes(json.dumps(f).encode()) for f in frames))
    frames_out = replies(s)
    check_outcome(State.AUTHENTICATED, s, events, frames_out)
    requests: list[Request] = []
    errors: list[dict] = []
    for sent in frames:
        if len(errors) == protocol.MAX_STRIKES:
            break
        request_id = None
        try:
            frame = framing.parse(json.dumps(sent).encode())  # NaN and Infinity are not JSON
            request_id = valid_id(frame.get("id"))
            requests.append(Request(protocol.parse_client_frame(frame)))
        except ProtocolError as exc:
            error = protocol.error_frame(exc.code, exc.message, request_id)
            errors.append(json.loads(json.dumps(error)))
    assert [e for e in events if isinstance(e, Request)] == requests
    assert [f for f in frames_out if f["type"] == "error"] == errors


def test_a_valid_say_becomes_a_request_by_the_quick_path():
    s = session_in(State.AUTHENTICATED)
    frame = {"type": "say", "id": 9, "room": "#lobby", "text": "hi", "resume": True}
    assert protocol._quick_say(frame) == protocol.Say(9, "#lobby", "hi", False, True)
    events = s.receive_data(frame_bytes(json.dumps(frame).encode()))
    assert events == [Request(protocol.Say(9, "#lobby", "hi", False, True))]
    assert (replies(s), s.state, s.strikes) == ([], State.AUTHENTICATED, 0)


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

    def feed(self, data: bytes, reads: list[bytes], ours: bool = False) -> tuple[list, list[dict]]:
        """Feed the reads; `ours` says the bytes are our own hello, so a challenge is ours."""
        start = self.s.state
        events = [e for read in reads for e in self.s.receive_data(read)]
        frames = replies(self.s)
        note(f"{start.value} + {data[:60]!r}... -> {events} {[f['type'] for f in frames]}")
        if start is State.CLOSING:
            assert (events, frames) == ([], [])
        for frame in frames:
            if frame["type"] == "challenge":
                # A challenge to someone else's hello (another key) is not ours to answer.
                self.nonce = base64.b64decode(frame["nonce"]) if ours else None
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
        raw = HELLO
        start = self.s.state
        events, frames = self.feed(raw, data.draw(chunked(raw)), ours=True)
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
                assert events == [LoginVerified("alice", bytes(KEY.verify_key), "ABCDEFGHIJKLMNOP")]
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
            assert self.s.close_with_error(ErrorCode.NAME_TAKEN, "taken") == Close("taken")
            self.closed = True
            assert replies(self.s)[0]["code"] == "name_taken"

    @rule(data=st.data(), frame=valid_frames() | near_valid_frames())
    def send_a_frame(self, data, frame):
        try:
            raw = framing.encode(frame)
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
