"""What waits to be written to a connection: its own frames, and its share of room broadcasts.

A room message used to be appended to every member's list, a Python step per member per message.
Now a loop collects a turn's messages for one room's members in one Feed (an append per message,
whatever the room's size) and each member's Outbox only follows the feeds it is in. At write
time a member with nothing else queued writes the feed's frames joined once for all of them.

Order is kept per connection: the frames of the feeds it follows, in the order it began to
follow them, with its own frames (replies, DMs, history) where they were pushed. A frame pushed
while the connection follows a feed still open takes that feed's frames so far first, and
remembers how far it took them. The owning loop alone touches an Outbox and the feeds it collects
(server/loop.py); the hub only makes Audiences, which nobody changes after.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from securechat.server.connection import Connection


class Feed:
    """Frames for one audience, collected during one loop turn, then sealed and written."""

    __slots__ = ("_joined", "frames", "open")

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.open = True  # frames may still be added; sealed before anyone writes it out
        self._joined: bytes | None = None

    def joined(self) -> bytes:
        """All the frames as one string, made once for every member (the feed is sealed)."""
        if self._joined is None:
            self._joined = b"".join(self.frames)
        return self._joined


class Audience:
    """The members of a room on one loop at one moment; the hub makes a new one when they change,
    so a broadcast hands a loop this object instead of a copy of the members."""

    __slots__ = ("feed", "members")

    def __init__(self, members: Iterable[Connection]) -> None:
        self.members = tuple(members)
        self.feed: Feed | None = None  # the feed its loop is filling this turn (loop only)


class Outbox:
    """One connection's queue: frames pushed for it alone, and the feeds it follows."""

    __slots__ = ("_taken", "feeds", "pending")

    def __init__(self) -> None:
        self.pending: list[bytes] = []
        self.feeds: list[Feed] = []
        self._taken: dict[Feed, int] | None = None  # how far pending holds an open feed's frames

    def push(self, data: bytes) -> None:
        """Queue a frame for this connection alone, after everything queued for it so far."""
        if self.feeds:
            self._take_feeds()
        self.pending.append(data)

    def __bool__(self) -> bool:
        return bool(self.pending or self.feeds)

    def take(self) -> bytes:
        """Everything queued, in order, as one string (the feeds are sealed); then empty."""
        feeds = self.feeds
        if len(feeds) == 1 and not self.pending:
            data = feeds[0].joined()
        else:
            if feeds:
                self._take_feeds()
            pending = self.pending
            data = b"".join(pending) if len(pending) > 1 else pending[0]
            pending.clear()
        self.feeds.clear()
        self._taken = None
        return data

    def _take_feeds(self) -> None:
        """Move the feeds' frames not yet taken into pending; keep following the open ones."""
        taken, pending = self._taken, self.pending
        still_open: list[Feed] = []
        for feed in self.feeds:
            start = taken.get(feed, 0) if taken else 0
            pending.extend(feed.frames[start:] if start else feed.frames)
            if feed.open:
                still_open.append(feed)
        if still_open:
            self._taken = {feed: len(feed.frames) for feed in still_open}
        else:
            self._taken = None
        self.feeds = still_open
