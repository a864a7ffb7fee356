"""Hostile sealed records: a peer holding a real key seals whatever record it likes.

Each record is built field by field from hostile values (missing and extra fields, wrong types,
huge and negative numbers, bad names, wrong versions, other senders and recipients, nested junk),
encoded canonically or not (or not as JSON at all), and sealed with PyNaCl's Box and real keys:
PyNaCl picks every nonce. Opening must give exactly the refusal the format's rules call for, as
one of the sealing module's own errors, and a message only when every rule holds.
"""

from __future__ import annotations

import json
import re
from typing import Any

import nacl.public
import nacl.signing
import pytest
from hypothesis import event, given, note, settings
from hypothesis import strategies as st

from securechat import sealing
from securechat.protocol import valid_name
from securechat.sealing import (
    ForgedSender,
    MisroutedMessage,
    OpenedDM,
    ReflectedMessage,
    SealError,
    TamperedMessage,
)

from .test_sealing import ALICE, ALICE_PK, BOB, CAROL, canonical

MARKER = "secret-body-"  # every generated body carries it; no error may repeat it
KEYS = ("v", "kind", "from", "to", "id", "ts", "body")
_ID_RE = re.compile(r"[A-Za-z0-9_-]{8,64}")

JUNK = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**200), max_value=2**200)
    | st.floats()
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)
BAD_NAMES = st.sampled_from(["", "Alice", "-bob", "al ice", "a" * 33, "bob\n", "ａlice"])
OTHER_NAMES = st.sampled_from(["alice", "bob", "carol"])
BODIES = st.text(max_size=40).map(lambda t: MARKER + t)

# field -> (its right value for alice's DM to bob, other well-formed values, hostile values)
FIELDS: dict[str, tuple[st.SearchStrategy[Any], ...]] = {
    "v": (st.just(1), st.just(1), st.sampled_from([0, 2, -1, 2**64, True, 1.0, "1"]) | JUNK),
    "kind": (st.just("dm"), st.just("dm"), st.sampled_from(["room", "DM", ""]) | JUNK),
    "from": (st.just("alice"), OTHER_NAMES, BAD_NAMES | JUNK),
    "to": (st.just("bob"), OTHER_NAMES, BAD_NAMES | JUNK),
    "id": (
        st.just("AAAAAAAAAAAAAAAAAAAAAA"),
        st.from_regex(_ID_RE, fullmatch=True),
        st.sampled_from(["short", "x" * 65, "has space 123", "ünïcode-id", "id/with/slash"]) | JUNK,
    ),
    "ts": (
        st.integers(min_value=0, max_value=2**53 - 1),
        st.sampled_from([0, 2**53 - 1]),
        st.integers(max_value=-1)  # integers() favours the bounds: -1 and 2**53
        | st.integers(min_value=2**53, max_value=2**200)
        | st.sampled_from([1.5, 1e30, True, "1700000000000"])
        | JUNK,
    ),
    "body": (
        BODIES,
        st.just(MARKER + "x" * (sealing.BODY_MAX - len(MARKER))),
        st.sampled_from(["", "   ", "\n\t", MARKER + "x" * sealing.BODY_MAX])
        | st.builds(lambda t: MARKER + t + "\udcff", st.text(max_size=5))  # no UTF-8 form
        | JUNK,
    ),
}


@st.composite
def records(draw: st.DrawFn) -> dict[str, Any]:
    """Right but for a few fields, so that each rule (and a record that opens) is reached often."""
    rec = {field: draw(right) for field, (right, _, _) in FIELDS.items()}
    # The names get extra weight: they decide between the four refusals.
    for field in draw(st.lists(st.sampled_from((*KEYS, "from", "to", "from", "to")), max_size=2)):
        _, other, hostile = FIELDS[field]
        rec[field] = draw(other | hostile)
    if draw(st.integers(min_value=0, max_value=9)) == 0:
        rec.pop(draw(st.sampled_from(KEYS)))
    if draw(st.integers(min_value=0, max_value=9)) == 0:
        rec[draw(st.text(max_size=6))] = draw(JUNK)
    return rec


def encodings(rec: dict[str, Any]) -> st.SearchStrategy[bytes]:
    """The canonical bytes three times in four; otherwise another encoding, or a broken one."""

    def dump(sort_keys: bool = True, ensure_ascii: bool = False, compact: bool = True) -> bytes:
        separators = (",", ":") if compact else None
        text = json.dumps(
            rec, sort_keys=sort_keys, ensure_ascii=ensure_ascii, separators=separators
        )
        return text.encode("utf-8", "surrogatepass")

    others = [
        lambda: dump(ensure_ascii=True),
        lambda: dump(sort_keys=False),
        lambda: dump(compact=False),
        lambda: dump() + b" ",
        lambda: dump()[:-1],
    ]
    make = st.sampled_from([dump] * 15 + others)
    return make.map(lambda encode: encode())


def well_formed(rec: dict[str, Any]) -> bool:
    """The record rules of sealing.py's docstring, written out independently."""
    if set(rec) != set(KEYS):
        return False
    body, ts = rec["body"], rec["ts"]
    return (
        type(rec["v"]) is int
        and rec["v"] == 1
        and rec["kind"] == "dm"
        and all(isinstance(rec[f], str) and valid_name(rec[f]) is None for f in ("from", "to"))
        and isinstance(rec["id"], str)
        and _ID_RE.fullmatch(rec["id"]) is not None
        and type(ts) is int
        and 0 <= ts < 2**53
        and isinstance(body, str)
        and bool(body.strip())
        and len(body) <= sealing.BODY_MAX
    )


def is_canonical(rec: dict[str, Any], plaintext: bytes) -> bool:
    try:
        return plaintext == canonical(rec)
    except (UnicodeEncodeError, ValueError):
        return False


def seal_with(sender_key: nacl.signing.SigningKey, plaintext: bytes) -> bytes:
    box = nacl.public.Box(
        sender_key.to_curve25519_private_key(), BOB.verify_key.to_curve25519_public_key()
    )
    return bytes([sealing.ENVELOPE_VERSION]) + bytes(box.encrypt(plaintext))


def expected_refusal(
    rec: dict[str, Any], plaintext: bytes, sealer: str, expected_id: str | None
) -> type[SealError] | None:
    """What bob must do with this record, delivered as from alice: None means it opens."""
    if sealer != "alice" or not is_canonical(rec, plaintext) or not well_formed(rec):
        return TamperedMessage
    if rec["from"] == "bob":
        return ReflectedMessage
    if rec["to"] != "bob":
        return MisroutedMessage
    if rec["from"] != "alice":
        return ForgedSender
    if expected_id is not None and expected_id != rec["id"]:
        return TamperedMessage
    return None


# Cheap examples: five times the profile's count, so that each refusal is reached many times.
@settings(max_examples=5 * settings.default.max_examples)
@given(
    records(),
    st.data(),
    st.sampled_from(["alice"] * 4 + ["carol"]),
    st.none() | st.sampled_from(["AAAAAAAAAAAAAAAAAAAAAA", "another-id-01"]),
)
def test_hostile_records_get_exactly_the_refusal_their_rules_call_for(
    rec, data, sealer, expected_id
):
    try:
        plaintext = data.draw(encodings(rec))
    except ValueError:
        return  # a value JSON itself cannot write (an integer past Python's digit limit)
    envelope = seal_with({"alice": ALICE, "carol": CAROL}[sealer], plaintext)
    expected = expected_refusal(rec, plaintext, sealer, expected_id)
    note(f"plaintext={plaintext[:200]!r} expected={expected}")
    event(f"expected: {expected.__name__ if expected else 'opens'}")
    if expected is None:
        opened = sealing.open_sealed(
            BOB, "bob", "alice", ALICE_PK, envelope, expected_message_id=expected_id
        )
        assert opened == OpenedDM("alice", "bob", rec["id"], rec["ts"], rec["body"])
        return
    with pytest.raises(SealError) as caught:
        sealing.open_sealed(
            BOB, "bob", "alice", ALICE_PK, envelope, expected_message_id=expected_id
        )
    assert type(caught.value) is expected
    assert MARKER not in str(caught.value)


@given(
    st.binary(max_size=200) | st.text(max_size=60).map(str.encode),
    st.sampled_from(["alice", "carol"]),
)
def test_a_sealed_plaintext_that_is_not_a_record_is_refused_as_tampered(plaintext, sealer):
    envelope = seal_with({"alice": ALICE, "carol": CAROL}[sealer], plaintext)
    with pytest.raises(TamperedMessage):
        sealing.open_sealed(BOB, "bob", "alice", ALICE_PK, envelope)
