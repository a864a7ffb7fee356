"""The I/O loop: a call handed over from another thread always wakes the loop, and a message that
arrives while a big room is being written to joins the writes still to come."""

from __future__ import annotations

import socket
import threading

import pytest

from securechat.server.loop import FLUSH_CHUNK, IOLoop
from securechat.server.outbox import Outbox, Roster


class WakeDuringDrain:
    """The loop's real wake socket, except that its first recv() lets another thread call
    call_soon() at that very instant: the interleaving that used to lose every later wake-up."""

    def __init__(self, loop: IOLoop, sock: socket.socket) -> None:
        self.loop, self.sock, self.fired = loop, sock, False

    def recv(self, size: int) -> bytes:
        if not self.fired:
            self.fired = True
            self.loop.call_soon(lambda: None)
        return self.sock.recv(size)


def wake_is_pending(loop: IOLoop) -> bool:
    return any(key.data is None for key, _ in loop.selector.select(0))


def test_a_wake_up_during_the_drain_is_not_lost() -> None:
    loop = IOLoop(0)  # never started: the test plays the loop thread itself
    real = loop._wake_r
    try:
        loop.call_soon(lambda: None)
        assert wake_is_pending(loop)
        loop._wake_r = WakeDuringDrain(loop, real)
        loop._drain_wake()
        loop._wake_r = real
        # Both calls are in the inbox, and this turn of the loop runs them.
        assert len(loop._inbox) == 2
        loop._inbox.clear()
        # The next call from another thread must still wake the selector.
        loop.call_soon(lambda: None)
        assert wake_is_pending(loop)
    finally:
        loop._wake_r = real
        loop.selector.close()
        real.close()
        loop._wake_w.close()


class Member:
    """A connection as the loop sees it: an outbox, and what each flush() wrote."""

    def __init__(self) -> None:
        self.open = True
        self.outbox = Outbox()
        self.writes: list[bytes] = []

    def flush(self) -> None:
        data = self.outbox.take(1 << 20)
        if data:
            self.writes.append(data)


def test_a_message_arriving_mid_fan_out_joins_the_writes_still_to_come() -> None:
    loop = IOLoop(0)  # never started: the test plays the loop thread itself
    members = [Member() for _ in range(3 * FLUSH_CHUNK)]
    room = Roster(members).audience()  # type: ignore[arg-type]
    try:
        loop._feed(b"first", room)
        # The second message comes from another thread while the first is being written out.
        loop.broadcast(b"second", room)
        while loop.dirty or loop._grown:
            loop._flush_dirty()
        writes = [m.writes for m in members]
        together = sum(w == [b"firstsecond"] for w in writes)
        apart = sum(w == [b"first", b"second"] for w in writes)
        # The first chunk went out before the loop looked again; every later member got both
        # messages in one write; and everyone got both, once, in order.
        assert apart == FLUSH_CHUNK
        assert together == 2 * FLUSH_CHUNK
    finally:
        loop.selector.close()
        loop._wake_r.close()
        loop._wake_w.close()


def test_a_connection_can_ask_only_its_own_loop_for_service() -> None:
    loop = IOLoop(0)
    loop.start()
    try:
        with pytest.raises(RuntimeError) as info:
            loop.mark_dirty(Member())  # type: ignore[arg-type]
        assert str(info.value) == f"io-0 called from {threading.current_thread().name}"
        member, done = Member(), threading.Event()

        def on_the_loop() -> None:
            loop.mark_dirty(member)  # type: ignore[arg-type]
            done.set()

        loop.call_soon(on_the_loop)
        assert done.wait(10)
    finally:
        loop.stop()
        loop.join(10)
