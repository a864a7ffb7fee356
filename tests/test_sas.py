"""Emoji verification (securechat/e2e/sas.py) between two devices, with every message carried as
bytes through a relay that a test may make hostile: substituting keys, replaying, reordering,
rewriting, or reflecting messages. The SAS itself is vodozemac's, for real; no network is needed,
since the module has no I/O."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path

import nacl.signing
import pytest
import vodozemac

from securechat.e2e import sas
from securechat.e2e.device import new_device_id
from securechat.e2e.sas import (
    Accept,
    Cancel,
    CancelCode,
    Done,
    Key,
    Mac,
    SasMessage,
    SasParty,
    SasState,
    SasVerification,
    Start,
)
from securechat.errors import SasMessageError, SasMismatch, VerificationError, VerificationFailed
from securechat.identity import fingerprint
from securechat.trust import KeyState, KnownKeys, Verification


def identity_key() -> bytes:
    return nacl.signing.SigningKey.generate().verify_key.encode()


def party(user: str, key: bytes | None = None) -> SasParty:
    return SasParty(user, new_device_id(), key if key is not None else identity_key())


def fp_start(key: bytes) -> str:
    return " ".join(fingerprint(key).split()[:2])


def relay(
    to: SasVerification,
    messages: Iterable[SasMessage],
    tamper: Callable[[SasMessage], SasMessage] = lambda m: m,
) -> tuple[SasMessage, ...]:
    """Carry `messages` to `to` as bytes, as a server would (after `tamper`); what `to` answers."""
    out: tuple[SasMessage, ...] = ()
    for message in messages:
        out += to.receive(sas.decode(tamper(message).encode()))
    return out


class Pair:
    """alice's device starts verifying bob's; each compares the other's real identity key."""

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self.alice, self.bob = party("alice"), party("bob")
        kwargs = {"clock": clock} if clock else {}
        self.a, self.start = SasVerification.initiate(self.alice, self.bob, **kwargs)
        self.b, self.accept = SasVerification.respond(
            sas.decode(self.start.encode()), self.bob, self.alice.identity_key, **kwargs
        )

    def exchange_keys(self) -> None:
        key_a = relay(self.a, [self.accept])
        key_b = relay(self.b, key_a)
        assert relay(self.a, key_b) == ()
        self.key_a, self.key_b = key_a, key_b


# -- the honest flow ------------------------------------------------------------------------------


@pytest.mark.parametrize("first", ["alice", "bob"])
def test_two_devices_see_the_same_emoji_and_each_verifies_exactly_the_others_key(
    first: str,
) -> None:
    pair = Pair()
    a, b = pair.a, pair.b
    assert (a.state, b.state) == (SasState.WAITING_FOR_ACCEPT, SasState.WAITING_FOR_KEY)
    pair.exchange_keys()
    assert a.state is b.state is SasState.COMPARING
    assert a.short_code is not None and a.short_code == b.short_code
    assert len(a.short_code.emoji) == 7 and all(e in sas.EMOJI for e in a.short_code.emoji)
    assert all(1000 <= d <= 9191 for d in a.short_code.decimals)

    # Each user confirms on their own device; either may be first.
    one, other = (a, b) if first == "alice" else (b, a)
    mac_one = one.confirm()
    assert [type(m) for m in mac_one] == [Mac] and one.state is SasState.WAITING_FOR_MAC
    assert relay(other, mac_one) == ()  # the MAC checks out, but its user has not confirmed yet
    assert other.state is SasState.COMPARING and other.result is None
    mac_done = other.confirm()
    assert [type(m) for m in mac_done] == [Mac, Done]
    done = relay(one, mac_done)
    assert one.state is SasState.VERIFIED and [type(m) for m in done] == [Done]
    assert relay(other, done) == () and other.state is SasState.VERIFIED

    assert a.result == sas.VerifiedKey("bob", pair.bob.device_id, pair.bob.identity_key)
    assert b.result == sas.VerifiedKey("alice", pair.alice.device_id, pair.alice.identity_key)
    assert a.result.fingerprint == fingerprint(pair.bob.identity_key)


def test_the_emoji_line_and_decimal_line_are_what_the_users_read() -> None:
    code = sas.short_code(bytes([0, 63, 21, 29, 36, 41, 53]), (1000, 4567, 9191))
    assert code.emoji_line == (
        "\U0001f436 Dog  \U0001f4cc Pin  \u2601\ufe0f Cloud  \u2764\ufe0f Heart  "
        "\U0001f44d Thumbs Up  \U0001f4a1 Light Bulb  \u2708\ufe0f Aeroplane"
    )
    assert code.decimal_line == "1000 4567 9191"


def test_the_emoji_table_is_matrix_s_64_entries() -> None:
    assert len(sas.EMOJI) == 64
    assert len({e.symbol for e in sas.EMOJI}) == len({e.name for e in sas.EMOJI}) == 64
    assert sas.EMOJI[0] == sas.Emoji("\U0001f436", "Dog")
    assert sas.EMOJI[31] == sas.Emoji("\U0001f916", "Robot")
    assert sas.EMOJI[38] == sas.Emoji("\u231b", "Hourglass")
    assert sas.EMOJI[49] == sas.Emoji("\u260e\ufe0f", "Telephone")
    assert sas.EMOJI[63] == sas.Emoji("\U0001f4cc", "Pin")


# -- what is bound: known answers -----------------------------------------------------------------

KEY_1 = bytes(range(32))
KEY_2 = bytes(range(32, 64))
TXN = "00112233445566778899aabbccddeeff"
ALICE_KAT = SasParty("alice", "AAAAAAAAAAAAAAAA", KEY_1)
BOB_KAT = SasParty("bob", "BBBBBBBBBBBBBBBB", KEY_2)


def test_the_sas_info_string_names_both_users_devices_identity_keys_sas_keys_and_the_txn() -> None:
    assert sas.sas_info(TXN, ALICE_KAT, "SASA", BOB_KAT, "SASB") == (
        "SECURECHAT_SAS_V1_EMOJI|00112233445566778899aabbccddeeff"
        "|alice|AAAAAAAAAAAAAAAA|AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=|SASA"
        "|bob|BBBBBBBBBBBBBBBB|ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=|SASB"
    )


def test_the_mac_info_names_the_sender_first_and_covers_its_identity_key() -> None:
    assert sas.mac_info(TXN, BOB_KAT, "SASB", ALICE_KAT, "SASA") == (
        "SECURECHAT_SAS_V1_MAC|00112233445566778899aabbccddeeff"
        "|bob|BBBBBBBBBBBBBBBB|ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=|SASB"
        "|alice|AAAAAAAAAAAAAAAA|AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=|SASA"
    )
    assert sas.mac_input(BOB_KAT) == "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8="


def test_the_start_encoding_and_the_commitment_over_it_are_fixed() -> None:
    start = Start(TXN, "alice", "AAAAAAAAAAAAAAAA", KEY_1, "bob", "BBBBBBBBBBBBBBBB", KEY_2)
    encoded = (
        b'{"from_device":"AAAAAAAAAAAAAAAA",'
        b'"from_key":"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=","from_user":"alice",'
        b'"to_device":"BBBBBBBBBBBBBBBB",'
        b'"to_key":"ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=","to_user":"bob",'
        b'"txn":"00112233445566778899aabbccddeeff","type":"sas.start","v":1}'
    )
    assert start.encode() == encoded
    assert sas.decode(encoded) == start
    expected = hashlib.sha256(b"securechat/sas-commitment/v1\0SASB\0" + encoded).digest()
    assert sas.commitment("SASB", start) == expected
    assert Accept(TXN, expected).encode() == (
        b'{"commitment":"' + base64.b64encode(expected) + b'",'
        b'"txn":"00112233445566778899aabbccddeeff","type":"sas.accept","v":1}'
    )


# -- a hostile server in the middle ---------------------------------------------------------------


class KeySwappingServer:
    """Runs its own SAS with each side: its own key to bob in place of alice's, and its own key
    (with a matching commitment, since it sees the start) to alice in place of bob's."""

    def __init__(self, start: Start) -> None:
        self.start = start
        self.with_alice, self.with_bob = vodozemac.Sas(), vodozemac.Sas()
        self.key_for_alice = self.with_alice.public_key.to_base64()
        self.key_for_bob = self.with_bob.public_key.to_base64()

    def to_bob(self, message: SasMessage) -> SasMessage:
        return replace(message, key=self.key_for_bob) if isinstance(message, Key) else message

    def to_alice(self, message: SasMessage) -> SasMessage:
        if isinstance(message, Accept):
            return replace(message, commitment=sas.commitment(self.key_for_alice, self.start))
        if isinstance(message, Key):
            return replace(message, key=self.key_for_alice)
        return message


def test_a_server_substituting_its_sas_keys_both_ways_shows_different_emoji_and_macs_fail() -> None:
    pair = Pair()
    a, b = pair.a, pair.b
    server = KeySwappingServer(pair.start)
    key_a = relay(a, [pair.accept], server.to_alice)
    key_b = relay(b, key_a, server.to_bob)
    relay(a, key_b, server.to_alice)
    assert a.short_code is not None and b.short_code is not None
    assert a.short_code.emoji != b.short_code.emoji
    assert a.short_code.decimals != b.short_code.decimals

    # Even if both users wrongly confirm, each MAC fails at the other end.
    mac_a, mac_b = a.confirm(), b.confirm()
    with pytest.raises(SasMismatch) as at_bob:
        relay(b, mac_a, server.to_bob)
    with pytest.raises(SasMismatch) as at_alice:
        relay(a, mac_b, server.to_alice)
    assert str(at_alice.value) == (
        "bob's device did not confirm the identity key you are comparing (fingerprint "
        f"{fp_start(pair.bob.identity_key)}...) for this exchange: the MAC check failed. The "
        "server may be intercepting; nothing was marked verified"
    )
    assert at_bob.value.code == at_alice.value.code == "mac_mismatch"
    assert a.result is b.result is None
    assert a.state is b.state is SasState.CANCELLED
    assert sas.reply_to(at_alice.value, a.txn) == Cancel(a.txn, "mac_mismatch")


def test_a_substituted_sas_key_without_a_matching_commitment_is_refused_before_any_emoji() -> None:
    pair = Pair()
    swapped = vodozemac.Sas().public_key.to_base64()
    key_a = relay(pair.a, [pair.accept])
    key_b = relay(pair.b, key_a)
    with pytest.raises(SasMismatch) as refused:
        relay(pair.a, key_b, lambda m: replace(m, key=swapped))
    assert str(refused.value) == (
        "the SAS key from bob's device does not match the commitment it sent first, or the "
        "request was altered on the way: the server may be intercepting. The verification was "
        "cancelled"
    )
    assert refused.value.code == "mismatched_commitment"
    assert pair.a.short_code is None and pair.a.state is SasState.CANCELLED


def test_a_key_reflected_back_to_its_sender_is_refused() -> None:
    pair = Pair()
    key_a = relay(pair.a, [pair.accept])
    with pytest.raises(SasMismatch) as refused:
        relay(pair.a, key_a)
    assert refused.value.code == "mismatched_commitment"


def _server_keyed_bob_for_alice(alice: SasParty, bob: SasParty) -> tuple[SasParty, Start, bytes]:
    """alice was handed the server's key for bob; the start is rewritten to bob's real key."""
    a_view = replace(bob, identity_key=identity_key())
    _, start = SasVerification.initiate(alice, a_view)
    return a_view, replace(start, to_key=bob.identity_key), alice.identity_key


def _routed_to_another_device(alice: SasParty, bob: SasParty) -> tuple[SasParty, Start, bytes]:
    """alice asked bob's other device; the server sends the start to this one instead."""
    a_view = replace(bob, device_id=new_device_id())
    _, start = SasVerification.initiate(alice, a_view)
    return a_view, replace(start, to_device=bob.device_id), alice.identity_key


def _server_keyed_alice_for_bob(alice: SasParty, bob: SasParty) -> tuple[SasParty, Start, bytes]:
    """bob was handed the server's key for alice; the start is rewritten to carry that key."""
    _, start = SasVerification.initiate(alice, bob)
    fake = identity_key()
    return bob, replace(start, from_key=fake), fake


@pytest.mark.parametrize(
    "attack", [_server_keyed_bob_for_alice, _routed_to_another_device, _server_keyed_alice_for_bob]
)
def test_a_start_rewritten_so_bob_sees_nothing_wrong_is_refused_by_alice_s_device(
    attack: Callable[[SasParty, SasParty], tuple[SasParty, Start, bytes]],
) -> None:
    alice, bob = party("alice"), party("bob")
    a_view, seen_by_bob, bob_key_for_alice = attack(alice, bob)
    a, start = SasVerification.initiate(alice, a_view)
    seen_by_bob = replace(seen_by_bob, txn=start.txn)
    b, accept = SasVerification.respond(seen_by_bob, bob, bob_key_for_alice)
    key_b = relay(b, relay(a, [accept]))
    with pytest.raises(SasMismatch) as refused:
        relay(a, key_b)
    assert refused.value.code == "mismatched_commitment"
    assert a.result is None and a.short_code is None and b.result is None


# -- what each side vouches for -------------------------------------------------------------------


@pytest.mark.parametrize("vouches_for_bob", [True, False], ids=["bob's key", "another key"])
def test_a_mac_over_another_identity_key_is_refused(vouches_for_bob: bool) -> None:
    """bob's side, played by hand with the same SAS, MACs either bob's identity key (accepted)
    or another one (refused): alice marks only the key she compared."""
    alice, bob = party("alice"), party("bob")
    a, start = SasVerification.initiate(alice, bob)
    bob_sas = vodozemac.Sas()
    bob_key = bob_sas.public_key.to_base64()
    [key_a] = a.receive(Accept(start.txn, sas.commitment(bob_key, start)))
    assert isinstance(key_a, Key)
    shared = bob_sas.diffie_hellman(vodozemac.Curve25519PublicKey.from_base64(key_a.key))
    assert a.receive(Key(start.txn, bob_key)) == ()
    shown = shared.bytes(sas.sas_info(start.txn, alice, key_a.key, bob, bob_key))
    assert a.short_code == sas.short_code(shown.emoji_indices, shown.decimals)

    vouched = bob if vouches_for_bob else replace(bob, identity_key=identity_key())
    info = sas.mac_info(start.txn, bob, bob_key, alice, key_a.key)
    mac = Mac(start.txn, shared.calculate_mac(sas.mac_input(vouched), info))
    a.confirm()
    if vouches_for_bob:
        assert relay(a, [mac]) == (Done(start.txn),)
        return
    with pytest.raises(SasMismatch) as refused:
        relay(a, [mac])
    assert refused.value.code == "mac_mismatch"
    assert a.result is None and a.state is SasState.CANCELLED


def test_a_mac_reflected_back_to_its_sender_is_refused() -> None:
    pair = Pair()
    pair.exchange_keys()
    mac_a = pair.a.confirm()
    with pytest.raises(SasMismatch) as refused:
        relay(pair.a, mac_a)
    assert refused.value.code == "mac_mismatch" and pair.a.result is None


# -- replays, reordering and other transactions ---------------------------------------------------


def test_a_replayed_key_cancels_the_verification_with_a_clear_error() -> None:
    pair = Pair()
    pair.exchange_keys()
    with pytest.raises(VerificationFailed) as refused:
        relay(pair.a, pair.key_b)
    assert str(refused.value) == (
        "a sas.key message from bob's device arrived out of order (expected sas.mac); it may be "
        "a replay. The verification was cancelled"
    )
    assert not isinstance(refused.value, SasMismatch)
    assert pair.a.state is SasState.CANCELLED and pair.a.result is None
    assert sas.reply_to(refused.value, pair.a.txn) == Cancel(pair.a.txn, "unexpected_message")


@pytest.mark.parametrize(
    ("who", "message", "expected"),
    [
        ("a", lambda p: p.start, "sas.accept"),  # alice's own start, reflected
        ("a", lambda p: Key(p.start.txn, vodozemac.Sas().public_key.to_base64()), "sas.accept"),
        ("a", lambda p: Done(p.start.txn), "sas.accept"),
        ("b", lambda p: p.accept, "sas.key"),  # bob's own accept, reflected
        ("b", lambda p: Done(p.start.txn), "sas.key"),
        ("b", lambda p: p.start, "sas.key"),  # the start, replayed
    ],
)
def test_a_message_out_of_order_is_refused(
    who: str, message: Callable[[Pair], SasMessage], expected: str
) -> None:
    pair = Pair()
    side = pair.a if who == "a" else pair.b
    with pytest.raises(VerificationFailed) as refused:
        relay(side, [message(pair)])
    assert f"(expected {expected})" in str(refused.value)
    assert refused.value.code == "unexpected_message" and side.state is SasState.CANCELLED


def test_a_message_of_another_transaction_is_refused_and_changes_nothing() -> None:
    pair = Pair()
    other_txn = "f" * 32
    with pytest.raises(SasMessageError) as refused:
        relay(pair.a, [replace(pair.accept, txn=other_txn)])
    assert str(refused.value) == (
        "a verification message for another transaction reached the verification with bob; it "
        "was refused"
    )
    assert pair.a.state is SasState.WAITING_FOR_ACCEPT
    pair.exchange_keys()  # the real accept still works
    done = relay(pair.b, pair.a.confirm()) + relay(pair.a, pair.b.confirm())
    relay(pair.b, done)
    assert pair.a.state is pair.b.state is SasState.VERIFIED


def test_a_message_after_the_end_is_refused_and_the_outcome_stays() -> None:
    pair = Pair()
    pair.exchange_keys()
    mac_a = pair.a.confirm()
    relay(pair.b, mac_a)
    mac_done_b = pair.b.confirm()
    relay(pair.b, relay(pair.a, mac_done_b))
    result = pair.a.result
    with pytest.raises(SasMessageError) as refused:
        relay(pair.a, mac_done_b[1:])
    assert str(refused.value) == (
        "a sas.done message arrived after the verification with bob had ended (verified); it was "
        "refused"
    )
    assert pair.a.state is SasState.VERIFIED and pair.a.result == result


# -- respond(): what bob's device checks in the start ---------------------------------------------


def test_a_start_for_another_device_is_refused() -> None:
    alice, bob = party("alice"), party("bob")
    _, start = SasVerification.initiate(alice, bob)
    other_device = replace(bob, device_id=new_device_id())
    with pytest.raises(SasMismatch) as refused:
        SasVerification.respond(start, other_device, alice.identity_key)
    assert str(refused.value) == (
        f"a verification request from alice was meant for bob's device {bob.device_id}, not "
        "this one; it was refused"
    )
    assert refused.value.code == "key_mismatch"


def test_a_start_comparing_another_key_for_bob_is_refused_by_bob() -> None:
    alice, bob = party("alice"), party("bob")
    mallory_key = identity_key()
    _, start = SasVerification.initiate(alice, replace(bob, identity_key=mallory_key))
    with pytest.raises(SasMismatch) as refused:
        SasVerification.respond(start, bob, alice.identity_key)
    assert str(refused.value) == (
        "alice's device is comparing a key for you that is not your identity key (its "
        f"fingerprint starts {fp_start(mallory_key)}; yours starts {fp_start(bob.identity_key)})."
        " The server may be swapping keys; nothing was verified"
    )
    assert sas.reply_to(refused.value, start.txn) == Cancel(start.txn, "key_mismatch")


def test_a_start_from_a_key_bob_does_not_hold_for_alice_is_refused() -> None:
    alice, bob = party("alice"), party("bob")
    _, start = SasVerification.initiate(alice, bob)
    held = identity_key()
    with pytest.raises(SasMismatch) as refused:
        SasVerification.respond(start, bob, held)
    assert str(refused.value) == (
        "alice's device offers the identity key whose fingerprint starts "
        f"{fp_start(alice.identity_key)}, but the key you hold for alice starts "
        f"{fp_start(held)}. The server may be swapping keys; nothing was verified"
    )


# -- cancelling, the user's answers, the clock ----------------------------------------------------


def test_the_user_saying_the_emoji_differ_cancels_both_sides() -> None:
    pair = Pair()
    pair.exchange_keys()
    cancel = pair.b.cancel(CancelCode.MISMATCHED_SAS)
    assert cancel == Cancel(pair.b.txn, "mismatched_sas") and pair.b.state is SasState.CANCELLED
    with pytest.raises(VerificationFailed) as ended:
        relay(pair.a, [cancel])
    assert str(ended.value) == (
        "bob's device cancelled the verification: the user said the emoji do not match. Nothing "
        "was marked verified"
    )
    assert ended.value.by_peer and sas.reply_to(ended.value, pair.a.txn) is None
    assert pair.a.state is SasState.CANCELLED and pair.a.cancel() is None


def test_a_cancel_with_an_unknown_code_is_shown_as_unknown_not_as_its_text() -> None:
    pair = Pair()
    with pytest.raises(VerificationFailed) as ended:
        relay(pair.a, [Cancel(pair.a.txn, "you_must_trust_mallory")])
    assert str(ended.value) == (
        "bob's device cancelled the verification: for a reason this version of securechat does "
        "not know. Nothing was marked verified"
    )


def test_confirming_before_the_emoji_are_shown_is_refused() -> None:
    pair = Pair()
    with pytest.raises(VerificationError) as refused:
        pair.a.confirm()
    assert str(refused.value) == (
        "there are no emoji to confirm in the verification with bob (waiting for the other "
        "device to accept)"
    )
    assert pair.a.state is SasState.WAITING_FOR_ACCEPT


def test_a_verification_not_finished_in_ten_minutes_times_out() -> None:
    now = [1000.0]
    pair = Pair(clock=lambda: now[0])
    pair.exchange_keys()
    now[0] += sas.TIMEOUT_SECONDS - 1
    pair.a.check_timeout()  # not yet
    now[0] += 1
    with pytest.raises(VerificationFailed) as timed_out:
        pair.a.confirm()
    assert str(timed_out.value) == (
        "the verification with bob took longer than 10 minutes and was cancelled"
    )
    assert pair.a.state is SasState.CANCELLED
    assert sas.reply_to(timed_out.value, pair.a.txn) == Cancel(pair.a.txn, "timeout")


# -- malformed messages ---------------------------------------------------------------------------


def wire(**fields: object) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


GOOD_START = dict(
    txn=TXN,
    from_user="alice",
    from_device="AAAAAAAAAAAAAAAA",
    from_key=base64.b64encode(KEY_1).decode(),
    to_user="bob",
    to_device="BBBBBBBBBBBBBBBB",
    to_key=base64.b64encode(KEY_2).decode(),
    type="sas.start",
    v=1,
)
MALFORMED = "a verification message is malformed: "


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"not json", MALFORMED + "it is not JSON"),
        (b"\xff\xfe", MALFORMED + "it is not JSON"),
        (b" " * 1025, MALFORMED + "it is over 1024 bytes"),
        (b"[]", MALFORMED + "it is not a JSON object"),
        (wire(type="sas.hello", v=1), MALFORMED + "unknown type 'sas.hello'"),
        (wire(type=["sas.done"], v=1), MALFORMED + "unknown type ['sas.done']"),
        (
            wire(txn=TXN, type="sas.done", v=2),
            "a verification message has an unsupported version 2 (this client speaks version 1)",
        ),
        (
            wire(txn=TXN, type="sas.done", v=True),
            "a verification message has an unsupported version True (this client speaks version 1)",
        ),
        (wire(type="sas.done", v=1), MALFORMED + "a sas.done has exactly the fields ['txn']"),
        (
            wire(txn=TXN, type="sas.done", v=1, extra=1),
            MALFORMED + "a sas.done has exactly the fields ['txn']",
        ),
        (
            wire(txn=TXN.upper(), type="sas.done", v=1),
            MALFORMED + "the transaction id is not 32 hex digits",
        ),
        (
            wire(txn=TXN, type="sas.key", v=1, key="AAAA"),
            MALFORMED + "the SAS key is not a key",
        ),
        (
            wire(txn=TXN, type="sas.mac", v=1, mac="not a mac at all"),
            MALFORMED + "the MAC is not 32 bytes",
        ),
        (
            wire(txn=TXN, type="sas.accept", v=1, commitment="AAAA"),
            MALFORMED + "the commitment is not 32 bytes of base64",
        ),
        (
            wire(txn=TXN, type="sas.cancel", v=1, code="Trust Mallory"),
            MALFORMED + "the cancel code is not a code",
        ),
        (
            wire(**{**GOOD_START, "from_user": "Alice!"}),
            MALFORMED + "the from user may hold only a-z, 0-9 and _ . - and must start with a "
            "letter or digit",
        ),
        (
            wire(**{**GOOD_START, "to_device": "abc"}),
            MALFORMED + "the to device is not a device id (16 characters of A-Z and 2-7)",
        ),
        (
            wire(**{**GOOD_START, "to_key": base64.b64encode(KEY_2[:31]).decode()}),
            MALFORMED + "the to key is not a 32-byte base64 key",
        ),
        (
            wire(**{**GOOD_START, "from_key": GOOD_START["from_key"][:42] + "9="}),
            MALFORMED + "the from key is not a 32-byte base64 key",
        ),
        (
            wire(**GOOD_START).replace(b'","', b'", "', 1),
            "a verification message is not in canonical form",
        ),
    ],
)
def test_a_malformed_message_gets_a_clear_error(raw: bytes, error: str) -> None:
    with pytest.raises(SasMessageError) as refused:
        sas.decode(raw)
    assert str(refused.value) == error


def test_the_well_formed_start_used_above_decodes() -> None:
    assert sas.decode(wire(**GOOD_START)) == Start(
        TXN, "alice", "AAAAAAAAAAAAAAAA", KEY_1, "bob", "BBBBBBBBBBBBBBBB", KEY_2
    )


# -- the outcome, and what the caller does with it ------------------------------------------------


def test_the_caller_marks_exactly_the_key_compared_even_when_the_server_changes_it_later(
    tmp_path: Path,
) -> None:
    """bob made a new key; alice's /verify shows the pinned key and the new one the server
    offers; she compares the new one by emoji with bob. That key, and no key the server offers
    afterwards, is the one marked verified."""
    alice, bob = party("alice"), party("bob")
    known = KnownKeys(tmp_path / "alice.known-keys.json")
    old_key = identity_key()
    known.check("bob", old_key)
    shown = Verification.of(known.check("bob", bob.identity_key), "alice", alice.identity_key)
    compared = shown.choose(fingerprint(bob.identity_key).split()[0])

    a, start = SasVerification.initiate(alice, replace(bob, identity_key=compared))
    b, accept = SasVerification.respond(start, bob, alice.identity_key)
    relay(a, relay(b, relay(a, [accept])))
    relay(b, relay(a, relay(b, a.confirm()) + b.confirm()))
    assert a.result is not None and a.state is SasState.VERIFIED

    later = identity_key()  # the server now offers yet another key for bob
    assert known.check("bob", later).state is KeyState.CHANGED
    entry = known.mark_shown_verified(shown, a.result.identity_key)
    assert entry.key == bob.identity_key and entry.state is KeyState.VERIFIED
    assert known.pinned("bob") == bob.identity_key
