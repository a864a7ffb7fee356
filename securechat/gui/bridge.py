"""Threads for the GUI: Tk is touched only on its own thread, the network only by the Client.

Client events and the results of blocking calls (a key look-up waits for the server; the
identity's Argon2 takes a second) arrive from other threads as callables in a queue, which the Tk
thread drains every POLL_MS with `after`. Blocking calls run one at a time, in order, on a
single background thread, so a command typed after another always runs after it.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import tkinter as tk
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

from securechat.errors import SecureChatError

log = logging.getLogger("securechat.gui")
T = TypeVar("T")
POLL_MS = 30


class Bridge:
    def __init__(self, root: tk.Misc) -> None:
        self.root = root
        self._inbox: queue.Queue[Callable[[], None]] = queue.Queue()
        self._jobs = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="gui-work")
        self._listeners: list[Callable[[], None]] = []
        self._closed = False
        self._after = root.after(POLL_MS, self._poll)

    def post(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the Tk thread soon (callable from any thread)."""
        self._inbox.put(fn)

    def on_drained(self, fn: Callable[[], None]) -> None:
        """Call `fn` on the Tk thread after each batch of posted work (to redraw once)."""
        self._listeners.append(fn)

    def run(
        self,
        work: Callable[[], T],
        then: Callable[[T], None] | None = None,
        failed: Callable[[SecureChatError | TimeoutError], None] | None = None,
    ) -> None:
        """Run `work` on the background thread; then(result) or failed(error) on the Tk thread.

        Our own errors and timeouts go to `failed`; anything else is a bug, logged, and also
        reported to `failed` as a plain message so the window never just stalls.
        """

        def job() -> None:
            try:
                result = work()
            except (SecureChatError, TimeoutError) as exc:
                if failed is not None:
                    self.post(partial(failed, exc))
                return
            except Exception as exc:
                log.exception("background task failed")
                if failed is not None:
                    err = SecureChatError(f"internal error: {type(exc).__name__}")
                    self.post(lambda: failed(err))
                return
            if then is not None:
                self.post(lambda: then(result))

        if not self._closed:
            self._jobs.submit(job)

    def _poll(self) -> None:
        ran = False
        while True:
            try:
                fn = self._inbox.get_nowait()
            except queue.Empty:
                break
            ran = True
            try:
                fn()
            except Exception:
                log.exception("GUI update failed")
        if ran:
            for listener in self._listeners:
                listener()
        if not self._closed:
            self._after = self.root.after(POLL_MS, self._poll)

    def close(self, timeout: float = 10.0) -> None:
        """Stop polling and wait for the background work already queued (closing a client)."""
        self._closed = True
        try:
            self.root.after_cancel(self._after)
        except tk.TclError:
            pass
        self._jobs.shutdown(wait=True, cancel_futures=False)

    @property
    def pending(self) -> Any:
        return self._inbox.qsize()
