"""Message ids and the replay guard that direct messages (securechat/e2e) and rooms share.

Version 1's NaCl Box envelopes are gone: DMs are Olm envelopes between devices now (protocol
version 2, securechat/e2e/envelope.py). What stays is what those records reuse: the form of a
message id, the window of times a DM may carry, and ReplayGuard, which remembers the ids
accepted from each sender so that a replayed copy is refused, across restarts once exported.
No I/O here, and no plaintext or key material in any error message.
"""

from __future__ import annotations

import base64
import heapq
import secrets
import time
from dataclasses import dataclass
from typing import Any, TypeGuard

from securechat.errors import SecureChatError

# The same form the wire protocol accepts for a DM's id (protocol.py), so any id relays.
MESSAGE_ID_MIN, MESSAGE_ID_MAX = 8, 64
_TS_MAX = 2**53  # JSON-safe integers only; other peers may parse numbers as doubles

DAY_MS = 24 * 60 * 60 * 1000
MAX_AGE_MS_DEFAULT = 7 * DAY_MS  # offline DMs are queued on the server; a week covers a holiday
MAX_SKEW_MS_DEFAULT = 5 * 60 * 1000  # clocks of ordinary machines agree to well within this
MAX_REMEMBERED_DEFAULT = 50_000  # about 15 MB; far more DMs than one person gets in a week


# -- errors ---------------------------------------------------------------------------------------


class SealError(SecureChatError):
    """A direct message was refused on opening; never shown as one."""


class ReplayedMessage(SealError):
    """A message id from this sender was seen before: a replayed copy."""


class StaleMessage(SealError):
    """The sealed timestamp is too old, or too far in the future, to be accepted."""


class ReplayStateError(SealError):
    """The saved replay record is damaged and cannot be loaded."""


@dataclass(frozen=True)
class OpenedDM:
    """A DM that opened and passed the name checks (replays are ReplayGuard's job)."""

    sender: str
    recipient: str
    message_id: str
    ts: int  # milliseconds since the Unix epoch, as the sender's clock saw it
    body: str


def new_message_id() -> str:
    """A fresh random message id: 16 random bytes, URL-safe base64 without padding (22 chars)."""
    return base64.urlsafe_b64encode(secrets.token_bytes(16)).rstrip(b"=").decode("ascii")


def _clock_ms() -> int:
    return time.time_ns() // 1_000_000


def _span(ms: int) -> str:
    for unit, size in (("days", DAY_MS), ("hours", 3_600_000), ("minutes", 60_000)):
        if ms >= size and ms % size == 0:
            return f"{ms // size} {unit}"
    return f"{ms / 1000:g} seconds"


class ReplayGuard:
    """Refuses opened DMs that were seen before or whose timestamp is outside the window.

    A DM is accepted when its sealed timestamp is no older than `max_age_ms` (DMs wait on the
    server for offline users, so a week by default) and no more than `max_skew_ms` ahead of our
    clock (5 minutes), and when its (sender, id) pair is new. Accepting records the pair.

    Memory stays bounded: a pair is forgotten once its timestamp falls out of the window, since it
    would be refused as stale anyway. The window's lower edge (`horizon`) only ever moves forward,
    so setting the clock back cannot re-admit a forgotten message. At most `max_remembered` pairs
    are kept; past that the oldest is forgotten and its sender's floor rises to its timestamp, so
    nothing at or below the floor from that sender is accepted again (a flood costs the flooder,
    since one sender's DMs arrive in order).

    Only check DMs that open_sealed accepted: an unauthenticated id must not be remembered.
    Not thread-safe: use it from the one thread that opens DMs.
    """

    def __init__(
        self,
        *,
        max_age_ms: int = MAX_AGE_MS_DEFAULT,
        max_skew_ms: int = MAX_SKEW_MS_DEFAULT,
        max_remembered: int = MAX_REMEMBERED_DEFAULT,
    ) -> None:
        if max_age_ms <= 0 or max_skew_ms < 0 or max_remembered <= 0:
            raise ValueError("max_age_ms and max_remembered must be positive, max_skew_ms >= 0")
        self.max_age_ms = max_age_ms
        self.max_skew_ms = max_skew_ms
        self.max_remembered = max_remembered
        self._horizon = 0  # timestamps below this are stale; only moves forward
        self._seen: dict[tuple[str, str], int] = {}
        self._by_age: list[tuple[int, str, str]] = []  # a heap of (ts, sender, id) in _seen
        self._floor: dict[str, int] = {}  # sender -> highest forgotten ts before its time

    def __len__(self) -> int:
        return len(self._seen)

    def seen(self, sender: str, message_id: str) -> bool:
        """Whether a DM with this id from `sender` was accepted (and is still remembered)."""
        return (sender, message_id) in self._seen

    def check(self, opened: OpenedDM, now_ms: int | None = None) -> None:
        """Accept and remember `opened`, or raise ReplayedMessage / StaleMessage."""
        now = _clock_ms() if now_ms is None else now_ms
        self._advance(now - self.max_age_ms)
        sender, ts = opened.sender, opened.ts
        if (sender, opened.message_id) in self._seen:
            raise ReplayedMessage(
                f"a direct message from {sender} arrived again; the copy was dropped. The server "
                "may be replaying old messages"
            )
        if ts < self._horizon or ts <= self._floor.get(sender, -1):
            raise StaleMessage(
                f"a direct message from {sender} is older than {_span(self.max_age_ms)} "
                "(or older than messages already forgotten); it was dropped as a possible replay"
            )
        if ts > now + self.max_skew_ms:
            raise StaleMessage(
                f"a direct message from {sender} is dated more than "
                f"{_span(self.max_skew_ms)} in the future; it was dropped. Check that "
                f"your clock and {sender}'s are right"
            )
        self._remember(sender, opened.message_id, ts)

    def _remember(self, sender: str, message_id: str, ts: int) -> None:
        self._seen[(sender, message_id)] = ts
        heapq.heappush(self._by_age, (ts, sender, message_id))
        while len(self._seen) > self.max_remembered:
            old_ts, old_sender, old_id = heapq.heappop(self._by_age)
            del self._seen[(old_sender, old_id)]
            self._floor[old_sender] = max(self._floor.get(old_sender, -1), old_ts)

    def _advance(self, horizon: int) -> None:
        if horizon <= self._horizon:
            return
        self._horizon = horizon
        dropped = False
        while self._by_age and self._by_age[0][0] < horizon:
            _, sender, message_id = heapq.heappop(self._by_age)
            del self._seen[(sender, message_id)]
            dropped = True
        if dropped and self._floor:
            # A floor below the horizon says nothing the horizon does not.
            self._floor = {s: f for s, f in self._floor.items() if f >= horizon}

    def export(self) -> dict[str, Any]:
        """Plain JSON-able state for persisting; ReplayGuard.load reads it back."""
        return {
            "version": 1,
            "horizon": self._horizon,
            "seen": sorted([sender, mid, ts] for (sender, mid), ts in self._seen.items()),
            "floors": dict(sorted(self._floor.items())),
        }

    @classmethod
    def load(
        cls,
        data: Any,
        *,
        max_age_ms: int = MAX_AGE_MS_DEFAULT,
        max_skew_ms: int = MAX_SKEW_MS_DEFAULT,
        max_remembered: int = MAX_REMEMBERED_DEFAULT,
    ) -> ReplayGuard:
        """A guard with the state `export` gave; ReplayStateError when the data is damaged."""
        guard = cls(max_age_ms=max_age_ms, max_skew_ms=max_skew_ms, max_remembered=max_remembered)

        def is_int(value: Any) -> TypeGuard[int]:
            return isinstance(value, int) and not isinstance(value, bool)

        damaged = ReplayStateError(
            "the saved record of direct messages already seen is damaged; delete it to start "
            "afresh (old messages may then be shown again)"
        )
        if not isinstance(data, dict) or data.get("version") != 1:
            raise damaged
        horizon, seen, floors = data.get("horizon"), data.get("seen"), data.get("floors")
        if not is_int(horizon) or not isinstance(seen, list) or not isinstance(floors, dict):
            raise damaged
        for item in seen:
            if not (
                isinstance(item, list)
                and len(item) == 3
                and isinstance(item[0], str)
                and isinstance(item[1], str)
                and is_int(item[2])
            ):
                raise damaged
        if not all(isinstance(s, str) and is_int(f) for s, f in floors.items()):
            raise damaged
        guard._floor = dict(floors)
        for sender, message_id, ts in seen:
            if (sender, message_id) not in guard._seen:
                guard._remember(sender, message_id, ts)
        guard._advance(horizon)
        guard._floor = {s: f for s, f in guard._floor.items() if f >= guard._horizon}
        return guard
