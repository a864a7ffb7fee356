"""Live room messages whose key has not come yet, held until it does.

A room key travels as a DM and the message it opens as a room frame; the key can come late (its
sender's Olm session was being set up, a sibling forwards it later). The message was shown as a
marker; once its key comes it is opened and shown again, marked late. Held by (room, session id),
bounded in count and age, so a server sending junk under unknown session ids cannot fill memory.
No I/O and no lock: the caller (EncryptedRooms, under its lock) owns one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from securechat.megolm.envelope import RoomCiphertext

PER_SESSION = 100  # messages held for one session; older ones go first
TOTAL = 1000  # messages held in all
MAX_AGE = 3600.0  # seconds a message waits for its key


@dataclass(frozen=True)
class Held:
    sender: str
    message: RoomCiphertext
    ts: int
    at: float  # when it was held, by the holder's clock


class LateMessages:
    """Undecryptable live messages by (room, session id), oldest first."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._held: dict[tuple[str, str], list[Held]] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def hold(self, sender: str, message: RoomCiphertext, ts: int) -> None:
        """Keep `message` until its session's key comes (or it grows too old)."""
        self._expire()
        key = (message.room, message.session_id)
        held = self._held.setdefault(key, [])
        held.append(Held(sender, message, ts, self._clock()))
        self._count += 1
        if len(held) > PER_SESSION:
            held.pop(0)
            self._count -= 1
        while self._count > TOTAL:
            self._drop_oldest()

    def take(self, room: str, session_id: str) -> list[Held]:
        """The messages held for that session, in the order they came; forgotten here."""
        self._expire()
        held = self._held.pop((room, session_id), [])
        self._count -= len(held)
        return held

    def _drop_oldest(self) -> None:
        key = min(self._held, key=lambda k: self._held[k][0].at)
        held = self._held[key]
        held.pop(0)
        self._count -= 1
        if not held:
            del self._held[key]

    def _expire(self) -> None:
        limit = self._clock() - MAX_AGE
        for key in list(self._held):
            held = self._held[key]
            fresh = [h for h in held if h.at >= limit]
            self._count -= len(held) - len(fresh)
            if fresh:
                self._held[key] = fresh
            else:
                del self._held[key]
