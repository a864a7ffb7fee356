"""The frame codec, fed bytes directly: no sockets."""

from __future__ import annotations

import struct

import pytest

from securechat import framing
from securechat.errors import ProtocolError


def test_encode_then_decode_round_trip() -> None:
    wire = framing.encode({"type": "say", "id": 1, "room": "#lobby", "text": "héllo"})
    decoder = framing.FrameDecoder()
    decoder.feed(wire)
    assert framing.parse(decoder.next_payload()) == {
        "type": "say",
        "id": 1,
        "room": "#lobby",
        "text": "héllo",
    }
    assert decoder.next_payload() is None


def test_decoder_reassembles_frames_fed_one_byte_at_a_time() -> None:
    wire = framing.encode({"type": "a"}) + framing.encode({"type": "b"})
    decoder = framing.FrameDecoder()
    got = []
    for i in range(len(wire)):
        decoder.feed(wire[i : i + 1])
        got += [framing.parse(p)["type"] for p in decoder.payloads()]
    assert got == ["a", "b"]
    assert decoder.buffered == 0


def test_oversized_header_is_refused_before_the_payload_arrives() -> None:
    decoder = framing.FrameDecoder(max_frame=1024)
    decoder.feed(struct.pack(">I", 0xFFFFFFFF))  # claims 4 GiB; nothing else sent
    with pytest.raises(ProtocolError) as info:
        decoder.next_payload()
    assert info.value.code == "frame_too_large"
    assert info.value.fatal
    assert decoder.buffered == 4  # nothing was allocated for the payload


def test_frame_exactly_at_the_limit_is_accepted() -> None:
    decoder = framing.FrameDecoder(max_frame=100)
    payload = b'{"type":"x","p":"' + b"a" * (100 - 19) + b'"}'
    assert len(payload) == 100
    decoder.feed(struct.pack(">I", 100) + payload)
    assert framing.parse(decoder.next_payload())["type"] == "x"


def test_empty_frame_is_fatal() -> None:
    decoder = framing.FrameDecoder()
    decoder.feed(b"\0\0\0\0")
    with pytest.raises(ProtocolError) as info:
        decoder.next_payload()
    assert (info.value.code, info.value.fatal) == ("bad_frame", True)


def test_encode_refuses_a_frame_over_the_limit() -> None:
    with pytest.raises(ProtocolError) as info:
        framing.encode({"type": "say", "text": "x" * 200}, max_frame=100)
    assert info.value.code == "frame_too_large"


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"\xff\xfe", "bad_utf8"),
        (b"{not json", "bad_json"),
        (b"[1, 2]", "bad_frame"),
        (b'{"id": 1}', "bad_frame"),
        (b'{"type": 7}', "bad_frame"),
        (b"[" * 50000 + b"]" * 50000, "bad_json"),
        (b'{"type": "x", "n": 1' + b"0" * 5000 + b"}", "bad_json"),
    ],
)
def test_parse_turns_any_bad_payload_into_our_protocol_error(payload: bytes, code: str) -> None:
    with pytest.raises(ProtocolError) as info:
        framing.parse(payload)
    assert info.value.code == code
    assert not info.value.fatal


def test_nan_and_infinity_are_not_json() -> None:
    for payload in (b'{"type": "say", "n": NaN}', b'{"type": "say", "n": -Infinity}'):
        with pytest.raises(ProtocolError) as info:
            framing.parse(payload)
        assert (info.value.code, info.value.message) == ("bad_json", "frame is not valid JSON")


@pytest.mark.parametrize(
    "frame",
    [
        {"type": "message", "room": "#lobby", "from": "alice", "text": 'hé \u2603 "x"', "ts": 1},
        {"type": "message", "room": "#r", "from": "bob", "text": "", "ts": 2, "action": True},
    ],
)
def test_a_true_field_added_to_encoded_bytes_matches_encoding_the_frame_with_it(
    frame: dict[str, object],
) -> None:
    data = framing.encode(frame)
    assert framing.with_true_field(data, "history") == framing.encode({**frame, "history": True})


def test_a_field_that_pushes_a_frame_over_the_limit_is_refused() -> None:
    data = framing.encode({"type": "message", "text": "x" * 30}, max_frame=60)
    with pytest.raises(ProtocolError) as caught:
        framing.with_true_field(data, "history", max_frame=60)
    assert caught.value.message == "frame of 73 bytes exceeds the 60-byte limit"


@pytest.mark.parametrize(
    ("request_id", "room", "ts"),
    [
        (0, "#lobby", 0),
        (2**53 - 1, "#a", 1_764_000_000_000),
        (7, "#dev_ops.x-1", -5),
        (1, 'odd "room" \\ é \u2603 \x01', 12),  # not a valid room name, still valid JSON
    ],
)
def test_the_say_reply_template_gives_the_bytes_json_would(
    request_id: int, room: str, ts: int
) -> None:
    frame = {"type": "ok", "id": request_id, "room": room, "ts": ts}
    assert framing.say_ok(request_id, room, ts) == framing.encode(frame)


def test_the_say_reply_template_keeps_the_frame_limit() -> None:
    room = "#" + "r" * 1100
    with pytest.raises(ProtocolError) as caught:
        framing.say_ok(1, room, 1, max_frame=1024)
    assert caught.value.message == "frame of 1138 bytes exceeds the 1024-byte limit"
    with pytest.raises(ProtocolError) as by_json:
        framing.encode({"type": "ok", "id": 1, "room": room, "ts": 1}, max_frame=1024)
    assert by_json.value.message == caught.value.message


@pytest.mark.parametrize(
    ("room", "sender", "text", "ts", "action"),
    [
        ("#lobby", "alice", "x" * 100, 1_764_000_000_000, False),
        ("#r", "bob", "", 0, True),
        ("#lobby", "alice", 'hé \u2603 "q" \\ \n\t\x00\x1f\x7f \U0001f600 </script>', -1, False),
        ('odd "room" \\', 'odd "name"', "\u2028\u2029", 2**53, True),  # still valid JSON
    ],
)
def test_the_room_message_template_gives_the_bytes_json_would(
    room: str, sender: str, text: str, ts: int, action: bool
) -> None:
    frame: dict[str, object] = {"type": "message", "room": room, "from": sender, "text": text}
    frame["ts"] = ts
    if action:
        frame["action"] = True
    assert framing.room_message(room, sender, text, ts, action) == framing.encode(frame)


def test_the_room_message_template_keeps_the_frame_limit() -> None:
    with pytest.raises(ProtocolError) as caught:
        framing.room_message("#lobby", "alice", "é" * 600, 1, False, max_frame=1024)
    assert caught.value.message == "frame of 1266 bytes exceeds the 1024-byte limit"
    frame = {"type": "message", "room": "#lobby", "from": "alice", "text": "é" * 600, "ts": 1}
    with pytest.raises(ProtocolError) as by_json:
        framing.encode(frame, max_frame=1024)
    assert by_json.value.message == caught.value.message
