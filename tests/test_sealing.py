"""Sealing and opening DMs, fed bytes directly: no sockets, no server.

Every attack the server (or a peer) could try on a sealed DM gets its own test: tampering,
a forged sender, re-routing, reflection, replay, and hostile records sealed with a valid key.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import nacl.public
import nacl.signing
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from securechat import framing, sealing
from securechat.sealing import (
    ForgedSender,
    InvalidMessage,
    MisroutedMessage,
    OpenedDM,
    ReflectedMessage,
    ReplayedMessage,
    ReplayGuard,
    ReplayStateError,
    SealError,
    StaleMessage,
    TamperedMessage,
    UnsupportedEnvelope,
)

ALICE = nacl.signing.SigningKey(bytes([1]) * 32)
BOB = nacl.signing.SigningKey(bytes([2]) * 32)
CAROL = nacl.signing.SigningKey(bytes([3]) * 32)
ALICE_PK = bytes(ALICE.verify_key)
BOB_PK = bytes(BOB.verify_key)
CAROL_PK = bytes(CAROL.verify_key)

NOW = 1_700_000_000_000  # a fixed "now" in ms, so the replay window is deterministic
DAY = 24 * 60 * 60 * 1000
BODY = "the launch code is 4711"


def alice_to_bob(body: str = BODY, **kwargs: Any) -> sealing.SealedDM:
    return sealing.seal(ALICE, "alice", "bob", BOB_PK, body, **kwargs)


def bob_opens(envelope: bytes, stamped: str = "alice", **kwargs: Any) -> OpenedDM:
    return sealing.open_sealed(BOB, "bob", stamped, ALICE_PK, envelope, **kwargs)


def sealed_raw(plaintext: bytes) -> bytes:
    """An envelope around any plaintext, sealed with alice's real key: a hostile but valid peer."""
    box = nacl.public.Box(
        ALICE.to_curve25519_private_key(), BOB.verify_key.to_curve25519_public_key()
    )
    return bytes([sealing.ENVELOPE_VERSION]) + bytes(box.encrypt(plaintext))


def record(**overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "v": 1,
        "kind": "dm",
        "from": "alice",
        "to": "bob",
        "id": "AAAAAAAAAAAAAAAAAAAAAA",
        "ts": NOW,
        "body": "hi",
    }
    fields.update(overrides)
    return fields


def canonical(fields: dict[str, Any]) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


# -- the happy path -------------------------------------------------------------------------------


def test_sealed_dm_round_trips() -> None:
    sealed = alice_to_bob(ts=NOW)
    opened = bob_opens(sealed.envelope, expected_message_id=sealed.message_id)
    assert opened == OpenedDM("alice", "bob", sealed.message_id, NOW, BODY)


def test_round_trip_keeps_unicode_text_exactly() -> None:
    body = "grüße 👋 — 日本語\n\tsecond line"
    assert bob_opens(alice_to_bob(body).envelope).body == body


def test_a_dm_to_yourself_opens() -> None:
    sealed = sealing.seal(ALICE, "alice", "alice", ALICE_PK, "note to self")
    opened = sealing.open_sealed(ALICE, "alice", "alice", ALICE_PK, sealed.envelope)
    assert opened.body == "note to self"


def test_message_ids_are_random_and_fit_the_wire_protocol() -> None:
    ids = {sealing.new_message_id() for _ in range(100)}
    assert len(ids) == 100
    for message_id in ids:
        assert len(message_id) == 22
        assert set(message_id) <= set(
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        )


def test_the_envelope_the_server_sees_holds_no_plaintext() -> None:
    sealed = alice_to_bob(ts=NOW)
    # Names are quoted so that three random bytes cannot spell them by chance.
    for secret in (BODY, "launch", "alice", '"bob"', str(NOW), '"body"', '"from"'):
        assert secret.encode() not in sealed.envelope
    assert "alice" not in sealed.message_id  # random, not derived from the names
    assert sealed.envelope[0] == sealing.ENVELOPE_VERSION
    # version + 24-byte nonce + 16-byte tag + the record
    assert len(sealed.envelope) == 1 + 24 + 16 + len(
        canonical(record(id=sealed.message_id, body=BODY))
    )
    assert len(sealed.envelope) > len(BODY)


def test_sealing_twice_gives_different_envelopes() -> None:
    first = alice_to_bob(message_id="same-id-0001", ts=NOW)
    second = alice_to_bob(message_id="same-id-0001", ts=NOW)
    assert first.envelope != second.envelope  # a fresh random nonce each time
    assert first.envelope[1:25] != second.envelope[1:25]


# -- known-answer vector, with the randomness pinned -----------------------------------------

KAT_NONCE = bytes(range(24))
KAT_RECORD = (
    b'{"body":"hello bob","from":"alice","id":"kat-message-0001","kind":"dm","to":"bob",'
    b'"ts":1700000000000,"v":1}'
)
KAT_ENVELOPE_HEX = (
    "01"  # envelope version
    "000102030405060708090a0b0c0d0e0f1011121314151617"  # the pinned nonce
    "3ca3fc3c75c2f5dd404e0899c8b8a674"  # Poly1305 tag
    "b85abfcd38188ed8e2cfb61212d33cad75d917e0612d4148f503aa3ca1213564bf28c425b592fbc89093c094a7"
    "754e0925e089be6494a4b8ff6af09a57089ea6bf6a5658d83ca4aaac7266972ee400fee17502734f371bce8999"
    "1d6d95c7a11860cd279652168204dfde17"
)


def test_known_answer_envelope(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pins the whole sealed format: version byte, nonce placement, record encoding, Box.

    The randomness is pinned here only; the module itself always lets PyNaCl pick the nonce.
    """
    monkeypatch.setattr(nacl.public, "random", lambda size: KAT_NONCE[:size])
    sealed = sealing.seal(
        ALICE, "alice", "bob", BOB_PK, "hello bob", message_id="kat-message-0001", ts=NOW
    )
    box = nacl.public.Box(
        BOB.to_curve25519_private_key(), ALICE.verify_key.to_curve25519_public_key()
    )
    assert box.decrypt(sealed.envelope[1:]) == KAT_RECORD
    assert sealed.envelope[:25] == b"\x01" + KAT_NONCE
    assert sealed.envelope.hex() == KAT_ENVELOPE_HEX
    # The same bytes built independently: version byte, then Box around the canonical record.
    sender_box = nacl.public.Box(
        ALICE.to_curve25519_private_key(), BOB.verify_key.to_curve25519_public_key()
    )
    assert sealed.envelope == b"\x01" + bytes(sender_box.encrypt(KAT_RECORD, KAT_NONCE))
    assert bob_opens(bytes.fromhex(KAT_ENVELOPE_HEX)).body == "hello bob"


# -- tampering, forging, re-routing, reflection ---------------------------------------------------


@pytest.mark.parametrize("position", [1, 12, 24, 25, 40, 41, 60, -1])
def test_tampered_ciphertext_is_refused(position: int) -> None:
    envelope = bytearray(alice_to_bob().envelope)
    envelope[position] ^= 0x01
    with pytest.raises(TamperedMessage, match="does not open"):
        bob_opens(bytes(envelope))


@pytest.mark.parametrize("cut", [0, 1, 10, 25, 41, 42])
def test_truncated_envelope_is_refused(cut: int) -> None:
    with pytest.raises(TamperedMessage):
        bob_opens(alice_to_bob().envelope[:cut])


def test_an_oversized_envelope_is_refused_before_decrypting() -> None:
    envelope = bytes([1]) + bytes(sealing.MAX_ENVELOPE_BYTES)
    with pytest.raises(TamperedMessage, match="larger"):
        bob_opens(envelope)


def test_forged_sender_is_refused() -> None:
    # carol seals to bob claiming inside to be alice; the server stamps carol (her login).
    forged = sealing.seal(CAROL, "alice", "bob", BOB_PK, "wire the money to carol")
    with pytest.raises(ForgedSender) as caught:
        sealing.open_sealed(BOB, "bob", "carol", CAROL_PK, forged.envelope)
    assert "wire the money" not in str(caught.value)


def test_a_dm_stamped_with_the_wrong_sender_does_not_open() -> None:
    # The server claims alice's DM came from carol: it does not open with carol's key.
    with pytest.raises(TamperedMessage):
        sealing.open_sealed(BOB, "bob", "carol", CAROL_PK, alice_to_bob().envelope)


def test_a_dm_rerouted_to_someone_else_does_not_open() -> None:
    with pytest.raises(TamperedMessage):
        sealing.open_sealed(CAROL, "carol", "alice", ALICE_PK, alice_to_bob().envelope)


def test_a_dm_sealed_to_the_wrong_key_is_refused_as_misrouted() -> None:
    # The server swapped bob's key for carol's, alice sealed "to bob" with it, and the server
    # routed it to carol: it opens, but it is not addressed to carol.
    swapped = sealing.seal(ALICE, "alice", "bob", CAROL_PK, "for bob only")
    with pytest.raises(MisroutedMessage) as caught:
        sealing.open_sealed(CAROL, "carol", "alice", ALICE_PK, swapped.envelope)
    assert not isinstance(caught.value, ReflectedMessage)
    assert "for bob only" not in str(caught.value)


def test_a_dm_reflected_back_to_its_sender_is_refused() -> None:
    # Box's shared key is the same both ways, so alice's DM to bob opens for alice with bob's
    # key; the server delivers it back to alice stamped "from bob".
    sealed = alice_to_bob()
    with pytest.raises(ReflectedMessage, match="sent yourself") as caught:
        sealing.open_sealed(ALICE, "alice", "bob", BOB_PK, sealed.envelope)
    assert isinstance(caught.value, MisroutedMessage)
    assert BODY not in str(caught.value)


@pytest.mark.parametrize("stamped", ["", "Mallory <script>", "x" * 1000])
def test_a_malformed_stamped_sender_is_refused_without_echoing_it(stamped: str) -> None:
    with pytest.raises(TamperedMessage) as caught:
        bob_opens(alice_to_bob().envelope, stamped=stamped)
    if stamped:
        assert stamped not in str(caught.value)


def test_a_bytearray_envelope_opens() -> None:
    assert bob_opens(bytearray(alice_to_bob().envelope)).body == BODY


def test_a_server_id_that_differs_from_the_sealed_id_is_refused() -> None:
    sealed = alice_to_bob()
    with pytest.raises(TamperedMessage, match="id"):
        bob_opens(sealed.envelope, expected_message_id="another-id-000")


@pytest.mark.parametrize("version", [0, 2, 255])
def test_unknown_envelope_version_is_refused(version: int) -> None:
    envelope = bytes([version]) + alice_to_bob().envelope[1:]
    with pytest.raises(UnsupportedEnvelope, match="upgrade"):
        bob_opens(envelope)


def test_errors_never_carry_plaintext_or_keys() -> None:
    sealed = alice_to_bob()
    attempts = [
        lambda: sealing.open_sealed(ALICE, "alice", "bob", BOB_PK, sealed.envelope),
        lambda: sealing.open_sealed(CAROL, "carol", "alice", ALICE_PK, sealed.envelope),
        lambda: bob_opens(sealed.envelope, expected_message_id="another-id-000"),
        lambda: bob_opens(b"\x01" + sealed.envelope[1:-1] + b"\x00"),
    ]
    for attempt in attempts:
        with pytest.raises(SealError) as caught:
            attempt()
        text = str(caught.value)
        assert BODY not in text
        for key in (ALICE_PK, BOB_PK, CAROL_PK, bytes(ALICE), bytes(BOB)):
            assert key.hex() not in text
            assert base64.b64encode(key).decode() not in text


# -- hostile records sealed with a valid key ------------------------------------------------------

HOSTILE_RECORDS: list[bytes] = [
    b"",
    b"not json",
    b"\xff\xfe\x00",
    b"[]",
    b"null",
    b'"a string"',
    b"1",
    b"[" * 20_000 + b"]" * 20_000,
    canonical({k: v for k, v in record().items() if k != "from"}),
    canonical({k: v for k, v in record().items() if k != "ts"}),
    canonical({k: v for k, v in record().items() if k != "body"}),
    canonical(record(extra="field")),
    canonical(record(v="1")),
    canonical(record(v=True)),
    canonical(record(v=2)),
    canonical(record(kind="room")),
    canonical(record(kind=None)),
    canonical(record(**{"from": 7})),
    canonical(record(**{"from": "Alice Smith"})),
    canonical(record(**{"from": ""})),
    canonical(record(to=None)),
    canonical(record(to=["bob"])),
    canonical(record(id=5)),
    canonical(record(id="short")),
    canonical(record(id="has spaces in it")),
    canonical(record(id="x" * 65)),
    canonical(record(ts="1700000000000")),
    canonical(record(ts=True)),
    canonical(record(ts=1.5)),
    canonical(record(ts=-1)),
    canonical(record(ts=2**53)),
    canonical(record(body=5)),
    canonical(record(body="")),
    canonical(record(body="   \n")),
    canonical(record(body=["hi"])),
    canonical(record(body={"text": "hi"})),
    canonical(record(body="x" * (sealing.BODY_MAX + 1))),
    canonical(record()).replace(b'"ts":1700000000000', b'"ts":NaN'),
    canonical(record()).replace(b'"ts":1700000000000', b'"ts":1' + b"0" * 5000),
    canonical(record()).replace(b'"ts":1700000000000', b'"ts":1e999'),
    # not canonical: whitespace, key order, escapes, duplicate keys
    json.dumps(record()).encode(),
    json.dumps(record(), separators=(",", ":")).encode(),
    canonical(record(body="é")).replace("é".encode(), b"\\u00e9"),
    canonical(record()).replace(b'"from":"alice"', b'"from":"mallory","from":"alice"'),
]


@pytest.mark.parametrize("plaintext", HOSTILE_RECORDS, ids=range(len(HOSTILE_RECORDS)))
def test_hostile_inner_records_are_refused_as_tampered(plaintext: bytes) -> None:
    with pytest.raises(TamperedMessage):
        bob_opens(sealed_raw(plaintext))


def test_the_hostile_record_helper_builds_valid_envelopes() -> None:
    """Guards the test above: the same helper with a good record opens."""
    assert bob_opens(sealed_raw(canonical(record()))).body == "hi"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_opening_arbitrary_bytes_raises_only_seal_errors(envelope: bytes) -> None:
    with pytest.raises(SealError):
        bob_opens(envelope)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_opening_arbitrary_version_1_bytes_raises_only_tampered(tail: bytes) -> None:
    with pytest.raises(TamperedMessage):
        bob_opens(b"\x01" + tail)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_plaintext_sealed_with_a_valid_key_raises_only_seal_errors(
    plaintext: bytes,
) -> None:
    try:
        bob_opens(sealed_raw(plaintext))
    except SealError:
        pass


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from([*record(), "extra"]),
        JSON_VALUES | st.sampled_from(list(record().values())),
    ),
    st.booleans(),
)
def test_records_with_fields_of_any_type_are_refused_cleanly(
    fields: dict[str, Any], complete: bool
) -> None:
    if complete:
        fields = {**record(), **fields}
    try:
        plaintext = canonical(fields)
    except (UnicodeEncodeError, ValueError):
        return  # a value JSON (or UTF-8) cannot carry
    try:
        opened = bob_opens(sealed_raw(plaintext))
    except (TamperedMessage, ForgedSender, MisroutedMessage):
        return  # well-formed records naming other people are refused by the name checks
    # Whatever got through is a well-formed record.
    assert opened == OpenedDM(fields["from"], "bob", fields["id"], fields["ts"], fields["body"])


@settings(max_examples=200, deadline=None)
@given(
    st.text(
        st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=sealing.BODY_MAX
    ).filter(str.strip)
)
def test_any_valid_text_round_trips(body: str) -> None:
    assert bob_opens(alice_to_bob(body).envelope).body == body


# -- refusing to seal -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"body": ""},
        {"body": "  "},
        {"body": "x" * (sealing.BODY_MAX + 1)},
        {"body": "bad \udcff surrogate"},
        {"sender": "Alice"},
        {"recipient": ""},
        {"message_id": "short"},
        {"message_id": "bad id with spaces"},
        {"ts": -1},
        {"ts": 2**53},
        {"ts": True},
    ],
)
def test_seal_refuses_bad_input(kwargs: dict[str, Any]) -> None:
    args = {"sender": "alice", "recipient": "bob", "body": "hi"}
    args.update(kwargs)
    extra = {k: args.pop(k) for k in ("message_id", "ts") if k in args}
    with pytest.raises(InvalidMessage):
        sealing.seal(ALICE, args["sender"], args["recipient"], BOB_PK, args["body"], **extra)


@pytest.mark.parametrize("key", [b"", bytes(31), bytes(33)])
def test_seal_refuses_a_malformed_recipient_key(key: bytes) -> None:
    with pytest.raises(sealing.BadKey):
        sealing.seal(ALICE, "alice", "bob", key, "hi")


def test_open_refuses_a_malformed_sender_key() -> None:
    with pytest.raises(sealing.BadKey):
        sealing.open_sealed(BOB, "bob", "alice", bytes(31), alice_to_bob().envelope)


def test_the_largest_sealed_dm_fits_the_envelope_cap_and_a_frame() -> None:
    # Control characters are the worst case: JSON escapes each as 6 bytes.
    sealed = sealing.seal(
        ALICE,
        "a" * 32,
        "b" * 32,
        BOB_PK,
        "\x01" * sealing.BODY_MAX,
        message_id="x" * 64,
        ts=2**53 - 1,
    )
    assert len(sealed.envelope) <= sealing.MAX_ENVELOPE_BYTES
    frame = {
        "type": "dm",
        "id": 2**53 - 1,
        "to": "b" * 32,
        "from": "a" * 32,
        "msg_id": "x" * 64,
        "box": base64.b64encode(sealed.envelope).decode(),
    }
    framing.encode(frame)  # raises if over the 64 KiB frame limit


# -- replays --------------------------------------------------------------------------------------


def opened(message_id: str = "msg-0000000001", ts: int = NOW, sender: str = "alice") -> OpenedDM:
    return OpenedDM(sender, "bob", message_id, ts, "hi")


def test_a_replayed_message_id_is_refused() -> None:
    guard = ReplayGuard()
    guard.check(opened(), now_ms=NOW)
    with pytest.raises(ReplayedMessage, match="alice"):
        guard.check(opened(), now_ms=NOW + 1000)


def test_the_same_id_from_another_sender_is_not_a_replay() -> None:
    # Ids are per sender, so a hostile peer cannot pre-empt someone else's id.
    guard = ReplayGuard()
    guard.check(opened(sender="alice"), now_ms=NOW)
    guard.check(opened(sender="carol"), now_ms=NOW)


def test_a_full_round_trip_replayed_is_refused() -> None:
    guard = ReplayGuard()
    sealed = alice_to_bob(ts=NOW)
    guard.check(bob_opens(sealed.envelope), now_ms=NOW)
    with pytest.raises(ReplayedMessage):
        guard.check(bob_opens(sealed.envelope), now_ms=NOW)


def test_the_window_edges() -> None:
    guard = ReplayGuard()
    guard.check(opened("msg-oldest-ok", ts=NOW - 7 * DAY), now_ms=NOW)
    guard.check(opened("msg-newest-ok", ts=NOW + 5 * 60 * 1000), now_ms=NOW)
    with pytest.raises(StaleMessage, match="7 days"):
        guard.check(opened("msg-too-old-1", ts=NOW - 7 * DAY - 1), now_ms=NOW)
    with pytest.raises(StaleMessage, match="5 minutes in the future"):
        guard.check(opened("msg-future-01", ts=NOW + 5 * 60 * 1000 + 1), now_ms=NOW)


def test_stale_and_refused_messages_are_not_remembered() -> None:
    guard = ReplayGuard()
    with pytest.raises(StaleMessage):
        guard.check(opened(ts=NOW + DAY), now_ms=NOW)
    assert len(guard) == 0
    guard.check(opened(ts=NOW + DAY), now_ms=NOW + DAY)  # once its time has come, it is fine


def test_memory_is_bounded_by_the_window() -> None:
    guard = ReplayGuard(max_age_ms=10_000)
    for i in range(1000):
        guard.check(opened(f"msg-{i:010d}", ts=NOW + i * 1000), now_ms=NOW + i * 1000)
        assert len(guard) <= 11
    assert len(json.dumps(guard.export())) < 2000


def test_memory_is_bounded_by_a_cap_without_reopening_replays() -> None:
    guard = ReplayGuard(max_remembered=3)
    for i in range(10):
        guard.check(opened(f"msg-{i:010d}", ts=NOW + i), now_ms=NOW + 10)
        assert len(guard) <= 3
    # msg-0 was forgotten, but alice's floor rose past it: still refused.
    with pytest.raises(StaleMessage):
        guard.check(opened("msg-0000000000", ts=NOW), now_ms=NOW + 10)
    # another sender's older messages are not affected by alice's flood
    guard.check(opened("msg-carol-0001", ts=NOW - 5, sender="carol"), now_ms=NOW + 10)


def test_setting_the_clock_back_does_not_reopen_forgotten_ids() -> None:
    guard = ReplayGuard(max_age_ms=1000)
    guard.check(opened(ts=NOW), now_ms=NOW)
    guard.check(opened("msg-0000000002", ts=NOW + 5000), now_ms=NOW + 5000)  # forgets the first
    with pytest.raises(StaleMessage):
        guard.check(opened(ts=NOW), now_ms=NOW)


def test_replay_state_export_and_load_round_trip() -> None:
    guard = ReplayGuard(max_remembered=2)
    for i in range(3):
        guard.check(opened(f"msg-{i:010d}", ts=NOW + i), now_ms=NOW)
    data = json.loads(json.dumps(guard.export()))
    loaded = ReplayGuard.load(data, max_remembered=2)
    assert loaded.export() == guard.export()
    with pytest.raises(ReplayedMessage):
        loaded.check(opened("msg-0000000002", ts=NOW + 2), now_ms=NOW)
    with pytest.raises(StaleMessage):  # forgotten under the cap, refused by the floor
        loaded.check(opened("msg-0000000000", ts=NOW), now_ms=NOW)
    loaded.check(opened("msg-0000000009", ts=NOW + 9), now_ms=NOW)


def test_loading_keeps_memory_bounded() -> None:
    guard = ReplayGuard()
    for i in range(5):
        guard.check(opened(f"msg-{i:010d}", ts=NOW + i), now_ms=NOW)
    smaller = ReplayGuard.load(guard.export(), max_remembered=2)
    assert len(smaller) == 2
    later = ReplayGuard.load(guard.export(), max_age_ms=DAY)
    later.check(opened("msg-new-000001", ts=NOW + 2 * DAY), now_ms=NOW + 2 * DAY)
    assert len(later) == 1


@pytest.mark.parametrize(
    "data",
    [
        None,
        [],
        {},
        {"version": 2, "horizon": 0, "seen": [], "floors": {}},
        {"version": 1, "horizon": "0", "seen": [], "floors": {}},
        {"version": 1, "horizon": 0, "seen": [["alice", "id"]], "floors": {}},
        {"version": 1, "horizon": 0, "seen": [["alice", "id", "1"]], "floors": {}},
        {"version": 1, "horizon": 0, "seen": [], "floors": {"alice": None}},
        {"version": 1, "horizon": 0, "seen": [], "floors": []},
    ],
)
def test_damaged_replay_state_is_refused(data: Any) -> None:
    with pytest.raises(ReplayStateError, match="damaged"):
        ReplayGuard.load(data)
