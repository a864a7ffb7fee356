"""What waits to be written to a connection: its own frames, and its share of room broadcasts.

A room message used to be appended to every member's list, a Python step per member per message.
Now a loop collects a room's messages for its members there in one Feed, an append per message
whatever the room's size, while it is busy; each member's Outbox follows the feeds it is in with
a cursor. At write time the members at one cursor share one join of the frames after it.

Order is kept per connection: the frames of the feeds it follows, in the order its loop queued
them (each frame carries the loop's count at queueing, and a member of two rooms, following both
rooms' feeds, takes their frames merged by it), with its own frames (replies, DMs, history)
where they were pushed. A frame pushed while the connection follows feeds takes their frames so
far first. A feed ends when its loop has written everything out, or when it is long. It used to
end too when another room's feed got a frame, so that a member of both could not see them out of
order; then two busy rooms on one loop made a new feed per message, which each member of the
room followed (O(members) per message). The owning loop alone touches an Outbox and the feeds it
collects (server/loop.py).

Who is in a room is the hub's to say, under its lock, while the loop fills the feed later on its
own thread. So the hub keeps a Roster per room and loop: the members when it began, then every
join and departure in order, an append each. A broadcast names its audience as a position in that
log (an Audience), and the loop brings the feed's members up to that position before it adds the
frame: a newcomer follows the feed from its end, a member who left stops following it with the
frames from before it left still queued. A join or departure then costs O(1) on both sides, where
a new feed that every member followed made it O(members) each, and a mass departure O(members²).

Each keeps the byte count of what waits (`Outbox.backlog`), so that a client that does not read
is charged for the frames it has not taken, not only for what was encrypted for it: its
connection stops taking frames while its socket is full, and they wait here, shared with every
other member of the room, instead of as an encrypted copy per member.
"""

from __future__ import annotations

from collections.abc import Iterable
from operator import itemgetter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from securechat.server.connection import Connection


FEED_FRAMES = 1024  # a feed this long ends, so one busy stretch cannot grow it without bound
_SEQ, _FRAME = itemgetter(0), itemgetter(1)


class Feed:
    """Frames for one audience, collected while its loop is busy; each follower keeps a cursor."""

    __slots__ = ("_span", "ends", "frames", "grown", "members", "open", "seqs")

    def __init__(self, members: set[Connection]) -> None:
        self.members = members  # kept up to date as the roster changes (loop only)
        self.frames: list[bytes] = []
        self.seqs: list[int] = []  # seqs[i]: when frames[i] was queued, in its loop's count
        self.ends: list[int] = []  # ends[i]: the bytes of frames[: i + 1]
        self.open = True  # frames may still be added
        self.grown = False  # frames were added that its members have not been flushed since
        self._span: tuple[int, int, bytes] = (0, 0, b"")

    def since(self, start: int) -> bytes:
        """The frames from `start` on as one string, joined once for every member at `start`."""
        end = len(self.frames)
        first, last, data = self._span
        if first != start or last != end:
            data = b"".join(self.frames[start:] if start else self.frames)
            self._span = (start, end, data)
        return data

    def add(self, data: bytes, seq: int) -> None:
        ends = self.ends
        ends.append((ends[-1] if ends else 0) + len(data))
        self.frames.append(data)
        self.seqs.append(seq)

    def bytes_since(self, start: int) -> int:
        ends = self.ends
        if not ends:
            return 0
        return ends[-1] - (ends[start - 1] if start else 0)


class Roster:
    """A room's members on one loop: those when it began, then each join and departure in order.

    The hub appends under its lock and never changes what it appended; the loop reads the changes
    up to an Audience's position, which it got after the hub appended them."""

    __slots__ = ("applied", "base", "changes", "departed", "feed")

    def __init__(self, members: Iterable[Connection]) -> None:
        self.base = tuple(members)
        self.changes: list[tuple[Connection, bool]] = []  # (member, True: joined / False: left)
        self.departed = 0  # the departures among them
        self.feed: Feed | None = None  # the feed its loop is filling (loop only)
        self.applied = 0  # the changes that feed's members reflect (loop only)

    def change(self, conn: Connection, joined: bool) -> None:
        self.changes.append((conn, joined))
        self.departed += not joined

    def audience(self) -> Audience:
        """The members as of now, for a broadcast."""
        return Audience(self, len(self.changes))


class Audience:
    """The members of a room on one loop at one broadcast: a position in its roster's log, so a
    broadcast hands a loop this small object instead of a copy of the members."""

    __slots__ = ("position", "roster")

    def __init__(self, roster: Roster, position: int) -> None:
        self.roster = roster
        self.position = position

    def members(self) -> set[Connection]:
        members = set(self.roster.base)
        for conn, joined in self.roster.changes[: self.position]:
            if joined:
                members.add(conn)
            else:
                members.discard(conn)
        return members


class Outbox:
    """One connection's queue: frames pushed for it alone, and the feeds it follows, each with
    how far it has taken that feed's frames."""

    __slots__ = ("feeds", "pending", "pending_bytes", "starts")

    def __init__(self) -> None:
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.feeds: list[Feed] = []
        self.starts: list[int] = []

    def follow(self, feed: Feed, start: int = 0) -> None:
        """Take `feed`'s frames from `start` on (a member who joins the room mid-feed: its end)."""
        feeds = self.feeds
        if len(feeds) == 1 and not feeds[0].open:
            # The usual case: the last feed ended. What this member has not taken of it yet
            # moves to pending, as _take_feeds would move it, without the lists it builds: a
            # room that announces each of a burst of joins starts a feed a join, and every
            # member follows each one before it is written to.
            ended, taken = feeds[0], self.starts[0]
            if taken < len(ended.frames):
                self.pending.extend(ended.frames[taken:])
                self.pending_bytes += ended.bytes_since(taken)
            feeds[0] = feed
            self.starts[0] = start
            return
        if feeds:
            # Drops the ended feeds, their frames not taken yet moved to pending: a connection
            # whose socket is full follows a new feed every turn, and must not keep them all.
            self._take_feeds()
        self.feeds.append(feed)
        self.starts.append(start)

    def leave(self, feed: Feed) -> None:
        """Take no more of `feed` (the member left its room): the frames it added so far and not
        taken yet stay queued, in order."""
        if any(f is feed for f in self.feeds):
            self._take_feeds()
            for i, followed in enumerate(self.feeds):
                if followed is feed:
                    del self.feeds[i], self.starts[i]
                    return

    def push(self, data: bytes) -> None:
        """Queue a frame for this connection alone, after everything queued for it so far."""
        if self.feeds:
            self._take_feeds()
        self.pending.append(data)
        self.pending_bytes += len(data)

    def backlog(self) -> int:
        """The bytes queued and not taken yet."""
        waiting = self.pending_bytes
        for feed, start in zip(self.feeds, self.starts, strict=True):
            waiting += feed.bytes_since(start)
        return waiting

    def take(self, limit: int) -> bytes:
        """What is queued and not taken yet, in order, as one string (b"" if nothing): all of
        it up to `limit` bytes, else whole frames from the front until `limit` is reached. So
        less than `limit` bytes means nothing is left (Connection.flush relies on it).

        The limit keeps a client that reads slowly from being handed its whole backlog at
        once: the frames it has not taken stay shared with the room, not joined into a copy of
        its own that waits for its socket."""
        feeds = self.feeds
        if len(feeds) == 1 and not self.pending and feeds[0].bytes_since(self.starts[0]) <= limit:
            # The usual case: one room's frames, joined once for all members at this cursor.
            feed = feeds[0]
            data = feed.since(self.starts[0])
            if feed.open:
                self.starts[0] = len(feed.frames)
            else:
                feeds.clear()
                self.starts.clear()
            return data
        if feeds:
            self._take_feeds()
        pending = self.pending
        if not pending:
            return b""
        if self.pending_bytes <= limit:
            data = b"".join(pending) if len(pending) > 1 else pending[0]
            pending.clear()
            self.pending_bytes = 0
            return data
        size = count = 0
        while size < limit:
            size += len(pending[count])
            count += 1
        data = b"".join(pending[:count]) if count > 1 else pending[0]
        del pending[:count]
        self.pending_bytes -= size
        return data

    def _take_feeds(self) -> None:
        """Move the feeds' frames not yet taken into pending, in the order they were queued (a
        member of two rooms follows both rooms' feeds at once); keep following the open ones."""
        pending = self.pending
        feeds: list[Feed] = []
        starts: list[int] = []
        waiting: list[tuple[Feed, int]] = []
        for feed, start in zip(self.feeds, self.starts, strict=True):
            frames = feed.frames
            if start < len(frames):
                waiting.append((feed, start))
                self.pending_bytes += feed.bytes_since(start)
            if feed.open:
                feeds.append(feed)
                starts.append(len(frames))
        if len(waiting) == 1:
            feed, start = waiting[0]
            pending.extend(feed.frames[start:] if start else feed.frames)
        elif waiting:
            # Sorting the runs joined end to end merges them in C (Timsort finds the sorted
            # runs): several times faster than heapq.merge, for a non-reader's whole backlog.
            merged: list[tuple[int, bytes]] = []
            for feed, start in waiting:
                merged.extend(zip(feed.seqs[start:], feed.frames[start:], strict=True))
            merged.sort(key=_SEQ)
            pending.extend(map(_FRAME, merged))
        self.feeds, self.starts = feeds, starts
