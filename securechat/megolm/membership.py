"""Who gets a room's keys: the membership rule, trust checks per device, and member marks.

The server controls room membership, so it could add a member or a device and be sent the keys.
Rules, all of which must hold for a device to get keys:
  1. its user was shown joined in the room's timeline by this client (a `joined` event, or the
     member list displayed at our own join) and has not been shown leaving; a name that only the
     server's member list holds is a ghost: no keys, and a warning;
  2. if the server sent a member list, the user is still on it (gone from it counts as left);
  3. the user's identity key is pinned and has not changed (until the user accepts the new key);
     in a strict room it must also be verified;
  4. the device record is signed by exactly that pinned identity key, and is not revoked.
"""

from __future__ import annotations

import enum
import hmac
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone

from securechat.megolm.port import DeviceInfo, DeviceRef, OlmPort
from securechat.trust import KeyState, KnownKeys

NEW_FOR_S = 24 * 3600.0  # a pin younger than this is marked "new"


class MemberMark(enum.Enum):
    VERIFIED = "verified"  # safety number or emoji compared
    PINNED = "pinned"  # the key pinned earlier, not compared
    NEW = "new"  # pinned within the last day, or not pinned yet
    CHANGED = "changed"  # the server offers another key than the pinned one: no keys


class RoomMembership:
    """The members one room's timeline showed, and the server's list. One owner thread."""

    def __init__(self, room: str) -> None:
        self.room = room
        self._shown: set[str] = set()
        self._server: frozenset[str] | None = None
        self.strict = False

    def shown_joined(self, user: str) -> None:
        """The timeline displayed `user` joining (call only after it was displayed)."""
        self._shown.add(user)

    def shown_left(self, user: str) -> None:
        self._shown.discard(user)

    def server_members(self, users: Iterable[str]) -> None:
        """The member list the server sent for the room."""
        self._server = frozenset(users)

    def key_members(self) -> frozenset[str]:
        """Rules 1 and 2: the users whose devices may get keys."""
        if self._server is None:
            return frozenset(self._shown)
        return frozenset(self._shown & self._server)

    def ghosts(self) -> frozenset[str]:
        """Users the server lists without a `joined` event this client displayed."""
        return (self._server or frozenset()) - self._shown

    def warnings(self) -> tuple[str, ...]:
        return tuple(
            f"the server lists {user} in {self.room}, but you never saw {user} join; "
            f"{user} gets no keys and cannot read what you send there"
            for user in sorted(self.ghosts())
        )


@dataclass(frozen=True)
class Exclusion:
    """A member or device that gets no keys, and why (shown in the member list)."""

    user: str
    device_id: str | None
    reason: str


@dataclass(frozen=True)
class RecipientPlan:
    devices: frozenset[DeviceRef]
    excluded: tuple[Exclusion, ...]
    warnings: tuple[str, ...]


@dataclass(frozen=True)
class MemberView:
    user: str
    mark: MemberMark
    gets_keys: bool


class Trust:
    """Pinned identities, ours included, over the Olm layer's device records."""

    def __init__(
        self, me: DeviceRef, my_identity_key: bytes, known: KnownKeys, port: OlmPort
    ) -> None:
        self.me = me
        self._my_key = my_identity_key
        self.known = known
        self.port = port

    def identity_problem(self, user: str, *, strict: bool = False) -> str | None:
        """Rule 3: why `user`'s devices get no keys, or None."""
        if user == self.me.user:
            return None
        state = self.known.state(user)
        if state is None:
            return f"no key is pinned for {user} yet"
        if state is KeyState.CHANGED:
            return f"the identity key of {user} has changed; accept or verify it first"
        if strict and state is not KeyState.VERIFIED:
            return f"{user} is not verified and the room is strict"
        return None

    def pinned_key(self, user: str) -> bytes | None:
        return self._my_key if user == self.me.user else self.known.pinned(user)

    def device_problem(self, user: str, device_id: str) -> str | None:
        """Rules 3 and 4 for one device: None when it is signed by the pinned key, unrevoked."""
        why = self.identity_problem(user)
        if why:
            return why
        for device in self.port.devices(user):
            if device.device_id == device_id and device.user == user:
                return self._signed_problem(device)
        return f"{user} has no device {device_id}"

    def _signed_problem(self, device: DeviceInfo) -> str | None:
        """Rule 4 for a device record the Olm layer listed (rule 3 already checked)."""
        pinned = self.pinned_key(device.user)
        if pinned is None or not hmac.compare_digest(device.identity_key, pinned):
            return (
                f"device {device.device_id} of {device.user} is not signed by "
                f"{device.user}'s pinned key"
            )
        if device.revoked:
            return f"device {device.device_id} of {device.user} was revoked"
        return None

    def plan(self, membership: RoomMembership) -> RecipientPlan:
        """The devices that get this room's keys now, the ones left out and the warnings."""
        devices: set[DeviceRef] = set()
        excluded: list[Exclusion] = []
        warnings = list(membership.warnings())
        for user in sorted(membership.key_members()):
            why = self.identity_problem(user, strict=membership.strict)
            if why:
                excluded.append(Exclusion(user, None, why))
                continue
            for device in self.port.devices(user):
                ref = DeviceRef(user, device.device_id)
                if ref == self.me or device.user != user:
                    continue
                why = self._signed_problem(device)
                if why is None:
                    devices.add(ref)
                    continue
                excluded.append(Exclusion(user, device.device_id, why))
                if not device.revoked:
                    warnings.append(
                        f"{why}; it gets no keys for {membership.room}. Someone (perhaps the "
                        "server) may be trying to read the room"
                    )
        return RecipientPlan(frozenset(devices), tuple(excluded), tuple(warnings))

    def mark(self, user: str, now: float) -> MemberMark:
        if user == self.me.user:
            return MemberMark.VERIFIED
        state = self.known.state(user)
        if state is KeyState.CHANGED:
            return MemberMark.CHANGED
        if state is KeyState.VERIFIED:
            return MemberMark.VERIFIED
        entry = self.known.entry(user)
        if entry is None or now - _parse_time(entry.first_seen) < NEW_FOR_S:
            return MemberMark.NEW
        return MemberMark.PINNED

    def members(self, membership: RoomMembership, clock: Callable[[], float]) -> list[MemberView]:
        """The member list to display: the timeline's members and any ghosts, with marks."""
        now = clock()
        keyed = membership.key_members()
        strict = membership.strict
        return [
            MemberView(
                user, self.mark(user, now), user in keyed and self._would_get_keys(user, strict)
            )
            for user in sorted(keyed | membership.ghosts())
        ]

    def _would_get_keys(self, user: str, strict: bool) -> bool:
        """Rule 3 as a member list shows it: a member seen for the first time gets keys at our
        next send, which fetches their list and pins their key first (not in a strict room,
        where only a verified key does)."""
        if not strict and self.known.state(user) is None:
            return True
        return self.identity_problem(user, strict=strict) is None


def _parse_time(value: str) -> float:
    stamp = datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    return stamp.timestamp()
