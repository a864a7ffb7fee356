"""Pinned public keys (trust on first use), key states, and safety numbers.

The server hands out everyone's public keys, so a malicious server could hand out its own and read
every DM. As SSH and Signal do, the first key seen for a name is pinned in a known-keys file beside
our key file; a different key later is a loud warning, and nothing goes to that name until the
user compares safety numbers out of band and accepts the new key. This module never touches the
network, and never logs keys; fingerprints are the only key material in any message.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import json
import os
import re
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeGuard

from securechat.errors import SecureChatError
from securechat.files import write_atomically
from securechat.identity import fingerprint
from securechat.protocol import valid_name

FILE_VERSION = 1
KEY_BYTES = 32
MAX_FILE_BYTES = 4 * 1024 * 1024  # thousands of contacts fit in a few hundred KB

SAFETY_NUMBER_CONTEXT = b"securechat/safety-number/v1"
SAFETY_NUMBER_ITERATIONS = 5200  # as Signal: makes finding a key with a matching half costlier


# -- errors ---------------------------------------------------------------------------------------


class TrustError(SecureChatError):
    """A problem with pinned keys or with a key the server offered."""


class InvalidContact(TrustError):
    """A user name or public key is malformed (the server sent something that is not a key)."""


class KnownKeysError(TrustError):
    """The known-keys file is unreadable, too open, damaged, or cannot be written."""


class KeyChanged(TrustError):
    """The key offered for a contact differs from the pinned one; nothing is sent to them."""

    def __init__(self, check: KeyCheck) -> None:
        super().__init__(check.warning())
        self.check = check


class NotPinned(TrustError):
    """A key cannot be marked verified because it is not the key pinned for that name."""


class KeyNotNamed(TrustError):
    """Which shown key to trust is unclear: a changed key is offered and the user named none, or
    what they named starts neither key, or both. `choices` pairs each key ("the new key", "the
    pinned key") with the shortest fingerprint start that names it alone; front ends word how
    to type it."""

    def __init__(self, message: str, choices: list[tuple[str, str]]) -> None:
        super().__init__(message)
        self.choices = choices


# -- states ---------------------------------------------------------------------------------------


class KeyState(enum.Enum):
    NEW = "new"  # first sight: pinned just now
    PINNED = "pinned"  # the key we pinned earlier, not yet compared out of band
    VERIFIED = "verified"  # the pinned key, and the user compared safety numbers
    CHANGED = "changed"  # the server offers a different key than the pinned one


# Only these two are ever stored; NEW and CHANGED describe one check.
_STORED_STATES = frozenset({KeyState.PINNED, KeyState.VERIFIED})


@dataclass(frozen=True)
class PinnedKey:
    """One entry of the known-keys file."""

    key: bytes
    state: KeyState  # PINNED or VERIFIED
    first_seen: str  # ISO 8601 UTC, when this key was pinned
    verified_at: str | None  # ISO 8601 UTC, when the user marked it verified


@dataclass(frozen=True)
class KeyCheck:
    """What check() found for the key the server offered for `name`."""

    name: str
    state: KeyState
    key: bytes  # the key offered
    pinned_key: bytes | None  # the key pinned after the check (the old one when CHANGED)
    fingerprint: str
    pinned_fingerprint: str | None
    pinned_state: KeyState | None = None  # PINNED or VERIFIED: how far the pinned key was trusted

    @property
    def may_send(self) -> bool:
        return self.state is not KeyState.CHANGED

    @property
    def new_key_start(self) -> str:
        """For a changed key: the shortest fingerprint start that names the offered key apart
        from the pinned one (what the user types to accept it)."""
        assert self.pinned_key is not None  # a CHANGED check always has the old key
        return distinct_starts(self.pinned_key, self.key)[1]

    def warning(self, action: str | None = None) -> str:
        """The loud warning to show for a changed key (an empty string for any other state).

        `action` says what the user must do to accept the new key, in a front end's own words
        (its commands); without it, the warning names no command."""
        if self.state is not KeyState.CHANGED:
            return ""
        was = " You had verified the old key." if self.pinned_state is KeyState.VERIFIED else ""
        action = action or (
            "compare safety numbers with them outside this chat and accept the new key, whose "
            f"fingerprint starts {self.new_key_start}"
        )
        return (
            f"WARNING: the key for {self.name} has changed.{was}\n"
            f"  pinned key: {self.pinned_fingerprint}\n"
            f"  offered now: {self.fingerprint}\n"
            f"Nothing will be sent to {self.name} until you {action}. "
            f"If {self.name} did not make a new key, someone may be trying to read your messages."
        )


# -- what /verify showed --------------------------------------------------------------------------


def distinct_starts(a: bytes, b: bytes) -> tuple[str, str]:
    """The shortest whole-group starts of the fingerprints of `a` and `b` that tell them apart
    (the first group, unless an attacker ground out a key whose fingerprint begins alike)."""
    groups_a, groups_b = fingerprint(a).split(), fingerprint(b).split()
    for n in range(1, len(groups_a) + 1):
        if groups_a[:n] != groups_b[:n]:
            return " ".join(groups_a[:n]), " ".join(groups_b[:n])
    return fingerprint(a), fingerprint(b)  # the same key: no start tells them apart


@dataclass(frozen=True)
class Verification:
    """What /verify showed for one contact: the pinned key and the safety number over it, and
    the key the server offered instead (with its own number) when that differs. Trust goes only
    to one of these keys, so no later server answer can change which key is marked."""

    name: str
    pinned_key: bytes
    pinned_state: KeyState  # NEW, PINNED or VERIFIED: how far the pinned key was trusted
    pinned_number: str
    offered_key: bytes | None = None  # None: the server offers the pinned key
    offered_number: str | None = None

    @classmethod
    def of(cls, check: KeyCheck, my_name: str, my_key: bytes) -> Verification:
        """The safety numbers for a key check: over the pinned key always, over the offered key
        too when the server offers another one."""
        if check.state is not KeyState.CHANGED:
            number = safety_number(my_name, my_key, check.name, check.key)
            return cls(check.name, check.key, check.state, number)
        assert check.pinned_key is not None and check.pinned_state is not None
        return cls(
            check.name,
            check.pinned_key,
            check.pinned_state,
            safety_number(my_name, my_key, check.name, check.pinned_key),
            check.key,
            safety_number(my_name, my_key, check.name, check.key),
        )

    @property
    def pinned_fingerprint(self) -> str:
        return fingerprint(self.pinned_key)

    @property
    def offered_fingerprint(self) -> str | None:
        return fingerprint(self.offered_key) if self.offered_key is not None else None

    def choices(self) -> list[tuple[str, str]]:
        """Each key shown, with the shortest fingerprint start that names it alone."""
        if self.offered_key is None:
            return [("the pinned key", self.pinned_fingerprint.split()[0])]
        pinned, offered = distinct_starts(self.pinned_key, self.offered_key)
        return [("the new key", offered), ("the pinned key", pinned)]

    def choose(self, named: str | None) -> bytes:
        """The key the user means: `named` is the start of its fingerprint (one group or more,
        spaces optional). Without a name, only the pinned key, and only when the server offered
        no other. Raises KeyNotNamed when that does not pick exactly one key shown."""
        name, choices = self.name, self.choices()
        options = " or ".join(f"{label} {start}" for label, start in choices)
        if named is None:
            if self.offered_key is None:
                return self.pinned_key
            raise KeyNotNamed(
                f"the server now offers {name} a different key than the pinned one; say which "
                f"key's safety number {name} confirmed by naming it: {options}",
                choices,
            )
        wanted = "".join(named.split()).lower()
        if not re.fullmatch(r"[0-9a-f]{4,64}", wanted):
            raise KeyNotNamed(
                f"{named!r:.40} is not the start of a key fingerprint: name the key by the first "
                f"group (4 hex digits) of its fingerprint or more: {options}",
                choices,
            )
        keys = [self.pinned_key] + ([self.offered_key] if self.offered_key is not None else [])
        matches = [k for k in keys if fingerprint(k).replace(" ", "").startswith(wanted)]
        if len(matches) == 1:
            return matches[0]
        why = "starts both keys shown" if matches else "starts no key shown"
        raise KeyNotNamed(f"{named!r:.40} {why} for {name}; type {options}", choices)


# -- the known-keys file --------------------------------------------------------------------------


def known_keys_path(key_path: Path) -> Path:
    """The known-keys file beside an identity's key file: alice.key -> alice.known-keys.json."""
    key_path = Path(key_path)
    return key_path.with_name(f"{key_path.stem or key_path.name}.known-keys.json")


def _utc_now(clock: Callable[[], float]) -> str:
    return datetime.fromtimestamp(clock(), tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _check_name(name: Any) -> str:
    why = valid_name(name) if isinstance(name, str) else "must be text"
    if why:
        raise InvalidContact(f"not a valid user name: it {why}")
    return str(name)


def _check_key(name: str, key: Any) -> bytes:
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise InvalidContact(
            f"the key offered for {name} is not a {KEY_BYTES}-byte public key; it was ignored"
        )
    return key


def _same_key(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


class KnownKeys:
    """The pinned keys of one identity, in a JSON file written atomically with mode 0600.

    File format (version 1):

        {"version": 1,
         "keys": {"bob": {"key": base64 of 32 bytes, "state": "pinned" | "verified",
                          "first_seen": "2025-01-31T12:00:00Z", "verified_at": null | "..."}}}

    A file that group or others may read or write is refused, as OpenSSH refuses an open key
    file: someone who can change it can swap a pin. Safe to share between the UI and I/O threads.
    Two clients running on the same identity at once may overwrite each other's new pins.
    """

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self._clock = clock
        self._lock = threading.RLock()
        self._entries: dict[str, PinnedKey] = self._load()
        # Different keys the server offered this session, so state() can say CHANGED.
        self._changed: dict[str, bytes] = {}

    # -- reading ----------------------------------------------------------------------------------

    def _damaged(self, why: str) -> KnownKeysError:
        return KnownKeysError(
            f"the known-keys file {self.path} is damaged ({why}). Restore it from a backup, or "
            "move it aside to start afresh; you will then need to verify everyone's keys again"
        )

    def _load(self) -> dict[str, PinnedKey]:
        flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(self.path, flags)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise KnownKeysError(
                f"cannot read the known-keys file {self.path}: {exc.strerror}"
            ) from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise KnownKeysError(f"the known-keys file {self.path} is not a regular file")
            if os.name == "posix" and info.st_mode & 0o077:
                raise KnownKeysError(
                    f"the known-keys file {self.path} is open to other users "
                    f"(mode {stat.S_IMODE(info.st_mode):04o}), so someone may have swapped a "
                    f"pinned key. Check it, then run: chmod 600 {self.path}"
                )
            if info.st_size > MAX_FILE_BYTES:
                raise self._damaged(f"larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB")
            with os.fdopen(fd, "rb", closefd=False) as f:
                raw = f.read(MAX_FILE_BYTES + 1)
            if len(raw) > MAX_FILE_BYTES:
                raise self._damaged(f"larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB")
        except OSError as exc:
            raise KnownKeysError(
                f"cannot read the known-keys file {self.path}: {exc.strerror}"
            ) from None
        finally:
            os.close(fd)
        return self._parse(raw)

    def _parse(self, raw: bytes) -> dict[str, PinnedKey]:
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise self._damaged("not valid JSON") from None
        if not isinstance(data, dict) or not isinstance(data.get("keys"), dict):
            raise self._damaged('no "keys" table')
        if data.get("version") != FILE_VERSION or isinstance(data.get("version"), bool):
            raise self._damaged(f"unknown format version {data.get('version')!r:.20}")
        entries: dict[str, PinnedKey] = {}
        for name, item in data["keys"].items():
            if not isinstance(name, str) or valid_name(name):
                raise self._damaged("an entry has an invalid user name")
            entries[name] = self._parse_entry(name, item)
        return entries

    def _parse_entry(self, name: str, item: Any) -> PinnedKey:
        if not isinstance(item, dict):
            raise self._damaged(f"the entry for {name} is not a table")
        text = item.get("key")
        try:
            key = base64.b64decode(text, validate=True) if isinstance(text, str) else b""
        except (binascii.Error, ValueError):
            key = b""
        if len(key) != KEY_BYTES:
            raise self._damaged(f"the key for {name} is not a {KEY_BYTES}-byte base64 key")
        state_value = item.get("state")
        if state_value not in {s.value for s in _STORED_STATES}:
            raise self._damaged(f"the state for {name} is not pinned or verified")
        state = KeyState(state_value)
        first_seen, verified_at = item.get("first_seen"), item.get("verified_at")
        if not self._is_time(first_seen):
            raise self._damaged(f"the first_seen time for {name} is not a time")
        if not (verified_at is None or self._is_time(verified_at)):
            raise self._damaged(f"the verified_at time for {name} is not a time")
        if (state is KeyState.VERIFIED) != (verified_at is not None):
            raise self._damaged(f"the state for {name} does not match its verified_at time")
        return PinnedKey(key=key, state=state, first_seen=first_seen, verified_at=verified_at)

    @staticmethod
    def _is_time(value: Any) -> TypeGuard[str]:
        if not isinstance(value, str):
            return False
        try:
            datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ")
        except ValueError:
            return False
        return True

    # -- writing ----------------------------------------------------------------------------------

    def _save(self, entries: dict[str, PinnedKey]) -> None:
        """Write `entries` atomically: a 0600 temp file beside the target, fsync, then rename."""
        data = {
            "version": FILE_VERSION,
            "keys": {
                name: {
                    "key": base64.b64encode(entry.key).decode("ascii"),
                    "state": entry.state.value,
                    "first_seen": entry.first_seen,
                    "verified_at": entry.verified_at,
                }
                for name, entry in sorted(entries.items())
            },
        }
        raw = (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8")
        try:
            write_atomically(self.path, raw, 0o600)
        except OSError as exc:
            raise KnownKeysError(
                f"cannot save the known-keys file {self.path}: {exc.strerror}; "
                "the key was not pinned"
            ) from None

    def _commit(self, name: str, entry: PinnedKey) -> None:
        entries = dict(self._entries)
        entries[name] = entry
        self._save(entries)  # raises before anything changes in memory
        self._entries = entries
        self._changed.pop(name, None)

    # -- the API ----------------------------------------------------------------------------------

    def check(self, name: str, key: bytes) -> KeyCheck:
        """Compare the key the server offers for `name` with the pinned one.

        First sight pins the key and saves (NEW this once, PINNED afterwards). The pinned key
        gives PINNED or VERIFIED. A different key gives CHANGED and changes nothing on disk.
        """
        name = _check_name(name)
        key = _check_key(name, key)
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                self._commit(name, self._new_entry(key))
                return self._result(name, KeyState.NEW, key, key, KeyState.PINNED)
            if _same_key(entry.key, key):
                self._changed.pop(name, None)
                return self._result(name, entry.state, key, entry.key, entry.state)
            self._changed[name] = key
            return self._result(name, KeyState.CHANGED, key, entry.key, entry.state)

    def require_sendable(self, name: str, key: bytes) -> KeyCheck:
        """check(), raising KeyChanged (whose message is the loud warning) for a changed key."""
        result = self.check(name, key)
        if result.state is KeyState.CHANGED:
            raise KeyChanged(result)
        return result

    def accept(self, name: str, key: bytes) -> None:
        """The user accepted `key` for `name`: pin it (PINNED, not verified) in place of the old."""
        name = _check_name(name)
        key = _check_key(name, key)
        with self._lock:
            entry = self._entries.get(name)
            if entry is not None and _same_key(entry.key, key):
                self._changed.pop(name, None)
                return
            self._commit(name, self._new_entry(key))

    def mark_verified(self, name: str, key: bytes) -> None:
        """The user compared safety numbers: mark `key` VERIFIED. It must be the pinned key."""
        name = _check_name(name)
        key = _check_key(name, key)
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                raise NotPinned(f"{name} has no pinned key yet; look their key up first")
            if not _same_key(entry.key, key):
                raise NotPinned(
                    f"the key {fingerprint(key)} is not the key pinned for {name} "
                    f"({fingerprint(entry.key)}); accept the new key before verifying it"
                )
            if entry.state is KeyState.VERIFIED:
                return
            now = _utc_now(self._clock)
            self._commit(name, replace(entry, state=KeyState.VERIFIED, verified_at=now))

    def mark_shown_verified(self, shown: Verification, key: bytes) -> PinnedKey:
        """The user compared the safety number of `key`, one of the keys `shown` showed: mark it
        VERIFIED (pinning it in place of the old one if it is the offered key). Refused
        (NotPinned) if the pin changed since, so the number compared is the number of the key
        marked."""
        name = _check_name(shown.name)
        key = _check_key(name, key)
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or not _same_key(entry.key, shown.pinned_key):
                raise NotPinned(
                    f"the key pinned for {name} changed since its safety number was shown; "
                    "compare the safety number again"
                )
            if _same_key(entry.key, key):
                if entry.state is not KeyState.VERIFIED:
                    now = _utc_now(self._clock)
                    entry = replace(entry, state=KeyState.VERIFIED, verified_at=now)
                    self._commit(name, entry)
                return entry
            if shown.offered_key is None or not _same_key(shown.offered_key, key):
                raise NotPinned(f"the key {fingerprint(key)} was not shown for {name}")
            now = _utc_now(self._clock)
            entry = PinnedKey(key=key, state=KeyState.VERIFIED, first_seen=now, verified_at=now)
            self._commit(name, entry)
            return entry

    def state(self, name: str) -> KeyState | None:
        """PINNED or VERIFIED; CHANGED if the server offered another key this session; else None."""
        with self._lock:
            if name in self._changed:
                return KeyState.CHANGED
            entry = self._entries.get(name)
            return entry.state if entry else None

    def pinned(self, name: str) -> bytes | None:
        with self._lock:
            entry = self._entries.get(name)
            return entry.key if entry else None

    def entry(self, name: str) -> PinnedKey | None:
        """The whole stored entry (for /whois: first seen, verified at)."""
        with self._lock:
            return self._entries.get(name)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._entries)

    def may_send(self, name: str, key: bytes) -> bool:
        """True only when `key` is the key pinned for `name` (call check() first to pin)."""
        with self._lock:
            entry = self._entries.get(name)
            return (
                entry is not None
                and isinstance(key, bytes)
                and len(key) == KEY_BYTES
                and _same_key(entry.key, key)
            )

    # -- helpers ----------------------------------------------------------------------------------

    def _new_entry(self, key: bytes) -> PinnedKey:
        return PinnedKey(
            key=key, state=KeyState.PINNED, first_seen=_utc_now(self._clock), verified_at=None
        )

    @staticmethod
    def _result(
        name: str,
        state: KeyState,
        key: bytes,
        pinned_key: bytes,
        pinned_state: KeyState,
    ) -> KeyCheck:
        return KeyCheck(
            name=name,
            state=state,
            key=key,
            pinned_key=pinned_key,
            fingerprint=fingerprint(key),
            pinned_fingerprint=fingerprint(pinned_key),
            pinned_state=pinned_state,
        )


# -- safety numbers -------------------------------------------------------------------------------


def _safety_half(name: str, key: bytes) -> str:
    digest = hashlib.sha512(SAFETY_NUMBER_CONTEXT + key + name.encode("utf-8")).digest()
    for _ in range(SAFETY_NUMBER_ITERATIONS):
        digest = hashlib.sha512(digest + key).digest()
    # 30 digits from the first 30 bytes: each 5-byte chunk, big-endian, modulo 100000.
    return "".join(
        f"{int.from_bytes(digest[i : i + 5], 'big') % 100_000:05d}" for i in range(0, 30, 5)
    )


def safety_number(my_name: str, my_key: bytes, their_name: str, their_key: bytes) -> str:
    """The safety number two users compare out of band; the same on both sides.

    Construction (after Signal's numeric fingerprint, with our own domain string):
    for each party, d = SHA-512("securechat/safety-number/v1" || key || name as UTF-8), then 5200
    times d = SHA-512(d || key); the first 30 bytes of d, as six 5-byte big-endian numbers each
    taken modulo 100000 and written as 5 digits, give that party's 30 digits. The two 30-digit
    halves are sorted and concatenated (so the order of the parties does not matter) and shown as
    12 groups of 5 digits. The context string and key are fixed-length, so the name is
    unambiguous; binding the name means a key moved to another name gives another number.
    Changing either key changes the number.
    """
    halves = []
    for name, key in ((my_name, my_key), (their_name, their_key)):
        name = _check_name(name)
        halves.append(_safety_half(name, _check_key(name, key)))
    digits = "".join(sorted(halves))
    return " ".join(digits[i : i + 5] for i in range(0, len(digits), 5))
