"""The inner DM record (v2), its padding, and the receiver's conversation tracker."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import vodozemac
from hypothesis import given
from hypothesis import strategies as st

from securechat.e2e import inner
from securechat.e2e.conversations import Arrival, ConversationTracker
from securechat.e2e.inner import InnerRecord
from securechat.errors import BrokenChain, DeviceStateError, InvalidRecord, ReplayedRecord
from securechat.sealing import ReplayedMessage, StaleMessage

from .olm_helpers import now_ms

PHONE, LAPTOP, BOB_PHONE = "AAAAAAAAAAAAAAAA", "BBBBBBBBBBBBBBBB", "CCCCCCCCCCCCCCCC"


def record(**change: object) -> InnerRecord:
    base = InnerRecord(
        sender="alice",
        sender_device=PHONE,
        recipient="bob",
        recipient_device=BOB_PHONE,
        message_id="abcdefgh",
        ts=1_700_000_000_000,
        body="hi bob",
        chain="0123456789abcdef",
        seq=1,
        prev="",
    )
    return replace(base, **change)


def sent(count: int, prefix: str = "message") -> list[InnerRecord]:
    """`count` records alice's phone sends to bob's phone, chained as the sender chains them."""
    sender = ConversationTracker("alice", PHONE)
    out = []
    for i in range(count):
        rec = sender.next_record("bob", BOB_PHONE, f"{prefix}-{i:04d}", now_ms(), f"text {i}")
        sender.record_sent(rec)
        out.append(rec)
    return out


# -- the record -----------------------------------------------------------------------------------


def test_the_record_has_one_canonical_encoding_padded_to_a_bucket() -> None:
    encoded = inner.encode(record())
    assert encoded.rstrip(b" ") == (
        b'{"body":"hi bob","chain":"0123456789abcdef","from":"alice","from_device":'
        b'"AAAAAAAAAAAAAAAA","id":"abcdefgh","kind":"dm","prev":"","seq":1,"to":"bob",'
        b'"to_device":"CCCCCCCCCCCCCCCC","ts":1700000000000,"v":2}'
    )
    assert len(encoded) == 256
    assert inner.decode(encoded) == record()


def test_a_verification_record_is_its_own_kind_and_shares_the_chain() -> None:
    sender = ConversationTracker("alice", PHONE)
    chat = sender.next_record("bob", BOB_PHONE, "message-0001", now_ms(), "hi")
    sender.record_sent(chat)
    step = sender.next_record("bob", BOB_PHONE, "message-0002", now_ms(), '{"type":"x"}', "sas")
    assert (step.kind, step.seq, step.prev) == ("sas", 2, chat.digest)
    encoded = inner.encode(step)
    assert b'"kind":"sas"' in encoded
    assert inner.decode(encoded) == step
    assert inner.decode(encoded).kind == inner.SAS_KIND
    # The kind is inside the hash chain: a "dm" record cannot be passed off as a "sas" one.
    assert replace(step, kind="dm").digest != step.digest


def test_the_record_repr_shows_no_text() -> None:
    assert "hi bob" not in repr(record())


@pytest.mark.parametrize(
    ("length", "bucket"), [(1, 256), (256, 256), (257, 512), (4097, 8192), (48000, 48000)]
)
def test_bucket_sizes(length: int, bucket: int) -> None:
    assert inner.bucket_for(length) == bucket


def test_padding_hides_lengths_within_a_bucket_even_after_olm() -> None:
    alice, bob = vodozemac.Account(), vodozemac.Account()
    bob.generate_one_time_keys(1)
    session = alice.create_outbound_session(
        bob.curve25519_key, next(iter(bob.one_time_keys.values()))
    )
    sizes = {
        len(session.encrypt(inner.encode(record(body="x" * n, seq=1))).to_parts()[1])
        for n in (1, 20, 45)
    }
    assert len(sizes) == 1
    longer = len(session.encrypt(inner.encode(record(body="x" * 300))).to_parts()[1])
    assert longer > sizes.pop()


def test_a_text_too_long_once_encoded_is_refused_before_sending() -> None:
    assert len(inner.encode(record(body="\U0001f600" * 8000))) == 32768
    with pytest.raises(InvalidRecord) as err:
        inner.encode(record(body="\x01" * 8000))
    assert str(err.value) == "the message is too long once encoded (over 48000 bytes); shorten it"


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"body": " "}, "the text must be 1 to 8000 characters and not blank"),
        ({"seq": 0}, "the sequence number is out of range"),
        ({"seq": 2}, "the previous-message hash is malformed"),
        ({"prev": "ab" * 32}, "the previous-message hash is malformed"),
        ({"chain": "XYZ"}, "the chain id is malformed"),
        ({"recipient_device": "short"}, "a device id is malformed"),
        ({"sender": "Alice"}, "the sender name is malformed"),
        ({"message_id": "short"}, "the message id must be 8 to 64 characters"),
        ({"kind": "room"}, "the kind is unknown"),
    ],
)
def test_a_malformed_record_is_not_sent(change, why) -> None:
    with pytest.raises(InvalidRecord, match=f"^cannot send the direct message: {why}"):
        inner.encode(record(**change))


def pad(raw: bytes) -> bytes:
    return raw + b" " * (inner.bucket_for(len(raw)) - len(raw))


@pytest.mark.parametrize(
    ("plaintext", "message"),
    [
        (b"{}" + b" " * 200, "is not padded to a size bucket"),
        (pad(b"not json"), "is not a JSON record"),
        (pad(b'{"v":1}'), "does not have the version 2 fields"),
        (
            pad(inner.encode(record()).rstrip(b" ").replace(b'"v":2', b'"v":3')),
            "has an unknown version or kind",
        ),
        (
            pad(inner.encode(record()).rstrip(b" ").replace(b'"kind":"dm"', b'"kind":"room"')),
            "has an unknown version or kind",
        ),
        (
            pad(inner.encode(record()).rstrip(b" ").replace(b'"kind":"dm"', b'"kind":["dm"]')),
            "has an unknown version or kind",
        ),
        (
            pad(inner.encode(record()).rstrip(b" ").replace(b'{"body"', b'{ "body"')),
            "is not in canonical form",
        ),
        (
            pad(json.dumps(json.loads(inner.encode(record())), sort_keys=False).encode()),
            "is not in canonical form",
        ),
        (
            pad(inner.encode(record()).rstrip(b" ").replace(b'"seq":1', b'"seq":true')),
            "is malformed: the sequence number is out of range",
        ),
    ],
)
def test_a_malformed_decrypted_record_is_refused(plaintext: bytes, message: str) -> None:
    with pytest.raises(InvalidRecord, match=message):
        inner.decode(plaintext)


# -- the tracker ----------------------------------------------------------------------------------


def test_in_order_records_pass_and_each_names_the_hash_of_the_one_before() -> None:
    records = sent(3)
    assert [r.seq for r in records] == [1, 2, 3]
    assert records[1].prev == records[0].digest and records[2].prev == records[1].digest
    bob = ConversationTracker("bob", BOB_PHONE)
    assert [bob.accept(r).arrival for r in records] == [Arrival.IN_ORDER] * 3


def test_a_gap_is_reported_with_its_size_and_filled_out_of_order() -> None:
    records = sent(6)
    bob = ConversationTracker("bob", BOB_PHONE)
    bob.accept(records[0])
    gap = bob.accept(records[4])
    assert (gap.arrival, gap.missing) == (Arrival.GAP, 3)
    assert gap.notice("bob") == "3 messages from alice are missing"
    assert bob.missing("alice", PHONE) == 3
    for late in (records[2], records[1], records[3]):
        assert bob.accept(late).arrival is Arrival.OUT_OF_ORDER
    assert bob.missing("alice", PHONE) == 0
    assert bob.accept(records[5]).arrival is Arrival.IN_ORDER


def test_a_replay_is_refused_also_after_a_restart() -> None:
    records = sent(3)
    bob = ConversationTracker("bob", BOB_PHONE)
    for r in records:
        bob.accept(r)
    with pytest.raises(ReplayedRecord) as err:
        bob.accept(records[1])
    assert str(err.value) == (
        f"a direct message from alice's device {PHONE} arrived again (its sequence number was "
        "seen before); the copy was dropped. The server may be replaying old messages"
    )
    saved = json.loads(json.dumps(bob.export()))
    again = ConversationTracker.load(saved, "bob", BOB_PHONE, "the conversation file")
    with pytest.raises(ReplayedRecord):
        again.accept(records[2])
    with pytest.raises(ReplayedRecord):
        again.accept(records[0])


def test_a_record_that_breaks_the_hash_chain_is_refused() -> None:
    records = sent(2)
    bob = ConversationTracker("bob", BOB_PHONE)
    bob.accept(records[0])
    with pytest.raises(BrokenChain) as err:
        bob.accept(replace(records[1], prev="0" * 64))
    assert str(err.value) == (
        f"a direct message from alice's device {PHONE} does not fit the messages before it "
        "(its hash chain breaks); it was dropped"
    )
    assert bob.accept(records[1]).arrival is Arrival.IN_ORDER


def test_a_late_record_that_its_successor_does_not_name_is_refused() -> None:
    records = sent(3)
    bob = ConversationTracker("bob", BOB_PHONE)
    bob.accept(records[0])
    bob.accept(records[2])
    with pytest.raises(BrokenChain):
        bob.accept(replace(records[1], body="something else"))
    assert bob.accept(records[1]).arrival is Arrival.OUT_OF_ORDER


def test_a_new_chain_from_a_device_starts_afresh_and_the_old_one_cannot_come_back() -> None:
    old = sent(2)
    new = sent(2, "renewed")  # the sender lost its state: a new chain
    assert new[0].chain != old[0].chain
    bob = ConversationTracker("bob", BOB_PHONE)
    bob.accept(old[0])
    assert bob.accept(new[0]).arrival is Arrival.IN_ORDER
    with pytest.raises(ReplayedRecord, match="belongs to a chain it has since left"):
        bob.accept(old[1])


def test_the_same_message_id_in_another_record_is_refused_by_the_replay_guard() -> None:
    records = sent(2)
    bob = ConversationTracker("bob", BOB_PHONE)
    bob.accept(records[0])
    copy = replace(records[1], message_id=records[0].message_id)
    with pytest.raises(ReplayedMessage):
        bob.accept(copy)
    assert bob.accept(records[1]).arrival is Arrival.IN_ORDER  # the refusal changed nothing


def test_a_stale_record_is_refused() -> None:
    bob = ConversationTracker("bob", BOB_PHONE)
    with pytest.raises(StaleMessage):
        bob.accept(record(ts=1_000), now_ms=1_700_000_000_000)


def test_copies_of_my_own_messages_to_different_people_keep_separate_chains() -> None:
    phone = ConversationTracker("alice", PHONE)
    laptop = ConversationTracker("alice", LAPTOP)
    for i, to in enumerate(("bob", "carol", "bob", "carol")):
        rec = phone.next_record(to, LAPTOP, f"copy-{i:04d}", now_ms(), "hi")
        phone.record_sent(rec)
        delivery = laptop.accept(rec)
        assert delivery.arrival is Arrival.IN_ORDER, i
    gap_rec = phone.next_record("bob", LAPTOP, "copy-0010", now_ms(), "x")
    phone.record_sent(gap_rec)
    skipped = phone.next_record("bob", LAPTOP, "copy-0011", now_ms(), "y")
    phone.record_sent(skipped)
    assert laptop.accept(skipped).notice("alice") == (
        f"a message you sent from device {PHONE} is missing"
    )


def test_record_sent_ignores_a_record_it_did_not_make_next() -> None:
    alice = ConversationTracker("alice", PHONE)
    first = alice.next_record("bob", BOB_PHONE, "message-0001", now_ms(), "a")
    alice.record_sent(replace(first, seq=5, prev="ab" * 32))
    assert alice.next_record("bob", BOB_PHONE, "message-0002", now_ms(), "b").seq == 1


def test_memory_is_bounded() -> None:
    bob = ConversationTracker("bob", BOB_PHONE, max_chains=3, max_missing=5)
    records = sent(50)
    bob.accept(records[0])
    gap = bob.accept(records[40])
    assert gap.missing == 39 and bob.missing("alice", PHONE) == 5
    assert bob.accept(records[39]).arrival is Arrival.OUT_OF_ORDER
    with pytest.raises(ReplayedRecord):  # given up as lost: a late copy is not shown
        bob.accept(records[10])
    for device in ("DDDDDDDDDDDDDDDD", "EEEEEEEEEEEEEEEE", "FFFFFFFFFFFFFFFF"):
        bob.accept(record(sender_device=device, message_id=f"dev-{device}", ts=now_ms()))
    assert len(bob.export()["incoming"]) == 3
    assert bob.missing("alice", PHONE) == 0  # the least recently used chain went first


@pytest.mark.parametrize(
    "damage",
    [
        lambda s: s.update(version=2),
        lambda s: s.update(me="mallory"),
        lambda s: s.update(incoming=[["x"]]),
        lambda s: s.update(guard={"version": 9}),
    ],
)
def test_damaged_tracker_state_is_refused(damage) -> None:
    bob = ConversationTracker("bob", BOB_PHONE)
    bob.accept(sent(1)[0])
    state = bob.export()
    damage(state)
    with pytest.raises(DeviceStateError) as err:
        ConversationTracker.load(state, "bob", BOB_PHONE, "the conversation file x")
    assert str(err.value) == (
        "the conversation file x is damaged; move it aside to start afresh (replays of old "
        "messages may then be shown once more)"
    )


@given(st.one_of(st.binary(max_size=600), st.binary(min_size=256, max_size=256)))
def test_any_decrypted_bytes_are_a_record_or_invalid(plaintext: bytes) -> None:
    try:
        inner.decode(plaintext)
    except InvalidRecord:
        pass
