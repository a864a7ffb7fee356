"""The store worker: the one thread that touches the store, so no I/O loop ever blocks on disk.

I/O loops hand it jobs with run(); jobs that queue up while it is busy run as one batch in one
transaction (group commit), and each job's answer goes back to the loop that asked, through that
loop's inbox. Room history rows are batched the same way, against a deadline: a busy room costs
a few commits a second, not one per message. It never touches a socket or a connection.
"""

from __future__ import annotations

import collections
import functools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Protocol, TypeVar

from securechat.errors import SecureChatError, StorageError
from securechat.server.store import HistoryFields, Store

log = logging.getLogger("securechat.server")
T = TypeVar("T")
HISTORY_FLUSH_DELAY = 0.1  # seconds room messages may wait to be written to the store together


class Inbox(Protocol):
    """Where a job's answer is delivered: an I/O loop."""

    def call_soon(self, fn: Callable[[], None]) -> None: ...


Job = tuple[Callable[[Store], Any], Callable[[Any], None], Inbox]


class StoreWorker:
    """Owns the store; every other thread reaches it through this object's queue."""

    def __init__(
        self,
        open_store: Callable[[], Store],
        history_keep: int,
        flush_delay: float = HISTORY_FLUSH_DELAY,
    ) -> None:
        self._history_keep = history_keep
        self._flush_delay = flush_delay
        self._wake = threading.Condition()
        # Guarded by _wake:
        self._calls: list[tuple[Callable[[], Any], Future[Any]]] = []
        self._jobs: list[Job] = []
        self._rows_due = False  # rows wait for a write, due at _flush_at (read unlocked too)
        self._flush_at = 0.0  # when the rows waiting must be written
        # Not guarded: add_history appends without the lock, and only this thread pops.
        self._rows: collections.deque[HistoryFields] = collections.deque()
        self._flushed_at = float("-inf")
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="store", daemon=True)
        self._thread.start()
        # The store is opened on this thread: an SQLite connection stays on one thread.
        try:
            self.store: Store = self.submit(open_store).result()
        except BaseException:
            self.stop(timeout=5.0)
            raise

    # -- any thread -------------------------------------------------------------------------------

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Call `fn(*args)` on the worker, outside any batch (start-up, shutdown, tests), after
        every job run() handed over before it."""
        future: Future[T] = Future()
        with self._wake:
            if self._stopping:
                raise RuntimeError("the store worker has stopped")
            self._calls.append((lambda: fn(*args), future))
            self._wake.notify()
        return future

    def run(
        self, work: Callable[[Store], T], then: Callable[[T | Exception], None], inbox: Inbox
    ) -> None:
        """Run `work(store)` in the next batch, then `then(result)` through `inbox`.

        Every `then` of a batch runs after its commit, so a sender hears "queued" only once its
        DM is durable. A job that raises a SecureChatError gets it as its result.
        """
        with self._wake:
            self._jobs.append((work, then, inbox))
            self._wake.notify()

    def add_history(self, row: HistoryFields) -> None:
        """Keep a room message; written with the others within HISTORY_FLUSH_DELAY. Called under
        the hub's lock: it only appends. A crash can lose the rows still waiting.

        The worker's lock is taken only for the first row of a write, not for each message
        (it was, on every room message, on the I/O thread): the row goes into the deque first,
        and the worker clears `_rows_due` before it counts the rows it takes, so a row it
        leaves behind always finds the flag clear and sets it again."""
        self._rows.append(row)
        if not self._rows_due:
            with self._wake:
                if not self._rows_due:
                    # A message in a quiet room is written at once; in a busy one, rows wait
                    # for the next window to share a transaction.
                    self._rows_due = True
                    self._flush_at = max(time.monotonic(), self._flushed_at + self._flush_delay)
                    self._wake.notify()

    def stop(self, timeout: float) -> None:
        """Finish what is queued, write the history rows left, close the store."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout)

    # -- the worker thread ------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._due():
                    wait = self._flush_at - time.monotonic() if self._rows_due else None
                    self._wake.wait(wait)
                calls, self._calls = self._calls, []
                jobs, self._jobs = self._jobs, []
                rows: list[HistoryFields] = []
                if self._rows_due and (self._stopping or time.monotonic() >= self._flush_at):
                    self._rows_due = False  # before the count: see add_history
                    pending = self._rows
                    rows = [pending.popleft() for _ in range(len(pending))]
                    self._flushed_at = time.monotonic()
                stopping = self._stopping and not self._calls and not self._jobs
            # Jobs first: a call then sees every job handed over before it (a test that acked a
            # DM, then reads the queue, must not overtake the ack waiting in this round).
            if jobs:
                self._run_jobs(jobs)
            for call, future in calls:
                _resolve(call, future)
            if rows:
                self._write_history(rows)
            if stopping and not self._rows_due:
                self._close()
                return

    def _due(self) -> bool:
        if self._calls or self._jobs or self._stopping:
            return True
        return self._rows_due and time.monotonic() >= self._flush_at

    def _run_jobs(self, jobs: list[Job]) -> None:
        results: list[Any] = []
        try:
            with self.store.batch():
                for work, _, _ in jobs:
                    results.append(_outcome(functools.partial(work, self.store)))
        except SecureChatError as exc:  # the commit failed: nothing of this batch is stored
            log.error("store batch of %d failed: %s", len(jobs), exc)
            results = [exc] * len(jobs)
        for (_, then, inbox), result in zip(jobs, results, strict=True):
            inbox.call_soon(functools.partial(then, result))

    def _write_history(self, rows: list[HistoryFields]) -> None:
        if self._history_keep <= 0:
            return
        try:
            self.store.append_history(rows, self._history_keep)
        except SecureChatError as exc:
            log.error("could not save room history: %s", exc)

    def _close(self) -> None:
        store: Store | None = getattr(self, "store", None)  # None: it never opened
        if store is None:
            return
        try:
            store.close()
        except SecureChatError as exc:
            log.error("could not close the store: %s", exc)


def _resolve(call: Callable[[], Any], future: Future[Any]) -> None:
    try:
        future.set_result(call())
    except BaseException as exc:  # the caller waits on the future: it must hear of anything
        future.set_exception(exc)


def _outcome(work: Callable[[], T]) -> T | Exception:
    """What one store job gives its caller: its result, or the error it met."""
    try:
        return work()
    except SecureChatError as exc:
        return exc
    except Exception:
        # A bug in one job must not undo the others in its batch; its caller hears of an error.
        log.exception("store job failed")
        return StorageError("internal server error")
