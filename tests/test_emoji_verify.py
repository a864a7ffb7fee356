"""Emoji verification (SAS) between two people's devices through the real server: the messages
travel inside Olm DMs (inner kind "sas"), never as chat text; a match marks exactly the key that
was compared; a hostile server or a tampered message cannot make it succeed."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import pytest

from securechat.client import Client
from securechat.client.events import DirectMessage, EmojiVerification, Event
from securechat.client.history import LocalHistory
from securechat.e2e import sas
from securechat.errors import VerificationError
from securechat.identity import Identity
from securechat.trust import KeyState

from .conftest import KeyOffers, wait_for

Connect = Callable[..., Client]


def stage(name: str) -> Callable[[Event], bool]:
    def matches(event: Event) -> bool:
        # Every event before the step is checked too: no verification message is shown as a DM.
        assert not isinstance(event, DirectMessage), f"a verification step shown as a DM: {event}"
        return isinstance(event, EmojiVerification) and event.stage == name

    return matches


def compare(alice: Client, bob: Client) -> tuple[EmojiVerification, EmojiVerification]:
    """alice asks bob's device; bob accepts; both get the emoji to compare."""
    started = alice.start_emoji(alice.safety_number("bob"))
    assert started.stage == "started" and started.device == bob.device_id
    asked = wait_for(bob, stage("requested"))
    assert isinstance(asked, EmojiVerification)
    assert asked.user == "alice" and asked.device == alice.device_id
    assert "alice (device " in asked.detail and "wants to compare emoji" in asked.detail
    bob.accept_emoji("alice")
    theirs = wait_for(bob, stage("compare"))
    mine = wait_for(alice, stage("compare"))
    assert isinstance(mine, EmojiVerification) and isinstance(theirs, EmojiVerification)
    return mine, theirs


def test_two_people_compare_emoji_and_both_end_verified_for_exactly_the_keys_compared(
    connect: Connect, make_identity: Callable[[str], Identity]
) -> None:
    alice_id, bob_id = make_identity("alice"), make_identity("bob")
    histories = [LocalHistory.beside(alice_id), LocalHistory.beside(bob_id)]
    alice = connect("alice", history=histories[0])
    bob = connect("bob", history=histories[1])
    mine, theirs = compare(alice, bob)
    assert mine.emoji == theirs.emoji and mine.decimals == theirs.decimals
    assert len(mine.emoji.split("  ")) == sas.EMOJI_COUNT
    names = {e.name for e in sas.EMOJI}
    assert all(part.split(" ", 1)[1] in names for part in mine.emoji.split("  "))
    assert len(mine.decimals.split()) == 3

    alice.confirm_emoji("bob")
    assert wait_for(alice, stage("waiting")).detail == (  # type: ignore[union-attr]
        "confirmed; waiting for bob to confirm on their side"
    )
    bob.confirm_emoji("alice")
    done_a = wait_for(alice, stage("verified"))
    done_b = wait_for(bob, stage("verified"))
    assert isinstance(done_a, EmojiVerification) and isinstance(done_b, EmojiVerification)
    assert done_a.fingerprint == bob_id.fingerprint
    assert done_b.fingerprint == alice_id.fingerprint
    assert alice.known_keys.state("bob") is KeyState.VERIFIED
    assert alice.known_keys.pinned("bob") == bob_id.verify_key_bytes
    assert bob.known_keys.state("alice") is KeyState.VERIFIED
    assert bob.known_keys.pinned("alice") == alice_id.verify_key_bytes

    # Never chat text, never in the local history.
    for client in (alice, bob):
        while (event := client.next_event(timeout=0.3)) is not None:
            assert not isinstance(event, DirectMessage), event
    for history in histories:
        assert list(history.conversation("@alice")) == []
        assert list(history.conversation("@bob")) == []


def test_the_emoji_differ_both_sides_see_a_warning_and_nothing_is_verified(
    connect: Connect,
) -> None:
    alice, bob = connect("alice"), connect("bob")
    compare(alice, bob)
    bob.cancel_emoji("alice", mismatch=True)
    here = wait_for(bob, stage("cancelled"))
    there = wait_for(alice, stage("cancelled"))
    assert isinstance(here, EmojiVerification) and isinstance(there, EmojiVerification)
    assert here.mismatch and there.mismatch
    assert here.detail.startswith("you said the emoji differ: alice was NOT verified")
    assert there.detail == (
        "the emoji comparison with bob failed: bob's device cancelled the verification: the "
        "user said the emoji do not match. Nothing was marked verified. Someone may be "
        "intercepting. bob was NOT verified"
    )
    assert alice.known_keys.state("bob") is KeyState.PINNED
    assert bob.known_keys.state("alice") is KeyState.PINNED
    with pytest.raises(VerificationError, match="no emoji comparison with alice going on"):
        bob.confirm_emoji("alice")


def test_a_server_swapping_bobs_identity_key_gets_no_comparison_and_nothing_verified(
    connect: Connect, key_offers: KeyOffers, make_identity: Callable[[str], Identity]
) -> None:
    alice, bob = connect("alice"), connect("bob")
    alice.check_key("bob")  # pinned: bob's real key
    key_offers.offer["bob"] = make_identity("mallory").verify_key_bytes
    with pytest.raises(VerificationError, match="offers bob a key other than the pinned one"):
        alice.start_emoji(alice.safety_number("bob"))
    assert alice.known_keys.state("bob") is KeyState.CHANGED
    while (event := bob.next_event(timeout=0.5)) is not None:
        assert not isinstance(event, EmojiVerification), event  # bob was never asked


def test_a_server_swapping_the_key_at_first_sight_finds_no_device_to_compare_with(
    connect: Connect, key_offers: KeyOffers, make_identity: Callable[[str], Identity]
) -> None:
    alice, _bob = connect("alice"), connect("bob")
    key_offers.offer["bob"] = make_identity("mallory").verify_key_bytes
    with pytest.raises(VerificationError, match="bob has no device signed by their identity key"):
        alice.start_emoji(alice.safety_number("bob"))
    assert alice.known_keys.state("bob") is KeyState.PINNED  # the swapped key, never verified


def substitute_sent(client: Client, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """Replace the `kind` message `client`'s device sends before it is sealed (what a server
    that could get past Olm would have to do): another key, or another MAC."""
    assert client.dms is not None
    real = client.dms.send_sas

    def substitute(target: Any, body: str) -> Any:
        data = json.loads(body)
        if data["type"] == kind:
            field = "key" if kind == "sas.key" else "mac"
            data[field] = base64.b64encode(bytes(range(32))).decode().rstrip("=")
            body = sas.from_wire(data).encode().decode()
        return real(target, body)

    monkeypatch.setattr(client.dms, "send_sas", substitute)


def test_a_substituted_sas_key_fails_the_commitment_and_is_shown(
    connect: Connect, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice, bob = connect("alice"), connect("bob")
    substitute_sent(bob, monkeypatch, "sas.key")
    alice.start_emoji(alice.safety_number("bob"))
    wait_for(bob, stage("requested"))
    bob.accept_emoji("alice")
    failed = both_cancelled_as_mismatch(
        alice, bob, "does not match the commitment", "the SAS key did not match its commitment"
    )
    assert failed.detail.endswith("Someone may be intercepting. bob was NOT verified")


def both_cancelled_as_mismatch(
    alice: Client, bob: Client, alice_reads: str, bob_reads: str
) -> EmojiVerification:
    """Both sides cancel as a possible interception, each saying why, and neither key is
    verified; alice's cancel is returned for more checks."""
    failed = wait_for(alice, stage("cancelled"))
    assert isinstance(failed, EmojiVerification) and failed.mismatch
    assert alice_reads in failed.detail
    told = wait_for(bob, stage("cancelled"))
    assert isinstance(told, EmojiVerification) and told.mismatch
    assert bob_reads in told.detail
    assert alice.known_keys.state("bob") is KeyState.PINNED
    assert bob.known_keys.state("alice") is KeyState.PINNED
    return failed


def test_a_substituted_mac_fails_after_both_confirm_and_is_shown(
    connect: Connect, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice, bob = connect("alice"), connect("bob")
    substitute_sent(bob, monkeypatch, "sas.mac")
    compare(alice, bob)
    alice.confirm_emoji("bob")
    bob.confirm_emoji("alice")
    both_cancelled_as_mismatch(alice, bob, "the MAC check failed", "the MAC check failed")


def test_a_sas_envelope_replayed_by_the_server_is_refused_not_taken_as_a_step(
    connect: Connect, monkeypatch: pytest.MonkeyPatch
) -> None:
    from securechat.client.events import DMRejected

    from .conftest import rewrite_sent_frames

    alice, bob = connect("alice"), connect("bob")
    sent: list[dict[str, Any]] = []

    def replay(frame: dict[str, Any]) -> list[dict[str, Any]]:
        if frame.get("to") == "bob" or frame.get("from") == "alice":
            sent.append(frame)
            if len(sent) == 2:  # alice's sas.key: deliver her sas.start again in its place
                return [{**sent[0], "queued": False}]
        return [frame]

    rewrite_sent_frames(monkeypatch, "dm", replay)
    alice.start_emoji(alice.safety_number("bob"))
    wait_for(bob, stage("requested"))
    bob.accept_emoji("alice")
    refused = wait_for(bob, lambda e: isinstance(e, DMRejected))
    assert isinstance(refused, DMRejected) and refused.kind == "replayed"
    assert bob.known_keys.state("alice") is KeyState.PINNED
    assert alice.known_keys.state("bob") is KeyState.PINNED


def test_a_comparison_not_finished_in_ten_minutes_is_cancelled_on_both_sides(
    connect: Connect,
) -> None:
    alice, bob = connect("alice"), connect("bob")
    assert alice.verifier is not None and bob.verifier is not None
    now = [1000.0]
    alice.verifier.clock = bob.verifier.clock = lambda: now[0]
    alice.start_emoji(alice.safety_number("bob"))
    wait_for(bob, stage("requested"))
    now[0] += sas.TIMEOUT_SECONDS - 1
    alice.verifier.check_timeouts()
    bob.verifier.check_timeouts()
    while (event := alice.next_event(timeout=0.3)) is not None:  # not yet
        assert not stage("cancelled")(event), event
    now[0] += 1
    alice.verifier.check_timeouts()
    mine = wait_for(alice, stage("cancelled"))
    assert isinstance(mine, EmojiVerification) and not mine.mismatch
    assert mine.detail == (
        "the emoji comparison with bob failed: the verification with bob took longer than 10 "
        "minutes and was cancelled. bob was NOT verified"
    )
    theirs = wait_for(bob, stage("cancelled"))
    assert theirs.detail == (  # type: ignore[union-attr]
        "alice's device withdrew the request to compare emoji: it timed out"
    )


def test_an_unanswered_request_expires_after_ten_minutes(connect: Connect) -> None:
    alice, bob = connect("alice"), connect("bob")
    assert bob.verifier is not None
    now = [1000.0]
    bob.verifier.clock = lambda: now[0]
    alice.start_emoji(alice.safety_number("bob"))
    wait_for(bob, stage("requested"))
    now[0] += sas.TIMEOUT_SECONDS
    bob.verifier.check_timeouts()
    expired = wait_for(bob, stage("cancelled"))
    assert expired.detail == (  # type: ignore[union-attr]
        "the emoji comparison with alice failed: the request from alice to compare emoji "
        "expired. alice was NOT verified"
    )
    with pytest.raises(VerificationError, match="no emoji comparison with alice going on"):
        bob.accept_emoji("alice")
    told = wait_for(alice, stage("cancelled"))
    assert "bob's device cancelled the verification: it timed out" in told.detail  # type: ignore[union-attr]


def test_a_request_to_an_offline_device_says_so_and_reaches_it_when_it_connects(
    connect: Connect,
) -> None:
    connect("bob").close()  # bob's device is known to the server, then goes offline
    alice = connect("alice")
    started = alice.start_emoji(alice.safety_number("bob"))
    assert "(it is offline; the request waits for it)" in started.detail
    bob = connect("bob")
    asked = wait_for(bob, stage("requested"))
    assert asked.user == "alice"  # type: ignore[union-attr]
    with pytest.raises(VerificationError, match=r"^your own devices share your identity key"):
        alice.start_emoji(alice.safety_number("alice"))


def test_a_key_the_server_offers_mid_comparison_never_changes_which_key_is_marked(
    connect: Connect, key_offers: KeyOffers, make_identity: Callable[[str], Identity]
) -> None:
    alice, bob = connect("alice"), connect("bob")
    compare(alice, bob)
    key_offers.offer["bob"] = make_identity("mallory").verify_key_bytes
    assert alice.check_key("bob").state is KeyState.CHANGED  # alice's client has seen the swap
    alice.confirm_emoji("bob")
    bob.confirm_emoji("alice")
    done = wait_for(alice, stage("verified"))
    assert done.fingerprint == bob.identity.fingerprint  # type: ignore[union-attr]
    entry = alice.known_keys.entry("bob")
    assert entry is not None and entry.state is KeyState.VERIFIED
    assert entry.key == bob.identity.verify_key_bytes


def test_when_both_ask_at_once_one_comparison_goes_on(connect: Connect) -> None:
    alice, bob = connect("alice"), connect("bob")
    alice.start_emoji(alice.safety_number("bob"))
    bobs = bob.start_emoji(bob.safety_number("alice"))
    if bobs.detail.startswith("asked alice's device"):
        # Both requests crossed: alice's goes on (her name sorts first) and replaces bob's.
        asked = wait_for(bob, stage("requested"))
        assert asked.user == "alice"  # type: ignore[union-attr]
        bob.accept_emoji("alice")
    else:  # alice's request reached bob first: asking back accepted it
        assert bobs.detail == "accepted; exchanging keys with alice's device"
    mine, theirs = wait_for(alice, stage("compare")), wait_for(bob, stage("compare"))
    assert mine.emoji == theirs.emoji  # type: ignore[union-attr]
    while (event := alice.next_event(timeout=0.3)) is not None:
        assert not stage("requested")(event), event  # alice is never asked to accept bob's
