"""The store worker, on a real SQLite store in tmp_path: room history is written at once in a
quiet room and batched in a busy one; stopping writes what waits; a job's answer comes back
through the inbox it named."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from securechat.errors import StorageError
from securechat.server.store import HistoryRow, SQLiteStore, Store
from securechat.server.worker import StoreWorker


class Inbox:
    """Stands in for an I/O loop: runs what it is handed on the test's thread, on demand."""

    def __init__(self) -> None:
        self.calls: list[Callable[[], None]] = []
        self.ready = threading.Event()

    def call_soon(self, fn: Callable[[], None]) -> None:
        self.calls.append(fn)
        self.ready.set()


def row(text: str) -> HistoryRow:
    return HistoryRow("#dev", "alice", text, 1_000, False)


def worker_for(
    tmp_path: Path, delay: float
) -> tuple[StoreWorker, list[list[str]], threading.Event]:
    worker = StoreWorker(lambda: SQLiteStore(tmp_path / "securechat.db"), 10, flush_delay=delay)
    writes: list[list[str]] = []
    written = threading.Event()
    real = worker.store.append_history

    def counting(rows: list[HistoryRow], keep: int) -> None:
        writes.append([r.text for r in rows])
        real(rows, keep)
        written.set()

    worker.store.append_history = counting  # type: ignore[method-assign]
    return worker, writes, written


def test_a_quiet_room_is_written_at_once_and_a_busy_one_waits_for_the_window(
    tmp_path: Path,
) -> None:
    worker, writes, written = worker_for(tmp_path, delay=3600.0)  # a window that never ends here
    try:
        worker.add_history(row("first"))
        assert written.wait(10)
        assert writes == [["first"]]
        worker.add_history(row("second"))
        worker.add_history(row("third"))
        # Within the window nothing more is written; a job still runs meanwhile.
        kept = worker.submit(lambda: [r.text for r in worker.store.room_history("#dev", 10)])
        assert kept.result(10) == ["first"]
    finally:
        worker.stop(10)
    assert writes == [["first"], ["second", "third"]]  # stopping wrote the rest, together
    reopened = SQLiteStore(tmp_path / "securechat.db")
    assert [r.text for r in reopened.room_history("#dev", 10)] == ["first", "second", "third"]
    reopened.close()


def test_a_job_answers_through_its_inbox_with_its_result_or_its_error(tmp_path: Path) -> None:
    worker = StoreWorker(lambda: SQLiteStore(tmp_path / "securechat.db"), 10)
    inbox, results = Inbox(), []

    def refuse(store: Store) -> None:
        raise StorageError("disk full")

    try:
        worker.run(lambda store: store.claim_name("alice", b"k" * 32).value, results.append, inbox)
        worker.run(refuse, results.append, inbox)
        while len(inbox.calls) < 2:
            assert inbox.ready.wait(10)
            inbox.ready.clear()
    finally:
        worker.stop(10)
    assert results == []  # nothing ran on the worker's thread: only through the inbox
    for call in inbox.calls:
        call()
    assert results[0] == "new"
    assert isinstance(results[1], StorageError) and str(results[1]) == "disk full"


def test_a_call_sees_every_job_handed_over_before_it(tmp_path: Path) -> None:
    worker = StoreWorker(lambda: SQLiteStore(tmp_path / "securechat.db"), 10)
    inbox, busy, release = Inbox(), threading.Event(), threading.Event()
    try:
        # Hold the worker in one call, so that the job and the call below wait in one round.
        held = worker.submit(lambda: (busy.set(), release.wait(10)))
        assert busy.wait(10)
        worker.run(lambda store: store.claim_name("alice", b"k" * 32).value, lambda _: None, inbox)
        seen = worker.submit(lambda: worker.store.public_key("alice"))
        release.set()
        assert held.result(10) == (None, True)
        assert seen.result(10) == b"k" * 32
    finally:
        worker.stop(10)


def test_a_stopped_worker_takes_no_more_calls(tmp_path: Path) -> None:
    worker = StoreWorker(lambda: SQLiteStore(tmp_path / "securechat.db"), 10)
    worker.stop(10)
    with pytest.raises(RuntimeError, match="the store worker has stopped"):
        worker.submit(lambda: None)


def test_a_row_added_while_the_worker_writes_is_written_by_a_later_write_not_left_waiting(
    tmp_path: Path,
) -> None:
    # add_history takes the worker's lock only for the first row of a write, and the worker
    # counts the rows it takes without holding anyone back: a row that comes after the count
    # must ask for a write of its own. Here each write adds the next row while it runs.
    worker, writes, written = worker_for(tmp_path, delay=0.0)
    real = worker.store.append_history

    def adding(rows: list[HistoryRow], keep: int) -> None:
        real(rows, keep)  # the counting one: records the write, then sets `written`
        if len(writes) < 50:
            worker.add_history(row(f"m{len(writes)}"))

    worker.store.append_history = adding  # type: ignore[method-assign]
    try:
        worker.add_history(row("m0"))
        for _ in range(50):
            if len(writes) >= 50:
                break
            written.clear()
            if len(writes) < 50:
                assert written.wait(10), f"a row was left waiting after {len(writes)} writes"
        assert written.wait(10)
    finally:
        worker.stop(10)
    assert writes == [[f"m{i}"] for i in range(50)]
