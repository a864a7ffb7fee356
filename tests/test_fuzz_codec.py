"""Property-based tests of the frame codec: any bytes, cut into reads anywhere, give frames or
our own ProtocolError, and nothing else. Profiles (quick "ci", thorough "long") are in
conftest.py."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from securechat import framing
from securechat.errors import ProtocolError

from .fuzz_strategies import PAYLOADS, STREAMS, chunked, frame_bytes, valid_frames
from .wire_checks import decode_all

PARSE_CODES = {"bad_utf8", "bad_json", "bad_frame"}


@given(st.data(), STREAMS, st.sampled_from([64, 1000, framing.MAX_FRAME_DEFAULT]))
def test_any_stream_cut_anywhere_decodes_the_same_or_fails_the_same(data, stream, max_frame):
    whole = decode_all([stream], max_frame)
    reads = data.draw(chunked(stream))
    assert decode_all(reads, max_frame) == whole
    payloads, _, _ = whole
    assert all(1 <= len(p) <= max_frame for p in payloads)
    assert sum(framing.HEADER.size + len(p) for p in payloads) <= len(stream)


@given(st.lists(PAYLOADS, max_size=6), st.data())
def test_well_framed_payloads_come_out_exactly_as_they_went_in(payloads, data):
    stream = b"".join(frame_bytes(p) for p in payloads)
    got, error, left = decode_all(data.draw(chunked(stream)), max(map(len, payloads), default=1))
    assert (got, error, left) == (payloads, None, 0)


@given(st.integers(min_value=1, max_value=4096), st.binary(max_size=8))
def test_a_header_over_the_limit_is_refused_without_buffering_its_payload(max_frame, tail):
    header = framing.HEADER.pack(max_frame + 1)
    decoder = framing.FrameDecoder(max_frame)
    decoder.feed(header + tail)
    with pytest.raises(ProtocolError) as caught:
        decoder.next_payload()
    assert (caught.value.code, caught.value.fatal) == ("frame_too_large", True)
    assert decoder.buffered == len(header + tail)  # nothing beyond what was read is held


@given(PAYLOADS)
def test_parse_gives_a_typed_object_or_our_non_fatal_error(payload):
    try:
        frame = framing.parse(payload)
    except ProtocolError as exc:
        assert exc.code in PARSE_CODES
        assert not exc.fatal
        assert len(exc.message) < 100  # never echoes the payload
    else:
        assert isinstance(frame, dict)
        assert isinstance(frame["type"], str)


@given(st.binary(max_size=300))
def test_parse_of_arbitrary_bytes_never_raises_anything_else(payload):
    try:
        framing.parse(payload)
    except ProtocolError as exc:
        assert exc.code in PARSE_CODES


@given(valid_frames())
def test_encoded_frames_decode_to_themselves(frame):
    decoder = framing.FrameDecoder()
    decoder.feed(framing.encode(frame))
    [payload] = decoder.payloads()
    assert framing.parse(payload) == frame


# Bytes around and inside a JSON object that the scanner must take or refuse as json.loads does.
JSON_EDGES = st.lists(
    st.sampled_from(
        [b" ", b"\t", b"\n", b"\r", b"\x0c", b"\xc2\xa0", b"{", b"}", b'"type"', b":", b'"a"',
         b",", b"[", b"]", b"1", b"-0", b"1e999", b"NaN", b"null", b"true", b'"\\u00e9"', b"x"]
    ),
    max_size=12,
).map(b"".join)  # fmt: skip


def json_loads_outcome(payload: bytes) -> object:
    """What parse did before it called the scanner itself: the standard decoder's verdict."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return "bad_utf8"
    try:
        obj = json.loads(text, parse_constant=framing._not_json)
    except (ValueError, RecursionError):
        return "bad_json"
    return obj if isinstance(obj, dict) and isinstance(obj.get("type"), str) else "bad_frame"


@given(st.one_of(PAYLOADS, JSON_EDGES, JSON_EDGES.map(lambda b: b'{"type":"a"}' + b)))
def test_parse_agrees_with_the_standard_decoder(payload):
    try:
        got: object = framing.parse(payload)
    except ProtocolError as exc:
        got = exc.code
    expected = json_loads_outcome(payload)
    if got == "bad_utf8" and isinstance(expected, dict):
        return  # a lone surrogate spelled as an escape: refused after decoding, on purpose
    assert got == expected


# Text as a say may carry it: any code point but a lone surrogate (parse refuses those).
SAY_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=200)


@given(SAY_TEXT, SAY_TEXT, SAY_TEXT, st.integers(), st.booleans())
def test_the_room_message_template_always_gives_the_bytes_json_would(
    room, sender, text, ts, action
):
    frame = {"type": "message", "room": room, "from": sender, "text": text, "ts": ts}
    if action:
        frame["action"] = True
    assert framing.room_message(room, sender, text, ts, action) == framing.encode(frame)
