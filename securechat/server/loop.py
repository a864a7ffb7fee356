"""An I/O thread: one selector event loop that owns many connections.

Theory of operation (the reasons and the measured figures are in docs/ARCHITECTURE.md):

OpenSSL forbids using one SSL object from two threads at once, and Python's ssl module adds no
lock of its own, so a TLS connection shared between threads is a latent crash or corruption.
Hence one rule: a connection, its socket, its TLSStream, its ServerSession and its queue of
pending frames belong to the IOLoop that adopted it, and only that loop's thread calls a method
of any of them. The loop is the only code that reads or writes the socket.

Every other thread (the listener, the store worker, another loop calling into the hub) may use
exactly three methods here: call_soon(fn), to run fn on this loop, deliver(data, conns), to
queue an encoded frame for some of this loop's connections, and broadcast(data, audience), the
same for a room's members. They append to an inbox and wake the selector through a socket pair;
nothing else of a loop is thread-safe.

One turn of the loop: select; read every readable socket and feed its session (replies queue
up); run the inbox (deliveries from other loops, store answers); then write each connection
marked dirty, all its queued frames as one TLS write. Writes are coalesced this way: whatever
was queued for one connection between two turns leaves in one record and one send(). A room's
messages of one turn go into one Feed that its members follow (server/outbox.py): the cost of a
message does not grow with the room, only that of a turn does.

A connection asks its loop for service only through register(), unregister(), mark_dirty(),
watch_writable() and add_deadline(), all of them loop-thread only.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from securechat.server.outbox import FEED_FRAMES, Audience, Feed

if TYPE_CHECKING:
    from securechat.server.budget import OutputBudget
    from securechat.server.connection import Connection

log = logging.getLogger("securechat.server")

TICK = 0.5  # seconds between deadline checks when idle
FLUSH_CHUNK = 64  # connections written between two looks at what has arrived
LINGER_READ = 2.0  # seconds a socket we finished writing to is still read, and what comes dropped
MAX_LINGERING = 64  # such sockets per loop; past that, one closes at once
LINGER_RECV = 16384  # bytes read (and dropped) at a time from a lingering socket


class IOLoop(threading.Thread):
    def __init__(self, index: int) -> None:
        super().__init__(name=f"io-{index}", daemon=True)
        # Bytes in this loop's connections' output buffers, and connections shed to keep the
        # server's total within its budget: written here only, read by anyone (budget.py).
        self.queued = 0
        self.shed = 0
        self.biggest = 0  # its biggest queue, as of its last look while over budget
        self.budget: OutputBudget | None = None
        self.selector = selectors.DefaultSelector()
        self.connections: set[Connection] = set()
        self.dirty: set[Connection] = set()
        self._inbox: collections.deque[Callable[[], None]] = collections.deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._woken = False
        self._running = True
        self._grown: list[Feed] = []  # feeds with frames their members have not been flushed for
        self._open: list[Feed] = []  # feeds made since the last seal; each room adds to its newest
        self._frames = 0  # frames queued to feeds so far: their order, for members of two rooms
        self._deadlines: list[tuple[float, int, Connection]] = []
        self._seq = itertools.count()
        self._lingering: dict[socket.socket, Lingering] = {}
        self.selector.register(self._wake_r, selectors.EVENT_READ, None)

    # -- called from any thread -------------------------------------------------------------------

    def call_soon(self, fn: Callable[[], None]) -> None:
        self._inbox.append(fn)
        self._wake()

    def deliver(self, data: bytes, conns: Iterable[Connection]) -> None:
        """Queue one encoded frame for some of this loop's connections.

        From another thread the connections are copied, since the caller's collection may
        change before this loop runs; on this loop they are queued at once, with no copy.
        """
        if threading.current_thread() is self:
            self._queue(data, conns)
        else:
            conns = tuple(conns)
            self.call_soon(lambda: self._queue(data, conns))

    def broadcast(self, data: bytes, audience: Audience) -> None:
        """Queue one encoded frame for a room's members on this loop. The audience is fixed, so
        from another thread it is handed over as it is."""
        if threading.current_thread() is self:
            self._feed(data, audience)
        else:
            self.call_soon(lambda: self._feed(data, audience))

    def stop(self) -> None:
        self._running = False
        self._wake()

    def _wake(self) -> None:
        if not self._woken:
            self._woken = True
            try:
                self._wake_w.send(b"\0")
            except (BlockingIOError, OSError):
                pass  # a wake-up is already pending, or we are shutting down

    # -- loop thread only -------------------------------------------------------------------------

    def _owner_only(self) -> None:
        # The one-owner rule, enforced where a connection asks its loop for service: a call
        # from another thread is a bug that would race on the connection's TLS stream.
        if threading.current_thread() is not self and self.is_alive():
            raise RuntimeError(f"{self.name} called from {threading.current_thread().name}")

    def register(self, conn: Connection) -> None:
        """Adopt a connection: watch its socket for reading."""
        self._owner_only()
        self.connections.add(conn)
        self.selector.register(conn.sock, selectors.EVENT_READ, conn)

    def unregister(self, conn: Connection) -> None:
        """Forget a connection that is closing; its socket is the caller's to close."""
        self._owner_only()
        self.connections.discard(conn)
        self.dirty.discard(conn)
        try:
            self.selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass

    @property
    def lingering(self) -> int:
        """Sockets of closed connections still open for the client's last bytes (any thread)."""
        return len(self._lingering)

    def linger(self, sock: socket.socket) -> None:
        """Close `sock`, whose last bytes are sent and whose sending side is shut, once the
        client closes too, or after LINGER_READ; until then read and drop what it still sends.

        A socket closed with unread bytes waiting resets the connection, and a reset makes the
        client's side discard what it has not read yet: a client still sending when it was told
        to go (a flooder, one kicked for idling mid-write) would lose the frames saying why.
        """
        self._owner_only()
        if len(self._lingering) >= MAX_LINGERING:
            sock.close()
            return
        lingering = Lingering(sock, time.monotonic() + LINGER_READ, self)
        try:
            self.selector.register(sock, selectors.EVENT_READ, lingering)
        except (KeyError, ValueError, OSError):
            sock.close()
            return
        self._lingering[sock] = lingering

    def end_linger(self, lingering: Lingering) -> None:
        if self._lingering.pop(lingering.sock, None) is not None:
            try:
                self.selector.unregister(lingering.sock)
            except (KeyError, ValueError):
                pass
        lingering.sock.close()

    def mark_dirty(self, conn: Connection) -> None:
        """Write out what `conn` has queued before the next select."""
        self._owner_only()
        self.dirty.add(conn)

    def watch_writable(self, conn: Connection, want: bool) -> None:
        """Be told when `conn`'s socket can take more (it has bytes waiting), or stop."""
        self._owner_only()
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0)
        self.selector.modify(conn.sock, events, conn)

    def _queue(self, data: bytes, conns: Iterable[Connection]) -> None:
        dirty = self.dirty
        for conn in conns:
            if conn.open:
                conn.outbox.push(data)
                dirty.add(conn)

    def _feed(self, data: bytes, audience: Audience) -> None:
        """Add a frame to the audience's feed: O(1), and O(1) more per join or departure since
        its last frame.

        Each room's feed takes frames until the turn's writes are done, whatever other rooms
        queue meanwhile: each frame carries its place in this loop's order, and a connection in
        two rooms takes their frames merged in that order (Outbox). Its members are marked dirty
        once per flush, not once per frame.
        """
        roster, position = audience.roster, audience.position
        feed = roster.feed
        if (
            feed is None
            or not feed.open
            or len(feed.frames) >= FEED_FRAMES
            or position < roster.applied  # queued before what the feed has: its own members
        ):
            if feed is not None:
                feed.open = False
            members = audience.members()
            feed = roster.feed = Feed(members)
            self._open.append(feed)
            roster.applied = position
            for conn in members:
                if conn.open:
                    conn.outbox.follow(feed)
        elif position > roster.applied:
            self._apply(feed, roster.changes[roster.applied : position])
            roster.applied = position
        feed.add(data, self._frames)
        self._frames += 1
        if not feed.grown:
            feed.grown = True
            self._grown.append(feed)

    def _apply(self, feed: Feed, changes: list[tuple[Connection, bool]]) -> None:
        """Bring the feed's members up to date: a newcomer takes its frames from now on, one who
        left takes none from now on (those from before stay queued for it)."""
        members, end = feed.members, len(feed.frames)
        for conn, joined in changes:
            if joined:
                members.add(conn)
                if conn.open:
                    conn.outbox.follow(feed, end)
            else:
                members.discard(conn)
                if conn.open:
                    conn.outbox.leave(feed)
                    self.dirty.add(conn)  # no longer a member: the feed's growth won't mark it

    def _seal(self) -> None:
        """The open feeds take no more frames; their followers let go of them once they took
        all."""
        for feed in self._open:
            feed.open = False
        self._open.clear()

    def add_deadline(self, when: float, conn: Connection) -> None:
        heapq.heappush(self._deadlines, (when, next(self._seq), conn))

    def run(self) -> None:
        next_tick = time.monotonic() + TICK
        while self._running:
            self._poll(0.0 if self.dirty or self._grown or self._inbox else TICK)
            while self.dirty or self._grown:
                self._flush_dirty()
            self._seal()  # all written: the next frames start a new feed
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + TICK
                self._expire(now)
        self._drain_wake()
        self._run_inbox()
        for conn in list(self.connections):
            conn.abort("server stopped")
        for lingering in list(self._lingering.values()):
            lingering.close()
        self.selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def _poll(self, timeout: float) -> None:
        """Read what has arrived (and write where sockets have room), then run the inbox."""
        for key, mask in self.selector.select(timeout):
            conn = key.data
            if conn is None:
                self._drain_wake()
                continue
            try:
                if mask & selectors.EVENT_READ:
                    conn.on_readable()
                if mask & selectors.EVENT_WRITE and conn.open:
                    conn.on_writable()
            except Exception:
                self._failed(conn)
        self._run_inbox()

    def _flush_dirty(self) -> None:
        """Write out every connection with frames queued.

        Between chunks of connections the loop reads what has arrived meanwhile: a message that
        comes while a big room's previous one is still going out joins it in the same TLS write
        for every member not yet written to. The busier the room, the fewer writes per message.
        """
        dirty = self.dirty
        for feed in self._grown:
            feed.grown = False
            dirty.update(feed.members)  # one C call per feed; a closed member skips its flush
        self._grown.clear()
        batch, self.dirty = dirty, set()
        for i, conn in enumerate(batch, 1):
            try:
                conn.flush()
            except Exception:
                self._failed(conn)
            if not i % FLUSH_CHUNK:
                self._keep_to_budget()
                self._poll(0.0)
        self._keep_to_budget()

    def _keep_to_budget(self) -> None:
        # Checked between chunks too: under a flood this loop may keep reading and writing
        # without ever leaving _flush_dirty, and queues must not outgrow the budget meanwhile.
        if self.budget is not None and self.budget.over():
            self.budget.shed_from(self)

    def _run_inbox(self) -> None:
        inbox = self._inbox
        while inbox:
            try:
                inbox.popleft()()
            except Exception:
                # A bug in one callback must not stop the loop that serves everyone else.
                log.exception("error in an I/O loop callback")

    def _failed(self, conn: Connection) -> None:
        # Whatever went wrong with one connection costs that connection, never the loop.
        log.exception("closing %s (%s) after an internal error", conn.user or "-", conn.addr)
        try:
            conn.abort("internal server error")
        except Exception:
            log.exception("could not close %s cleanly", conn.addr)

    def _drain_wake(self) -> None:
        # Drain first, then clear the flag: cleared first, a wake-up sent in between would be
        # drained here while the flag stayed set, and no later call_soon() would wake us again.
        # A caller that still sees the flag set has already queued its call, which this turn runs.
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass
        self._woken = False

    def _expire(self, now: float) -> None:
        for lingering in [g for g in self._lingering.values() if g.until <= now]:
            lingering.close()
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, _, conn = heapq.heappop(deadlines)
            if conn.open:
                try:
                    conn.check_deadline(now)
                except Exception:
                    self._failed(conn)


class Lingering:
    """A closed connection's socket, read until the client closes it too (IOLoop.linger)."""

    __slots__ = ("_loop", "sock", "until")

    open = False  # nothing is written to it: the loop never asks it to

    def __init__(self, sock: socket.socket, until: float, loop: IOLoop) -> None:
        self.sock, self.until, self._loop = sock, until, loop

    def on_readable(self) -> None:
        try:
            if self.sock.recv(LINGER_RECV):
                return  # sent before the client saw our close: dropped unread
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass  # reset: the client is gone as well
        self.close()

    def close(self) -> None:
        self._loop.end_linger(self)
