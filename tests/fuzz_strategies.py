"""Hypothesis strategies for hostile wire input: frames that are valid, nearly valid or junk,
raw payloads that are not JSON or not UTF-8, headers that lie about their length, and ways to cut
a byte stream into reads."""

from __future__ import annotations

import base64
import itertools
import json
import struct
from typing import Any

from hypothesis import strategies as st

from securechat import framing, protocol

MAX_FRAME = framing.MAX_FRAME_DEFAULT

# Any JSON value, kept small so each example stays cheap.
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)


def _b64_of(size: int) -> st.SearchStrategy[str]:
    return st.binary(min_size=size, max_size=size).map(lambda raw: base64.b64encode(raw).decode())


NAMES = st.from_regex(r"[a-z0-9][a-z0-9_.-]{0,31}", fullmatch=True)
ROOMS = st.from_regex(r"#[a-z0-9][a-z0-9_.-]{0,30}", fullmatch=True)
MESSAGE_IDS = st.from_regex(r"[A-Za-z0-9_-]{8,64}", fullmatch=True)
DEVICE_IDS = st.from_regex(r"[A-Z2-7]{16}", fullmatch=True)
# Signed objects are checked by their handlers, not the session: any small object passes it.
SIGNED_OBJECTS = st.dictionaries(st.sampled_from(["user", "device_id", "signature"]), NAMES)
REQUEST_IDS = st.integers(min_value=0, max_value=2**53 - 1)

DATA = st.binary(min_size=1, max_size=64).map(lambda raw: base64.b64encode(raw).decode())
ENVELOPES = st.fixed_dictionaries(
    {"to": NAMES, "user": NAMES, "device": DEVICE_IDS, "msg_id": MESSAGE_IDS, "data": DATA}
)

# claim_prekeys' "users": {name: [device ids] or null}; devices' "users" is a list of names.
CLAIMS = st.dictionaries(
    NAMES, st.none() | st.lists(DEVICE_IDS, min_size=1, max_size=3), min_size=1, max_size=3
)

# A well-formed value for each field the client frame schemas name.
FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "user": NAMES,
    "users": st.lists(NAMES, min_size=1, max_size=3, unique=True),
    "key": _b64_of(32),
    "version": st.just(protocol.PROTOCOL_VERSION),
    "signature": _b64_of(64),
    "id": REQUEST_IDS,
    "room": ROOMS,
    "text": st.text(min_size=1, max_size=50).filter(str.strip),
    "action": st.booleans(),
    "resume": st.booleans(),
    "to": NAMES,
    "msg_id": MESSAGE_IDS,
    "data": DATA,
    "messages": st.lists(
        ENVELOPES, min_size=1, max_size=3, unique_by=lambda e: (e["user"], e["device"], e["msg_id"])
    ),
    "device": DEVICE_IDS,
    "devices": st.lists(DEVICE_IDS, min_size=1, max_size=3),
    "record": SIGNED_OBJECTS,
    "revocation": SIGNED_OBJECTS,
    "keys": st.lists(SIGNED_OBJECTS, min_size=1, max_size=3),
    "msg_ids": st.lists(MESSAGE_IDS, min_size=1, max_size=3),
    "limit": st.integers(min_value=1, max_value=protocol.HISTORY_MAX),
    "create": st.booleans(),
    "plain": st.booleans(),
    "session_id": st.from_regex(r"[A-Za-z0-9+/=_-]{1,128}", fullmatch=True),
    "ciphertext": st.binary(min_size=1, max_size=64).map(
        lambda raw: base64.b64encode(raw).decode()
    ),
}


@st.composite
def valid_frames(draw: st.DrawFn, types: tuple[str, ...] = tuple(protocol.CLIENT_FRAMES)) -> dict:
    """A client frame that passes its schema (whether the session's state allows it or not)."""
    ftype = draw(st.sampled_from(types))
    frame: dict[str, Any] = {"type": ftype}
    for field, (_, required) in protocol.CLIENT_FRAMES[ftype].items():
        if required or draw(st.booleans()):
            frame[field] = draw(FIELD_VALUES[field])
    if frame.get("plain"):
        frame["create"] = True  # "plain" chooses the mode of a new room only
    if ftype == "devices" and ("user" in frame) == ("users" in frame):
        # One user or several, never both nor neither.
        if "user" in frame:
            del frame["users"]
        else:
            frame["user"] = draw(NAMES)
    if ftype == "claim_prekeys":  # for "user" (with its "devices"), or for "users"
        if draw(st.booleans()):
            frame.pop("users", None)
            frame["user"] = draw(NAMES)
        else:
            frame.pop("user", None)
            frame.pop("devices", None)
            frame["users"] = draw(CLAIMS)
    return frame


@st.composite
def near_valid_frames(draw: st.DrawFn) -> dict:
    """A valid frame with one or more fields dropped, retyped or added, or its type changed."""
    frame = draw(valid_frames())
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        mutation = draw(st.sampled_from(["drop", "retype", "extra", "type"]))
        fields = [k for k in frame if k != "type"]
        if mutation == "drop" and fields:
            del frame[draw(st.sampled_from(fields))]
        elif mutation == "retype" and fields:
            frame[draw(st.sampled_from(fields))] = draw(JSON_VALUES)
        elif mutation == "extra":
            frame[draw(st.text(max_size=10))] = draw(JSON_VALUES)
        else:
            frame["type"] = draw(
                st.sampled_from([*protocol.CLIENT_FRAMES, "error", "welcome", "pong"])
                | st.text(max_size=50)
                | JSON_VALUES
            )
    return frame


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass")


# One payload (the bytes after a header): any of the shapes a hostile client may send.
PAYLOADS = st.one_of(
    valid_frames().map(_json_bytes),
    near_valid_frames().map(_json_bytes),
    JSON_VALUES.map(_json_bytes),  # JSON, but not an object with a string "type"
    st.binary(min_size=1, max_size=200),  # anything, mostly not UTF-8 or not JSON
    st.text(min_size=1, max_size=100).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.integers(min_value=1, max_value=20_000).map(lambda n: b"[" * n + b"]" * n),  # deep nesting
    st.just(b'{"type":"ping","id":1' + b"0" * 5000 + b"}"),  # an integer Python refuses to parse
)


def frame_bytes(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


# One unit of a stream: a correctly framed payload, or a header that lies (too large, zero, or
# announcing more bytes than follow), or stray bytes.
STREAM_PARTS = st.one_of(
    PAYLOADS.map(frame_bytes),
    PAYLOADS.map(frame_bytes),
    st.integers(min_value=MAX_FRAME + 1, max_value=2**32 - 1).map(struct.Struct(">I").pack),
    st.just(b"\0\0\0\0"),
    st.binary(max_size=12),
)

STREAMS = st.lists(STREAM_PARTS, max_size=12).map(b"".join)


@st.composite
def chunked(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """`data` cut into reads at arbitrary points (empty reads included)."""
    cuts = sorted(draw(st.lists(st.integers(min_value=0, max_value=len(data)), max_size=10)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]
