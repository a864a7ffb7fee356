"""Pinned keys (trust on first use), key states and safety numbers; files in tmp_path only."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import stat
from pathlib import Path

import nacl.signing
import pytest

from securechat import identity, trust
from securechat.terminal import hints
from securechat.trust import (
    InvalidContact,
    KeyChanged,
    KeyState,
    KnownKeys,
    KnownKeysError,
    NotPinned,
    known_keys_path,
    safety_number,
)


def public_key(seed_byte: int) -> bytes:
    return bytes(nacl.signing.SigningKey(bytes([seed_byte]) * 32).verify_key)


ALICE = public_key(1)
BOB = public_key(2)
BOB_NEW = public_key(3)
CAROL = public_key(4)

T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return known_keys_path(tmp_path / "alice.key")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def known(path: Path, clock: Clock) -> KnownKeys:
    return KnownKeys(path, clock=clock)


def on_disk(path: Path) -> dict:
    return json.loads(path.read_text())


def test_known_keys_live_beside_the_key_file(tmp_path: Path) -> None:
    assert known_keys_path(tmp_path / "alice.key") == tmp_path / "alice.known-keys.json"
    assert known_keys_path(tmp_path / "bot") == tmp_path / "bot.known-keys.json"


def test_a_missing_file_is_an_empty_store_and_is_not_created(path: Path) -> None:
    known = KnownKeys(path)
    assert known.state("bob") is None
    assert known.pinned("bob") is None
    assert not path.exists()


# -- trust on first use -------------------------------------------------------------------------


def test_first_sight_pins_the_key_then_it_is_pinned(known: KnownKeys, path: Path) -> None:
    first = known.check("bob", BOB)
    assert first.state is KeyState.NEW
    assert first.may_send
    assert first.key == first.pinned_key == BOB
    assert first.fingerprint == first.pinned_fingerprint == identity.fingerprint(BOB)
    assert known.state("bob") is KeyState.PINNED
    assert known.pinned("bob") == BOB
    assert known.may_send("bob", BOB)

    again = known.check("bob", BOB)
    assert again.state is KeyState.PINNED
    assert KnownKeys(path).check("bob", BOB).state is KeyState.PINNED


def test_the_file_format(known: KnownKeys, path: Path) -> None:
    known.check("bob", BOB)
    assert on_disk(path) == {
        "version": 1,
        "keys": {
            "bob": {
                "key": base64.b64encode(BOB).decode(),
                "state": "pinned",
                "first_seen": "2023-11-14T22:13:20Z",
                "verified_at": None,
            }
        },
    }


def test_the_file_is_private_and_written_without_leftovers(known: KnownKeys, path: Path) -> None:
    known.check("bob", BOB)
    known.check("carol", CAROL)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_unknown_names_may_not_be_sent_to_before_a_check(known: KnownKeys) -> None:
    assert not known.may_send("bob", BOB)


# -- a changed key --------------------------------------------------------------------------------


def test_a_changed_key_is_reported_with_both_fingerprints_and_blocks_sending(
    known: KnownKeys, path: Path
) -> None:
    known.check("bob", BOB)
    before = path.read_bytes()

    changed = known.check("bob", BOB_NEW)
    assert changed.state is KeyState.CHANGED
    assert not changed.may_send
    assert changed.key == BOB_NEW
    assert changed.pinned_key == BOB
    assert changed.fingerprint == identity.fingerprint(BOB_NEW)
    assert changed.pinned_fingerprint == identity.fingerprint(BOB)
    assert not known.may_send("bob", BOB_NEW)
    assert known.state("bob") is KeyState.CHANGED

    # Nothing changed on disk: the old key stays pinned, after a reload too.
    assert path.read_bytes() == before
    assert known.pinned("bob") == BOB
    reloaded = KnownKeys(path)
    assert reloaded.pinned("bob") == BOB
    assert reloaded.check("bob", BOB_NEW).state is KeyState.CHANGED


def test_the_changed_key_warning_is_loud_and_names_both_fingerprints(known: KnownKeys) -> None:
    known.check("bob", BOB)
    with pytest.raises(KeyChanged) as caught:
        known.require_sendable("bob", BOB_NEW)
    text = str(caught.value)
    assert text.startswith("WARNING")
    assert identity.fingerprint(BOB) in text
    assert identity.fingerprint(BOB_NEW) in text
    assert "/" not in text  # the library names no command: the front ends word the hint
    assert "Nothing will be sent to bob" in text
    assert caught.value.check.state is KeyState.CHANGED
    assert known.require_sendable("bob", BOB).state is KeyState.PINNED


def test_the_pinned_key_offered_again_clears_the_changed_state(known: KnownKeys) -> None:
    known.check("bob", BOB)
    known.check("bob", BOB_NEW)
    assert known.check("bob", BOB).state is KeyState.PINNED
    assert known.state("bob") is KeyState.PINNED


def test_accepting_a_changed_key_pins_it_unverified(
    known: KnownKeys, path: Path, clock: Clock
) -> None:
    known.check("bob", BOB)
    known.mark_verified("bob", BOB)
    assert known.check("bob", BOB_NEW).pinned_state is KeyState.VERIFIED
    clock.now += 3600
    known.accept("bob", BOB_NEW)
    assert known.state("bob") is KeyState.PINNED
    assert known.pinned("bob") == BOB_NEW
    assert known.may_send("bob", BOB_NEW)
    assert not known.may_send("bob", BOB)
    assert known.check("bob", BOB_NEW).state is KeyState.PINNED
    entry = KnownKeys(path).entry("bob")
    assert entry is not None
    assert entry.key == BOB_NEW
    assert entry.state is KeyState.PINNED
    assert entry.first_seen == "2023-11-14T23:13:20Z"
    assert entry.verified_at is None
    # The old key is now the stranger.
    assert known.check("bob", BOB).state is KeyState.CHANGED


def test_accepting_the_pinned_key_keeps_it_verified(known: KnownKeys) -> None:
    known.check("bob", BOB)
    known.mark_verified("bob", BOB)
    known.accept("bob", BOB)
    assert known.state("bob") is KeyState.VERIFIED


def test_a_verified_key_that_changes_says_so_in_the_warning(known: KnownKeys) -> None:
    known.check("bob", BOB)
    known.mark_verified("bob", BOB)
    assert "You had verified the old key" in known.check("bob", BOB_NEW).warning()


# -- verification ---------------------------------------------------------------------------------


def test_mark_verified_survives_a_reload(known: KnownKeys, path: Path, clock: Clock) -> None:
    known.check("bob", BOB)
    clock.now += 60
    known.mark_verified("bob", BOB)
    assert known.state("bob") is KeyState.VERIFIED
    assert known.check("bob", BOB).state is KeyState.VERIFIED
    reloaded = KnownKeys(path)
    assert reloaded.state("bob") is KeyState.VERIFIED
    entry = reloaded.entry("bob")
    assert entry is not None
    assert entry.verified_at == "2023-11-14T22:14:20Z"
    assert entry.first_seen == "2023-11-14T22:13:20Z"


def test_mark_verified_refuses_a_key_that_is_not_pinned(known: KnownKeys, path: Path) -> None:
    known.check("bob", BOB)
    with pytest.raises(NotPinned, match="accept the new key") as caught:
        known.mark_verified("bob", BOB_NEW)
    assert identity.fingerprint(BOB_NEW) in str(caught.value)
    assert known.state("bob") is KeyState.PINNED
    assert KnownKeys(path).state("bob") is KeyState.PINNED


def test_mark_verified_refuses_an_unknown_name(known: KnownKeys) -> None:
    with pytest.raises(NotPinned, match="no pinned key"):
        known.mark_verified("dave", BOB)


# -- bad input and bad files ----------------------------------------------------------------------


@pytest.mark.parametrize("key", [b"", bytes(31), bytes(33), "not bytes"])
def test_a_malformed_offered_key_is_refused(known: KnownKeys, key: object) -> None:
    with pytest.raises(InvalidContact):
        known.check("bob", key)  # type: ignore[arg-type]
    assert known.pinned("bob") is None


@pytest.mark.parametrize("name", ["", "Bob", "bob smith", "x" * 33])
def test_a_malformed_name_is_refused(known: KnownKeys, name: str) -> None:
    with pytest.raises(InvalidContact):
        known.check(name, BOB)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_a_file_others_can_open_is_refused(known: KnownKeys, path: Path, mode: int) -> None:
    known.check("bob", BOB)
    os.chmod(path, mode)
    with pytest.raises(KnownKeysError) as caught:
        KnownKeys(path)
    text = str(caught.value)
    assert str(path) in text
    assert f"{mode:04o}" in text
    assert f"chmod 600 {path}" in text


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[]", "keys"),
        (b'{"version": 1}', "keys"),
        (b'{"version": 2, "keys": {}}', "version"),
        (b'{"version": true, "keys": {}}', "version"),
        (b'{"version": 1, "keys": {"Bob!": {}}}', "user name"),
        (b'{"version": 1, "keys": {"bob": []}}', "bob"),
        (b'{"version": 1, "keys": {"bob": {"key": "AAAA", "state": "pinned"}}}', "key"),
        (b'{"version": 1, "keys": {"bob": {"key": 5, "state": "pinned"}}}', "key"),
    ],
)
def test_a_damaged_file_is_refused_with_a_clear_error(path: Path, content: bytes, why: str) -> None:
    path.write_bytes(content)
    os.chmod(path, 0o600)
    with pytest.raises(KnownKeysError, match="damaged") as caught:
        KnownKeys(path)
    assert why in str(caught.value)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize(
    "change",
    [
        {"key": "not base64!"},
        {"key": "AAAA"},
        {"state": "new"},
        {"state": "changed"},
        {"state": "verified"},  # verified without a verified_at time
        {"verified_at": "2023-11-14T22:13:20Z"},  # a time without the verified state
        {"first_seen": "yesterday"},
        {"first_seen": None},
        {"verified_at": 5},
    ],
)
def test_a_damaged_entry_is_refused(known: KnownKeys, path: Path, change: dict) -> None:
    known.check("bob", BOB)
    data = on_disk(path)
    data["keys"]["bob"].update(change)
    path.write_text(json.dumps(data))
    with pytest.raises(KnownKeysError, match="damaged"):
        KnownKeys(path)


def test_a_pin_that_cannot_be_saved_is_not_kept(tmp_path: Path) -> None:
    known = KnownKeys(tmp_path / "missing-dir" / "alice.known-keys.json")
    with pytest.raises(KnownKeysError, match="cannot save"):
        known.check("bob", BOB)
    assert known.pinned("bob") is None
    assert known.state("bob") is None


# -- safety numbers -------------------------------------------------------------------------------

SAFETY_NUMBER_RE = re.compile(r"^(\d{5} ){11}\d{5}$")
# alice and bob with the seeds 01..01 and 02..02: pins the construction against accidental change.
KNOWN_SAFETY_NUMBER = "30357 33553 89906 39648 59865 54465 88830 68665 95641 02635 63970 92137"


def test_the_safety_number_is_the_same_on_both_sides() -> None:
    mine = safety_number("alice", ALICE, "bob", BOB)
    theirs = safety_number("bob", BOB, "alice", ALICE)
    assert mine == theirs
    assert SAFETY_NUMBER_RE.fullmatch(mine)


def test_the_safety_number_changes_when_either_key_or_name_changes() -> None:
    base = safety_number("alice", ALICE, "bob", BOB)
    assert safety_number("alice", ALICE, "bob", BOB_NEW) != base
    assert safety_number("alice", CAROL, "bob", BOB) != base
    assert safety_number("alice", ALICE, "carol", BOB) != base

    # alice's half (from her key and name) is the same whoever she compares with.
    def halves(number: str) -> set[str]:
        digits = number.replace(" ", "")
        return {digits[:30], digits[30:]}

    assert len(halves(base) & halves(safety_number("alice", ALICE, "carol", CAROL))) == 1


def test_the_safety_number_for_fixed_keys_is_known() -> None:
    assert safety_number("alice", ALICE, "bob", BOB) == KNOWN_SAFETY_NUMBER


def test_the_safety_number_follows_its_documented_construction() -> None:
    def half(name: str, key: bytes) -> str:
        digest = hashlib.sha512(b"securechat/safety-number/v1" + key + name.encode()).digest()
        for _ in range(5200):
            digest = hashlib.sha512(digest + key).digest()
        chunks = [digest[i : i + 5] for i in range(0, 30, 5)]
        return "".join(str(int.from_bytes(chunk, "big") % 100000).zfill(5) for chunk in chunks)

    digits = "".join(sorted([half("alice", ALICE), half("bob", BOB)]))
    expected = " ".join(digits[i : i + 5] for i in range(0, 60, 5))
    assert safety_number("alice", ALICE, "bob", BOB) == expected


@pytest.mark.parametrize(
    ("name", "key"), [("Alice", ALICE), ("alice", bytes(31)), ("alice", b"x" * 33)]
)
def test_the_safety_number_refuses_bad_input(name: str, key: bytes) -> None:
    with pytest.raises(InvalidContact):
        safety_number(name, key, "bob", BOB)


def test_a_user_can_compare_with_themselves() -> None:
    assert SAFETY_NUMBER_RE.fullmatch(safety_number("alice", ALICE, "alice", ALICE))


def test_trust_errors_are_securechat_errors() -> None:
    from securechat.errors import SecureChatError

    for error in (trust.TrustError, InvalidContact, KnownKeysError, KeyChanged, NotPinned):
        assert issubclass(error, SecureChatError)


# -- what /verify showed, and which key /trust may mark -------------------------------------------


def shown_for(known: KnownKeys, offered: bytes) -> trust.Verification:
    return trust.Verification.of(known.check("bob", offered), "alice", ALICE)


def first_group(key: bytes) -> str:
    return identity.fingerprint(key).split()[0]


def test_verify_computes_over_the_pinned_key_and_shows_an_offered_one_beside_it(
    known: KnownKeys,
) -> None:
    known.check("bob", BOB)
    same = shown_for(known, BOB)
    assert (same.pinned_key, same.pinned_number) == (BOB, safety_number("alice", ALICE, "bob", BOB))
    assert (same.offered_key, same.offered_number, same.offered_fingerprint) == (None, None, None)
    changed = shown_for(known, BOB_NEW)
    assert changed.pinned_key == BOB
    assert changed.pinned_number == safety_number("alice", ALICE, "bob", BOB)
    assert changed.pinned_state is KeyState.PINNED
    assert changed.offered_key == BOB_NEW
    assert changed.offered_number == safety_number("alice", ALICE, "bob", BOB_NEW)
    assert changed.offered_fingerprint == identity.fingerprint(BOB_NEW)


def test_trust_without_a_name_takes_the_pinned_key_only_when_no_other_was_offered(
    known: KnownKeys,
) -> None:
    known.check("bob", BOB)
    assert shown_for(known, BOB).choose(None) == BOB
    changed = shown_for(known, BOB_NEW)
    with pytest.raises(trust.KeyNotNamed) as caught:
        changed.choose(None)
    new, old = first_group(BOB_NEW), first_group(BOB)
    assert str(caught.value) == (
        "the server now offers bob a different key than the pinned one; say which key's safety "
        f"number bob confirmed by naming it: the new key {new} or the pinned key {old}"
    )
    assert caught.value.choices == [("the new key", new), ("the pinned key", old)]


def test_a_key_is_named_by_the_start_of_its_fingerprint(known: KnownKeys) -> None:
    known.check("bob", BOB)
    changed = shown_for(known, BOB_NEW)
    fp_new = identity.fingerprint(BOB_NEW)
    assert changed.choose(first_group(BOB_NEW)) == BOB_NEW
    assert changed.choose(first_group(BOB_NEW).upper()) == BOB_NEW
    assert changed.choose(fp_new[:9]) == BOB_NEW  # two groups, with the space
    assert changed.choose(fp_new.replace(" ", "")) == BOB_NEW  # all of it, no spaces
    assert changed.choose(first_group(BOB)) == BOB  # the pinned key can be named too


@pytest.mark.parametrize(
    ("named", "why"),
    [
        ("ffff ffff", "'ffff ffff' starts no key shown for bob; type "),
        ("69", "'69' is not the start of a key fingerprint: name the key by the first group"),
        ("xyz!", "'xyz!' is not the start of a key fingerprint"),
    ],
)
def test_a_name_that_is_no_key_shown_is_refused_with_what_to_type(
    known: KnownKeys, named: str, why: str
) -> None:
    known.check("bob", BOB)
    changed = shown_for(known, BOB_NEW)
    assert not identity.fingerprint(BOB_NEW).startswith("ffff ffff")
    with pytest.raises(trust.KeyNotNamed) as caught:
        changed.choose(named)
    assert str(caught.value).startswith(why)
    assert str(caught.value).endswith(
        f"the new key {first_group(BOB_NEW)} or the pinned key {first_group(BOB)}"
    )


def keys_whose_fingerprints_start_alike() -> tuple[bytes, bytes]:
    """Two keys whose fingerprints share the first group, as an attacker would grind out (a
    birthday search over 16 bits: a few hundred keys)."""
    seen: dict[str, bytes] = {}
    for n in range(100_000):
        key = bytes(
            nacl.signing.SigningKey(hashlib.sha256(n.to_bytes(4, "big")).digest()).verify_key
        )
        group = first_group(key)
        if group in seen:
            return seen[group], key
        seen[group] = key
    raise AssertionError("no two keys start alike")


def test_a_name_that_starts_both_keys_is_refused_and_the_longer_start_named(
    tmp_path: Path,
) -> None:
    pinned, offered = keys_whose_fingerprints_start_alike()
    known = KnownKeys(known_keys_path(tmp_path / "alice.key"))
    known.check("bob", pinned)
    changed = shown_for(known, offered)
    group = first_group(offered)
    two_new = " ".join(identity.fingerprint(offered).split()[:2])
    two_old = " ".join(identity.fingerprint(pinned).split()[:2])
    assert changed.choices() == [("the new key", two_new), ("the pinned key", two_old)]
    with pytest.raises(trust.KeyNotNamed) as caught:
        changed.choose(group)
    assert str(caught.value) == (
        f"'{group}' starts both keys shown for bob; type the new key {two_new} or the pinned "
        f"key {two_old}"
    )
    assert changed.choose(two_new) == offered
    assert changed.choose(two_old) == pinned


def test_marking_a_shown_key_verified(known: KnownKeys, path: Path, clock: Clock) -> None:
    known.check("bob", BOB)
    clock.now += 60
    entry = known.mark_shown_verified(shown_for(known, BOB), BOB)
    assert (entry.key, entry.state, entry.verified_at) == (
        BOB,
        KeyState.VERIFIED,
        "2023-11-14T22:14:20Z",
    )
    # A changed key named by the user replaces the pin, verified, in one step.
    changed = shown_for(known, BOB_NEW)
    clock.now += 60
    entry = known.mark_shown_verified(changed, BOB_NEW)
    assert (entry.key, entry.state) == (BOB_NEW, KeyState.VERIFIED)
    assert entry.first_seen == entry.verified_at == "2023-11-14T22:15:20Z"
    assert KnownKeys(path).entry("bob") == entry


def test_a_shown_key_is_not_marked_once_the_pin_moved_on(known: KnownKeys, path: Path) -> None:
    known.check("bob", BOB)
    shown = shown_for(known, BOB)
    known.accept("bob", BOB_NEW)  # the pin changed after the number was shown
    with pytest.raises(NotPinned) as caught:
        known.mark_shown_verified(shown, BOB)
    assert str(caught.value) == (
        "the key pinned for bob changed since its safety number was shown; compare the safety "
        "number again"
    )
    with pytest.raises(NotPinned, match="was not shown"):
        known.mark_shown_verified(shown_for(known, BOB_NEW), CAROL)
    assert KnownKeys(path).entry("bob").state is KeyState.PINNED


def test_the_changed_key_warning_says_how_to_name_the_new_key(known: KnownKeys) -> None:
    known.check("bob", BOB)
    check = known.check("bob", BOB_NEW)
    assert check.new_key_start == first_group(BOB_NEW)
    assert (
        f"accept the new key, whose fingerprint starts {first_group(BOB_NEW)}. " in check.warning()
    )
    # The terminal (and the GUI) word the same warning with the commands to type.
    assert hints.key_changed(check) == (
        "WARNING: the key for bob has changed.\n"
        f"  pinned key: {identity.fingerprint(BOB)}\n"
        f"  offered now: {identity.fingerprint(BOB_NEW)}\n"
        "Nothing will be sent to bob until you compare safety numbers with them outside this chat "
        f"(/verify bob) and accept the new key by naming it (/trust bob {first_group(BOB_NEW)}). "
        "If bob did not make a new key, someone may be trying to read your messages."
    )
