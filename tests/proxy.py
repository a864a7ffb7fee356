"""A TCP proxy on loopback that can hold back what the client sends and let it go at once, as a
busy machine or a jittery link does. TLS passes through it as opaque bytes."""

from __future__ import annotations

import selectors
import socket
import threading


class HoldingProxy:
    """Forwards one client connection to `target`; hold() keeps the client's bytes back until
    release(), which sends them all in one go."""

    def __init__(self, target: tuple[str, int]) -> None:
        self._target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._cond = threading.Condition()
        self._holding = False
        self._held = bytearray()
        self._wake_r, self._wake_w = socket.socketpair()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="holding-proxy", daemon=True)
        self._thread.start()

    def hold(self) -> None:
        with self._cond:
            self._holding = True

    def wait_held(self, nbytes: int, timeout: float = 10.0) -> None:
        """Block until at least `nbytes` of the client's bytes are being held."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._held) >= nbytes, timeout):
                raise AssertionError(f"only {len(self._held)} of {nbytes} bytes held")

    def release(self) -> None:
        with self._cond:
            self._holding = False
        self._wake_w.send(b"\0")

    def close(self) -> None:
        self._stop = True
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass  # the connection already ended and the thread with it
        self._thread.join(10)
        self._listener.close()
        self._wake_w.close()

    def _run(self) -> None:
        client, _ = self._listener.accept()
        upstream = socket.create_connection(self._target)
        sel = selectors.DefaultSelector()
        sel.register(client, selectors.EVENT_READ, "client")
        sel.register(upstream, selectors.EVENT_READ, "upstream")
        sel.register(self._wake_r, selectors.EVENT_READ, None)
        try:
            while not self._stop:
                for key, _ in sel.select():
                    if key.data is None:
                        self._wake_r.recv(64)
                    else:
                        try:
                            data = key.fileobj.recv(65536)
                        except ConnectionResetError:
                            # A side that closes with bytes unread resets instead of ending.
                            return
                        if not data:
                            return
                        if key.fileobj is client:
                            with self._cond:
                                self._held += data
                                self._cond.notify_all()
                        else:
                            client.sendall(data)
                with self._cond:
                    if not self._holding and self._held:
                        upstream.sendall(self._held)  # the whole backlog at once, in order
                        self._held.clear()
        finally:
            sel.close()
            client.close()
            upstream.close()
            self._wake_r.close()
