"""The client side of the protocol, fed bytes: no sockets, no threads. Its login is pinned by a
known-answer vector and checked against the server session it talks to."""

from __future__ import annotations

import hashlib
import json

import nacl.signing
import pytest

from securechat import framing, protocol
from securechat.client.session import ClientSession
from securechat.errors import ErrorCode, ProtocolError
from securechat.identity import Identity
from securechat.protocol import LoginVerified, ServerSession, State

# Known-answer vector: a fixed key seed, nonce, user and server certificate hash. Ed25519
# signatures are deterministic (RFC 8032), so the signature is fixed too.
SEED = bytes(range(32, 64))
NONCE = bytes(range(100, 132))
CERT_SHA256 = hashlib.sha256(b"server certificate").digest()
PUBLIC_KEY_HEX = "29acbae141bccaf0b22e1a94d34d0bc7361e526d0bfe12c89794bc9322966dd7"
TRANSCRIPT_HEX = (
    "00000013" + b"securechat/login/v1".hex()
    + "00000020" + NONCE.hex()
    + "00000005" + b"alice".hex()
    + "00000020" + PUBLIC_KEY_HEX
    + "00000020" + "7321e8efc45b27e9a9bf840845d1da5dfc949e7b49a4c1639373df9e2edf332a"
)  # fmt: skip
SIGNATURE_HEX = (
    "fddfc8fef0210e9470f642030fe3ff74ed6e889d9a0b29312bc8377601cdcce9"
    "65e32f609f7eb5f39217084f8da8ff8bd27064988319280415e1162a5639ca0c"
)


def identity() -> Identity:
    return Identity(path=None, signing_key=nacl.signing.SigningKey(SEED))


def frames(data: bytes) -> list[dict]:
    decoder = framing.FrameDecoder()
    decoder.feed(data)
    return [json.loads(p) for p in decoder.payloads()]


def test_login_transcript_known_answer() -> None:
    assert CERT_SHA256.hex() == TRANSCRIPT_HEX[-64:]
    assert identity().verify_key_bytes.hex() == PUBLIC_KEY_HEX
    transcript = protocol.login_transcript(
        NONCE, "alice", bytes.fromhex(PUBLIC_KEY_HEX), CERT_SHA256
    )
    assert transcript.hex() == TRANSCRIPT_HEX
    assert identity().sign(transcript).hex() == SIGNATURE_HEX


def test_the_client_signs_exactly_the_known_answer() -> None:
    session = ClientSession()
    challenge = {"type": "challenge", "nonce": protocol.b64(NONCE)}
    [auth] = frames(session.auth(challenge, "alice", identity(), CERT_SHA256))
    assert auth == {"type": "auth", "signature": protocol.b64(bytes.fromhex(SIGNATURE_HEX))}


def test_hello_names_the_user_key_and_version() -> None:
    [hello] = frames(ClientSession().hello("alice", identity(), "ABCDEFGHIJKLMNOP"))
    assert hello == {
        "type": "hello",
        "user": "alice",
        "key": protocol.b64(bytes.fromhex(PUBLIC_KEY_HEX)),
        "version": 2,
        "device": "ABCDEFGHIJKLMNOP",
    }


@pytest.mark.parametrize("nonce", [None, 5, "not base64!", protocol.b64(b"short")])
def test_a_bad_challenge_is_refused_with_a_clear_error(nonce: object) -> None:
    with pytest.raises(ProtocolError) as info:
        ClientSession().auth({"type": "challenge", "nonce": nonce}, "alice", identity(), b"")
    assert (info.value.code, info.value.message) == (
        ErrorCode.BAD_FIELD,
        'server sent a bad "nonce"',
    )


def test_a_login_between_a_client_and_a_server_session() -> None:
    """The two sans-IO halves wired together: what one writes, the other reads."""
    client, server = ClientSession(), ServerSession(CERT_SHA256, nonce_source=lambda n: NONCE)
    assert server.receive_data(client.hello("alice", identity(), "ABCDEFGHIJKLMNOP")) == []
    [challenge] = client.receive_data(b"".join(server.take_outbox()))
    assert challenge == {"type": "challenge", "nonce": protocol.b64(NONCE)}
    events = server.receive_data(client.auth(challenge, "alice", identity(), CERT_SHA256))
    assert events == [LoginVerified("alice", bytes.fromhex(PUBLIC_KEY_HEX), "ABCDEFGHIJKLMNOP")]
    server.login_accepted({"max_frame": 8192})
    [welcome] = client.receive_data(b"".join(server.take_outbox()))
    assert welcome == {
        "type": "welcome",
        "user": "alice",
        "device": "ABCDEFGHIJKLMNOP",
        "version": 2,
        "max_frame": 8192,
    }
    assert server.state is State.AUTHENTICATED


def test_requests_are_numbered_from_one() -> None:
    session = ClientSession()
    first_id, first = session.request("join", room="#dev")
    second_id, second = session.request("ping")
    assert (first_id, second_id) == (1, 2)
    assert frames(first + second) == [
        {"type": "join", "id": 1, "room": "#dev"},
        {"type": "ping", "id": 2},
    ]


def test_frames_come_out_only_when_complete_however_the_bytes_are_cut() -> None:
    data = framing.encode({"type": "pong", "id": 1}) + framing.encode({"type": "ok", "id": 2})
    session = ClientSession()
    got = []
    for i in range(len(data)):
        got += session.receive_data(data[i : i + 1])
        if i < len(data) // 2 - 1:
            assert got == []
    assert got == [{"type": "pong", "id": 1}, {"type": "ok", "id": 2}]


def test_a_malformed_frame_from_the_server_raises() -> None:
    with pytest.raises(ProtocolError) as info:
        ClientSession().receive_data(framing.HEADER.pack(3) + b"{x}")
    assert (info.value.code, info.value.message) == (ErrorCode.BAD_JSON, "frame is not valid JSON")


def test_a_header_over_the_limit_raises_before_buffering() -> None:
    with pytest.raises(ProtocolError) as info:
        ClientSession(max_frame=4096).receive_data(framing.HEADER.pack(4097))
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE
    assert info.value.fatal
