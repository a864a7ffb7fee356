"""The server session state machine and login transcript, fed bytes directly: no sockets."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import nacl.signing
import pytest

from securechat import framing, protocol
from securechat.errors import ErrorCode
from securechat.protocol import Close, LoginVerified, Request, ServerSession, State

SERVER_FP = bytes(range(32))
NONCE = b"n" * 32


def frames_of(session: ServerSession) -> list[dict]:
    decoder = framing.FrameDecoder()
    for chunk in session.take_outbox():
        decoder.feed(chunk)
    return [json.loads(p) for p in decoder.payloads()]


def wire(frame: dict) -> bytes:
    return framing.encode(frame)


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


@pytest.fixture
def key() -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey(b"k" * 32)


def session() -> ServerSession:
    return ServerSession(SERVER_FP, nonce_source=lambda n: NONCE[:n])


DEVICE = "ABCDEFGHIJKLMNOP"


def hello(key: nacl.signing.SigningKey, user: str = "alice") -> bytes:
    return wire(
        {
            "type": "hello",
            "user": user,
            "key": b64(bytes(key.verify_key)),
            "version": 2,
            "device": DEVICE,
        }
    )


def signed_auth(
    key: nacl.signing.SigningKey, user: str = "alice", fp: bytes = SERVER_FP, nonce: bytes = NONCE
) -> bytes:
    transcript = protocol.login_transcript(nonce, user, bytes(key.verify_key), fp)
    return wire({"type": "auth", "signature": b64(key.sign(transcript).signature)})


def logged_in(key: nacl.signing.SigningKey) -> ServerSession:
    s = session()
    s.receive_data(hello(key))
    s.receive_data(signed_auth(key))
    s.login_accepted({})
    s.take_outbox()
    return s


def test_login_happy_path(key) -> None:
    s = session()
    assert s.receive_data(hello(key)) == []
    assert frames_of(s) == [{"type": "challenge", "nonce": b64(NONCE)}]
    assert s.state is State.CHALLENGED
    events = s.receive_data(signed_auth(key))
    assert events == [LoginVerified("alice", bytes(key.verify_key), DEVICE)]
    assert s.state is State.AUTHENTICATING
    s.login_accepted({"server": "test"})
    assert frames_of(s) == [
        {"type": "welcome", "user": "alice", "device": DEVICE, "version": 2, "server": "test"}
    ]
    assert s.state is State.AUTHENTICATED


def test_hello_and_auth_in_one_read(key) -> None:
    # The client cannot know the nonce in advance, so auth in the same read is signed wrongly.
    s = session()
    events = s.receive_data(hello(key) + signed_auth(key, nonce=b"x" * 32))
    assert events == [Close("bad login signature")]
    assert frames_of(s)[-1]["code"] == "bad_signature"


@pytest.mark.parametrize(
    "bad",
    [
        {"fp": b"\x01" * 32},  # signed for another server
        {"user": "mallory"},  # signed for another name
        {"nonce": b"o" * 32},  # signed for another login
    ],
)
def test_signature_for_another_server_name_or_login_is_refused(key, bad) -> None:
    s = session()
    s.receive_data(hello(key))
    s.take_outbox()
    kwargs = {"user": "alice", "fp": SERVER_FP, "nonce": NONCE, **bad}
    assert s.receive_data(signed_auth(key, **kwargs)) == [Close("bad login signature")]
    assert frames_of(s) == [
        {"type": "error", "code": "bad_signature", "message": "login signature does not verify"}
    ]
    assert s.state is State.CLOSING


def test_signature_by_another_key_is_refused(key) -> None:
    s = session()
    s.receive_data(hello(key))
    other = nacl.signing.SigningKey(b"o" * 32)
    transcript = protocol.login_transcript(NONCE, "alice", bytes(key.verify_key), SERVER_FP)
    frame = wire({"type": "auth", "signature": b64(other.sign(transcript).signature)})
    assert s.receive_data(frame) == [Close("bad login signature")]


def test_transcript_fields_are_length_prefixed_so_they_cannot_be_shifted() -> None:
    a = protocol.login_transcript(NONCE, "ab", b"c" * 32, SERVER_FP)
    b = protocol.login_transcript(NONCE, "a", b"b" + b"c" * 32, SERVER_FP)
    assert a != b
    assert a.startswith(len(protocol.LOGIN_CONTEXT).to_bytes(4, "big") + protocol.LOGIN_CONTEXT)


@pytest.mark.parametrize("ftype", ["join", "say", "rooms", "who", "part", "auth", "bye"])
def test_frames_before_login_are_refused_as_not_allowed(ftype) -> None:
    s = session()
    assert s.receive_data(wire({"type": ftype, "id": 1})) == []
    [error] = frames_of(s)
    assert error["type"] == "error"
    assert error["code"] == "not_allowed"
    assert error["message"] == f'"{ftype}" is not allowed while connected'
    assert s.state is State.CONNECTED


def test_ping_is_answered_in_any_open_state(key) -> None:
    s = session()
    s.receive_data(wire({"type": "ping", "id": 9}))
    assert frames_of(s) == [{"type": "pong", "id": 9}]


def test_unknown_type_is_refused_with_its_own_code() -> None:
    s = session()
    s.receive_data(wire({"type": "teleport"}))
    assert frames_of(s)[0]["code"] == "unknown_type"


def test_five_strikes_close_the_connection() -> None:
    s = session()
    events = s.receive_data(b"".join(wire({"type": "nope"}) for _ in range(10)))
    assert events == [Close("too many protocol errors")]
    assert len(frames_of(s)) == protocol.MAX_STRIKES
    assert s.state is State.CLOSING
    assert s.receive_data(wire({"type": "ping", "id": 1})) == []


def test_oversized_frame_closes_at_once() -> None:
    s = ServerSession(SERVER_FP, max_frame=1024)
    events = s.receive_data(b"\xff\xff\xff\xff")
    assert events == [Close("frame header announces 4294967295 bytes; the limit is 1024")]
    assert frames_of(s)[0]["code"] == "frame_too_large"


def test_a_limit_too_small_for_our_own_replies_is_refused() -> None:
    # Found by fuzzing: with a 64-byte limit, encoding a refusal raised out of receive_data.
    with pytest.raises(ValueError, match="at least 1024 bytes"):
        ServerSession(SERVER_FP, max_frame=framing.MIN_FRAME - 1)


def test_the_longest_refusals_fit_the_smallest_limit() -> None:
    s = ServerSession(SERVER_FP, max_frame=framing.MIN_FRAME)
    key = b64(bytes(32))
    worst = [
        {"type": "\x01" * 100},  # an unknown type is quoted up to 40 characters, 6 bytes each
        {"type": "hello", "user": "a", "key": key, "version": "\x01" * 100},
        {"type": "hello", "user": "a", "key": key, "version": "\U0010ffff" * 100},
    ]
    for frame in worst:
        assert s.receive_data(wire(frame)) == []
    assert [f["code"] for f in frames_of(s)] == ["unknown_type", "bad_version", "bad_version"]


def test_request_after_login_becomes_a_checked_event(key) -> None:
    s = logged_in(key)
    events = s.receive_data(
        wire({"type": "say", "id": 3, "room": "#lobby", "text": "hi", "extra": "ignored"})
    )
    assert events == [Request(protocol.Say(id=3, room="#lobby", text="hi"))]


@pytest.mark.parametrize(
    ("frame", "code", "message"),
    [
        ({"type": "say", "id": 1, "room": "#lobby"}, "bad_field", 'field "text" is missing'),
        (
            {"type": "say", "id": 1, "room": "#lobby", "text": 5},
            "bad_field",
            'field "text" must be a string',
        ),
        (
            {"type": "say", "id": 1, "room": "#lobby", "text": "  "},
            "bad_field",
            'field "text" must not be empty',
        ),
        (
            {"type": "say", "id": True, "room": "#lobby", "text": "x"},
            "bad_field",
            'field "id" must be an integer from 0 to 2^53',
        ),
        (
            {"type": "join", "id": 1, "room": "lobby"},
            "bad_room",
            "room name must start with # and hold only a-z, 0-9 and _ . -",
        ),
        (
            {"type": "join", "id": 1, "room": "#" + "a" * 40},
            "bad_room",
            "room name must be # and 1 to 31 characters",
        ),
        (
            {"type": "say", "id": 1, "room": "#lobby", "text": "x", "action": "yes"},
            "bad_field",
            'field "action" must be true or false',
        ),
    ],
)
def test_bad_fields_get_a_precise_error_and_the_session_goes_on(key, frame, code, message):
    s = logged_in(key)
    assert s.receive_data(wire(frame)) == []
    [error] = frames_of(s)
    assert (error["code"], error["message"]) == (code, message)
    assert error.get("id") == (frame["id"] if type(frame["id"]) is int else None)
    assert s.state is State.AUTHENTICATED


@pytest.mark.parametrize(
    ("user", "why"),
    [
        ("Alice", "may hold only a-z, 0-9 and _ . - and must start with a letter or digit"),
        ("-alice", "may hold only a-z, 0-9 and _ . - and must start with a letter or digit"),
        ("a" * 33, "must be 1 to 32 characters"),
        ("", "must be 1 to 32 characters"),
        ("al ice", "may hold only a-z, 0-9 and _ . - and must start with a letter or digit"),
    ],
)
def test_bad_user_names_are_refused(key, user, why) -> None:
    s = session()
    s.receive_data(hello(key, user))
    [error] = frames_of(s)
    assert (error["code"], error["message"]) == ("bad_name", f"user name {why}")
    assert s.state is State.CONNECTED


def test_version_1_is_refused_so_no_one_can_downgrade(key) -> None:
    s = session()
    s.receive_data(
        wire({"type": "hello", "user": "a", "key": b64(bytes(32)), "version": 1, "device": DEVICE})
    )
    assert frames_of(s) == [
        {
            "type": "error",
            "code": "bad_version",
            "message": "protocol version 1 is not supported (need 2)",
        }
    ]
    assert s.state is State.CONNECTED


def test_a_long_version_is_refused_with_one_short_error() -> None:
    # Found by fuzzing: the refusal echoed the whole value, so its error frame overflowed the
    # frame limit, the client got "frame_too_large" instead, and it cost two strikes.
    s = session()
    s.receive_data(
        wire({"type": "hello", "user": "a", "key": b64(bytes(32)), "version": "\\" * 30_000})
    )
    assert frames_of(s) == [
        {
            "type": "error",
            "code": "bad_version",
            "message": "protocol version '" + "\\" * 39 + " is not supported (need 2)",
        }
    ]
    assert s.strikes == 1


def test_login_refused_closes_with_the_reason(key) -> None:
    s = session()
    s.receive_data(hello(key))
    s.receive_data(signed_auth(key))
    s.take_outbox()
    assert s.close_with_error(ErrorCode.NAME_TAKEN, "taken") == Close("taken")
    assert frames_of(s) == [{"type": "error", "code": "name_taken", "message": "taken"}]
    assert s.state is State.CLOSING


def test_every_state_has_a_rule() -> None:
    assert set(protocol.ALLOWED) == set(State)
    for allowed in protocol.ALLOWED.values():
        assert allowed <= set(protocol.CLIENT_FRAMES)


def test_the_ciphertext_bound_is_the_megolm_envelopes() -> None:
    # protocol.py cannot import securechat.megolm (which imports it), so it states the bound.
    from securechat.megolm.envelope import MAX_CIPHERTEXT

    assert protocol.CIPHERTEXT_MAX == MAX_CIPHERTEXT


def test_the_protocol_doc_lists_exactly_the_error_codes_of_the_enum() -> None:
    rows = [f"| `{c.value}` | {c.when} | {c.closes} |" for c in ErrorCode]
    table = "\n".join(["| code | when | closes the connection |", "|---|---|---|", *rows])
    doc = (Path(__file__).parent.parent / "docs" / "PROTOCOL.md").read_text()
    assert table + "\n" in doc
    assert len(rows) == 33


def test_a_table_entry_without_a_frame_class_is_caught_at_import(monkeypatch) -> None:
    monkeypatch.setitem(protocol.TRANSITIONS[State.AUTHENTICATED], "shout", State.AUTHENTICATED)
    with pytest.raises(RuntimeError) as info:
        protocol._check_tables()
    assert str(info.value).startswith("protocol tables disagree: frame types in TRANSITIONS")


def test_a_request_no_state_accepts_is_caught_at_import(monkeypatch) -> None:
    monkeypatch.delitem(protocol.TRANSITIONS[State.AUTHENTICATED], "who")
    with pytest.raises(RuntimeError) as info:
        protocol._check_tables()
    assert "!= frame classes" in str(info.value)


def test_a_request_without_a_server_handler_is_caught_at_import(monkeypatch) -> None:
    from securechat.server import connection, requests

    monkeypatch.delitem(requests.HANDLERS, protocol.Keys)
    with pytest.raises(RuntimeError) as info:
        connection._check_dispatch()
    assert str(info.value) == (
        "request handlers disagree with the protocol: store ['ack', 'claim_prekeys', 'devices', "
        "'dm', 'dms', 'prekey_count', 'publish_device', 'publish_prekeys', 'revoke'], "
        "hub ['history', 'join', 'part', 'rooms', 'say', 'say_encrypted', 'who']"
    )


def test_every_legal_move_of_the_session_is_in_one_table() -> None:
    moves = {
        (state.value, str(key), new.value)
        for state, row in protocol.TRANSITIONS.items()
        for key, new in row.items()
        if new is not state
    }
    assert moves == {
        ("connected", "hello", "challenged"),
        ("challenged", "Signature verified", "authenticating"),
        ("authenticating", "Name bound to the key", "authenticated"),
        ("authenticated", "bye", "closing"),
        *((s, "Close", "closing") for s in ("connected", "challenged", "authenticating")),
        ("authenticated", "Close", "closing"),
    }


def test_a_session_with_an_owner_hands_over_each_frame_and_keeps_no_outbox(key) -> None:
    sent: list[bytes] = []
    s = ServerSession(SERVER_FP, nonce_source=lambda n: NONCE, emit=sent.append)
    s.receive_data(wire({"type": "ping", "id": 4}))
    assert [json.loads(data[4:]) for data in sent] == [{"type": "pong", "id": 4}]
    with pytest.raises(RuntimeError) as info:
        s.take_outbox()  # it would be empty: the frames went to their owner
    assert str(info.value) == "this session hands its frames to emit; it keeps no outbox"
