"""Length-prefixed JSON frames: encoding, and an incremental decoder bounded by a limit.

A frame is a 4-byte big-endian length, then that many bytes of one UTF-8 JSON object. This module
does no I/O: bytes go in, frames come out. The length is checked before any payload is buffered.
"""

from __future__ import annotations

import functools
import json
import json.scanner
import re
import struct
from collections.abc import Callable, Mapping
from typing import Any

from securechat.errors import ErrorCode, ProtocolError

MAX_FRAME_DEFAULT = 64 * 1024
# The smallest limit a server may set, and the smallest a client adopts: a session's own replies
# (errors, pongs, challenges) must always fit, and the longest of them is a few hundred bytes.
MIN_FRAME = 1024
# The largest limit a server may set, and the most a client adopts: a hostile server cannot make
# a client buffer without bound.
MAX_FRAME_CEILING = 16 * 1024 * 1024
HEADER = struct.Struct(">I")


def encode(frame: Mapping[str, Any], max_frame: int = MAX_FRAME_DEFAULT) -> bytes:
    """Return the wire bytes of one frame; refuses (locally) a frame larger than max_frame."""
    return _framed(_ENCODER.encode(frame).encode("utf-8"), max_frame)


def with_true_field(data: bytes, name: str, max_frame: int = MAX_FRAME_DEFAULT) -> bytes:
    """What encode({**frame, name: True}) gives for the frame that `data` (from encode) holds,
    when it has fields but not `name`: the same bytes with the field added at the end, without
    encoding the frame again (room history keeps each message this way)."""
    return _framed(data[HEADER.size : -1] + _true_field(name), max_frame)


def say_ok(request_id: int, room: str, ts: int, max_frame: int = MAX_FRAME_DEFAULT) -> bytes:
    """What encode({"type": "ok", "id": request_id, "room": room, "ts": ts}) gives (both ints,
    not bools), made from a template: every room message gets this reply, and a JSON encode
    of it was a tenth of a small room's busy I/O thread."""
    payload = b'{"type":"ok","id":%d,"room":%s,"ts":%d}' % (request_id, _string(room), ts)
    return _framed(payload, max_frame)


def room_message(
    room: str, sender: str, text: str, ts: int, action: bool, max_frame: int = MAX_FRAME_DEFAULT
) -> bytes:
    """What encode() gives for a room message's frame ({"type": "message", "room", "from",
    "text", "ts"}, then "action": true when set), from a template: every room message is
    encoded this way, and JSONEncoder.encode's Python layers were most of its cost. The room's
    and the sender's JSON strings are cached; the text is escaped by the encoder's own C
    function, so the bytes are the same."""
    payload = b'{"type":"message","room":%s,"from":%s,"text":%s,"ts":%d%s}' % (
        _string(room),
        _string(sender),
        _escape(text).encode(),
        ts,
        _ACTION if action else b"",
    )
    return _framed(payload, max_frame)


@functools.lru_cache(maxsize=1024)
def _string(text: str) -> bytes:
    return _ENCODER.encode(text).encode()


@functools.cache
def _true_field(name: str) -> bytes:
    return b"," + _ENCODER.encode({name: True})[1:].encode()


def _framed(payload: bytes, max_frame: int) -> bytes:
    if len(payload) > max_frame:
        raise ProtocolError(
            ErrorCode.FRAME_TOO_LARGE,
            f"frame of {len(payload)} bytes exceeds the {max_frame}-byte limit",
        )
    return HEADER.pack(len(payload)) + payload


def parse(payload: bytes) -> dict[str, Any]:
    """Decode one frame payload into a dict with a string "type"; never raises anything else
    than ProtocolError, whatever the bytes."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(ErrorCode.BAD_UTF8, "frame is not valid UTF-8") from None
    # What _DECODER.decode does, without its two Python-level calls per frame: skip white
    # space, scan one value, and allow only white space after it.
    try:
        obj, end = _SCAN(text, len(text) - len(text.lstrip(_SPACE)))
    # StopIteration: no value where one must be; ValueError covers the scanner's errors and
    # over-long integers; deep nesting raises RecursionError.
    except (StopIteration, ValueError, RecursionError):
        raise ProtocolError(ErrorCode.BAD_JSON, "frame is not valid JSON") from None
    if end != len(text) and text[end:].strip(_SPACE):
        raise ProtocolError(ErrorCode.BAD_JSON, "frame is not valid JSON")
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.BAD_FRAME, "frame must be a JSON object")
    if not isinstance(obj.get("type"), str):
        raise ProtocolError(ErrorCode.BAD_FRAME, 'frame has no string "type"')
    # JSON may spell a lone surrogate as an escape (raw UTF-8 cannot hold one): such a string
    # has no UTF-8 form, so nothing could echo or store it. Only escapes can bring one in.
    if b"\\u" in payload and _has_lone_surrogate(obj):
        raise ProtocolError(
            ErrorCode.BAD_UTF8, "frame holds a lone surrogate, which is not valid Unicode"
        )
    return obj


def _not_json(name: str) -> Any:
    # Python's json reads NaN and Infinity, which JSON does not have; nothing of ours sends them.
    raise ValueError(f"{name} is not JSON")


_SURROGATE = re.compile("[\ud800-\udfff]")


def _has_lone_surrogate(obj: object) -> bool:
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


class FrameDecoder:
    """Turns a byte stream into frame payloads.

    feed() buffers bytes; next_payload() returns one complete payload, or None when it needs more
    data. A header announcing more than max_frame bytes is a fatal protocol error: the stream can't
    be resynchronised, and we refuse to allocate for it.
    """

    def __init__(self, max_frame: int = MAX_FRAME_DEFAULT) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._need: int | None = None  # payload length once the header has been read

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next_payload(self) -> bytes | None:
        if self._need is None:
            if len(self._buf) < HEADER.size:
                return None
            (length,) = HEADER.unpack_from(self._buf)
            if length > self.max_frame:
                raise ProtocolError(
                    ErrorCode.FRAME_TOO_LARGE,
                    f"frame header announces {length} bytes; the limit is {self.max_frame}",
                    fatal=True,
                )
            if length == 0:
                raise ProtocolError(ErrorCode.BAD_FRAME, "empty frame", fatal=True)
            del self._buf[: HEADER.size]
            self._need = length
        if len(self._buf) < self._need:
            return None
        payload = bytes(self._buf[: self._need])
        del self._buf[: self._need]
        self._need = None
        return payload

    def payloads(self) -> list[bytes]:
        """All complete payloads buffered so far."""
        out = []
        while (payload := self.next_payload()) is not None:
            out.append(payload)
        return out

    @property
    def buffered(self) -> int:
        return len(self._buf)


# Made once: json.dumps and json.loads build a new encoder or decoder on every call that passes
# options, a cost the profile of a small room showed on every message. Both keep no
# state between calls, so threads may share them.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
_DECODER = json.JSONDecoder(parse_constant=_not_json)
# typeshed's stub of the C scanner wants a scanner as its context; it takes the decoder.
_SCAN: Callable[[str, int], tuple[Any, int]] = json.scanner.make_scanner(_DECODER)  # type: ignore[arg-type]
_SPACE = " \t\n\r"  # JSON's white space
# What _ENCODER does with a string (ensure_ascii off): the C function, without its Python layers.
_escape: Callable[[str], str] = json.encoder.encode_basestring
_ACTION = b',"action":true'
