#!/usr/bin/env python3
"""Coverage-guided fuzzing of the frame codec and the server session state machine (atheris).

Each input holds a frame limit, a starting session state, the points where reads are cut, and the
byte stream itself. The harness checks that the decoder gives the same frames (or the same fatal
error) however the stream is cut, that parse() raises nothing but our ProtocolError, and that a
ServerSession in that state raises nothing at all and keeps the rules the property-based tests
check (tests/wire_checks.py). Anything else is a crash: atheris stops and saves the input as
.fuzz-corpus/crash-<hash>. Run it from the repository root, as a module, so that it
fuzzes this checkout:

    pip install '.[fuzz]'
    python -m scripts.fuzz_codec -max_total_time=300          # corpus in .fuzz-corpus/codec
    python -m scripts.fuzz_codec -max_total_time=300 DIR ...  # libFuzzer flags, your corpus
    python -m scripts.fuzz_codec .fuzz-corpus/crash-<hash>    # replay one input

The default corpus is seeded with a real login and a few room frames, so the fuzzer starts from
the protocol's shape rather than from nothing.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["securechat"]):
    from securechat import framing
    from securechat.errors import ProtocolError
    from tests.wire_checks import (
        AUTH,
        HELLO,
        OPEN_STATES,
        check_outcome,
        decode_all,
        replies,
        session_in,
    )

LIMITS = [framing.MIN_FRAME, 4096, framing.MAX_FRAME_DEFAULT]
CORPUS = Path(__file__).resolve().parents[1] / ".fuzz-corpus" / "codec"


def one_input(data: bytes) -> None:
    # Layout: [limit][state][number of cuts n][n two-byte cut points][the stream]
    if len(data) < 3:
        return
    max_frame = LIMITS[data[0] % len(LIMITS)]
    state = OPEN_STATES[data[1] % len(OPEN_STATES)]
    n = data[2] % 7
    cuts = sorted(int.from_bytes(data[3 + 2 * i : 5 + 2 * i], "big") for i in range(n))
    stream = data[3 + 2 * n :]
    bounds = [0, *(min(c, len(stream)) for c in cuts), len(stream)]
    reads = [stream[a:b] for a, b in itertools.pairwise(bounds)]

    whole = decode_all([stream], max_frame)
    assert decode_all(reads, max_frame) == whole
    for payload in whole[0]:
        try:
            framing.parse(payload)
        except ProtocolError as exc:
            assert exc.code in {"bad_utf8", "bad_json", "bad_frame"}, exc.code
    s = session_in(state, max_frame)
    events = [e for data in reads for e in s.receive_data(data)]
    check_outcome(state, s, events, replies(s))


def _seed(corpus: Path) -> None:
    """Inputs that take the fuzzer past the login and into each state's frames."""
    corpus.mkdir(parents=True, exist_ok=True)
    frames = [
        {"type": "join", "id": 1, "room": "#lobby"},
        {"type": "say", "id": 2, "room": "#lobby", "text": "hi", "action": False},
        {"type": "dm", "id": 3, "to": "bob", "msg_id": "AAAAAAAAAAAA", "box": "AQID"},
        {"type": "ack", "msg_ids": ["AAAAAAAAAAAA"]},
        {"type": "history", "id": 4, "room": "#lobby", "limit": 5},
        {"type": "ping", "id": 5},
        {"type": "bye"},
    ]
    seeds = {
        "login": HELLO + AUTH,
        "room": b"".join(framing.encode(f) for f in frames),
        "junk": framing.encode({"type": "hello", "user": "Alice", "key": 5, "version": "2"}),
    }
    for name, stream in seeds.items():
        for index, state in enumerate(OPEN_STATES):
            (corpus / f"{name}-{state.value}").write_bytes(bytes([2, index, 0]) + stream)


def main() -> None:
    args = sys.argv
    if not any(a.startswith("-artifact_prefix=") for a in args):
        CORPUS.parent.mkdir(exist_ok=True)
        args = [*args, f"-artifact_prefix={CORPUS.parent}/"]
    if not any(not a.startswith("-") for a in args[1:]):
        if not CORPUS.exists():
            _seed(CORPUS)
        args = [*args, str(CORPUS)]
    atheris.Setup(args, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
