"""The I/O loop's wake-up: a call handed over from another thread always wakes the loop."""

from __future__ import annotations

import socket

from securechat.server.loop import IOLoop


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
