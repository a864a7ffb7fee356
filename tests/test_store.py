"""The SQLite store on real files: group commit, and one failed operation in a batch undoing only
itself. (Crash durability through the server is in test_durable.py.)"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from securechat.client import Client
from securechat.errors import StorageError
from securechat.server.store import (
    Claim,
    DMQuota,
    HistoryRow,
    QueuedDM,
    QuotaExceeded,
    SenderShareExceeded,
    SQLiteStore,
)
from tests.conftest import start_server

KEY = b"k" * 32
LIMITS = {"ttl_ms": 60_000, "quota": DMQuota(2, 10_000, 2, 10_000)}


def dm(msg_id: str, to: str = "bob", sender: str = "alice") -> QueuedDM:
    return QueuedDM(sender, KEY, to, msg_id, "Ym94", 1_000)


def ids(store: SQLiteStore, user: str = "bob") -> list[str]:
    return [d.msg_id for d in store.pending_dms(user, 2_000)]


def test_a_batch_commits_together_and_a_refused_operation_undoes_only_itself(
    tmp_path: Path,
) -> None:
    path = tmp_path / "db.sqlite"
    store = SQLiteStore(path)
    with store.batch():
        store.queue_dm(dm("first-id1"), **LIMITS)
        assert store.claim_name("carol", KEY) is Claim.NEW
        store.queue_dm(dm("second-id"), **LIMITS)
        with pytest.raises(QuotaExceeded, match="bob's queue of waiting messages is full"):
            store.queue_dm(dm("third-id1"), **LIMITS)
        store.queue_dm(dm("other-id1", to="dave"), **LIMITS)
    store.close()
    reopened = SQLiteStore(path)  # what was committed, as another process would see it
    assert ids(reopened) == ["first-id1", "second-id"]
    assert ids(reopened, "dave") == ["other-id1"]
    assert reopened.claim_name("carol", KEY) is Claim.OWNER


def test_a_batch_that_fails_stores_nothing(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    store = SQLiteStore(path)
    with pytest.raises(RuntimeError), store.batch():
        store.queue_dm(dm("first-id1"), **LIMITS)
        raise RuntimeError("the worker died mid-batch")
    assert ids(store) == []
    store.queue_dm(dm("after-id1"), **LIMITS)  # and the store still works on its own
    assert ids(SQLiteStore(path)) == ["after-id1"]


def test_one_sender_fills_only_its_share_of_a_recipients_queue(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "db.sqlite")
    quota = {"ttl_ms": 60_000, "quota": DMQuota(4, 10_000, 2, 10_000)}
    store.queue_dm(dm("mallory-1", sender="mallory"), **quota)
    store.queue_dm(dm("mallory-2", sender="mallory"), **quota)
    with pytest.raises(SenderShareExceeded) as info:
        store.queue_dm(dm("mallory-3", sender="mallory"), **quota)
    assert str(info.value) == (
        "your share of bob's queue of waiting messages is full (2 messages, 8 bytes from you; "
        "one sender may have at most 2 messages or 10000 bytes waiting for one recipient); "
        "try again when bob has read them"
    )
    store.queue_dm(dm("mallory-4", to="dave", sender="mallory"), **quota)  # others' queues: open
    store.queue_dm(dm("alice-1"), **quota)
    store.queue_dm(dm("alice-2"), **quota)
    # The whole queue is full now; that is the recipient's limit, worded as such.
    with pytest.raises(QuotaExceeded) as info:
        store.queue_dm(dm("carol-1", sender="carol"), **quota)
    assert not isinstance(info.value, SenderShareExceeded)
    assert str(info.value) == (
        "bob's queue of waiting messages is full (4 messages, 16 bytes); try again later"
    )
    assert ids(store) == ["mallory-1", "mallory-2", "alice-1", "alice-2"]


def test_a_senders_share_counts_bytes_too(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "db.sqlite")
    quota = {"ttl_ms": 60_000, "quota": DMQuota(100, 10_000, 100, 6)}
    store.queue_dm(dm("mallory-1", sender="mallory"), **quota)  # 4 bytes of box
    with pytest.raises(SenderShareExceeded, match=r"\(1 messages, 4 bytes from you; .* 6 bytes"):
        store.queue_dm(dm("mallory-2", sender="mallory"), **quota)
    store.queue_dm(dm("alice-1"), **quota)
    assert ids(store) == ["mallory-1", "alice-1"]


def test_a_store_that_cannot_write_says_so(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "db.sqlite")
    store.close()
    with pytest.raises(StorageError, match="server database error"):
        store.claim_name("carol", KEY)


def test_logins_that_arrive_together_share_batches_and_all_succeed(
    certs_dir: Path, tmp_path: Path, make_identity
) -> None:
    server = start_server(certs_dir, tmp_path / "data")
    commits = []
    real_batch = server.store.batch

    def counting_batch():  # type: ignore[no-untyped-def]
        commits.append(1)
        return real_batch()

    server.store.batch = counting_batch  # type: ignore[method-assign]
    names = [f"user{i}" for i in range(24)]
    keys = {name: make_identity(name) for name in names}
    clients: list[Client] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def log_in(name: str) -> None:
        try:
            client = Client.connect(*server.address, keys[name], name, certs_dir / "ca.pem")
        except BaseException as exc:
            errors.append(exc)
            return
        with lock:
            clients.append(client)

    try:
        threads = [threading.Thread(target=log_in, args=(n,)) for n in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert errors == []
        assert sorted(c.user for c in clients) == sorted(names)
        assert commits  # the claims went through batches
    finally:
        for client in clients:
            client.close()
        server.stop()
    store = SQLiteStore(tmp_path / "data" / "securechat.db")
    assert all(store.claim_name(n, keys[n].verify_key_bytes) is Claim.OWNER for n in names)


def test_room_history_keeps_every_field_of_a_batch_in_order(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "server.db")
    try:
        rows = [
            HistoryRow("#a", "alice", 'quotes " and \\ and é \u2603 \U0001f600', 1, False),
            HistoryRow("#b", "bob", "", 2, True),
            HistoryRow("#a", "carol", "third", 3, False),
            HistoryRow("#a", "dave", "fourth", 4, True),
        ]
        store.append_history(rows, keep=2)
        assert store.room_history("#a", 10) == [rows[2], rows[3]]
        assert store.room_history("#b", 10) == [rows[1]]
        assert store.room_history("#a", 1) == [rows[3]]
    finally:
        store.close()


def test_a_batch_longer_than_the_history_kept_stores_only_its_newest_rows(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "server.db")
    try:
        store.append_history([HistoryRow("#a", "old", "before", 0)], keep=3)
        batch = [HistoryRow("#a" if i % 2 else "#b", "u", f"m{i}", i) for i in range(1, 11)]
        store.append_history(batch, keep=3)
        assert [r.text for r in store.room_history("#a", 10)] == ["m5", "m7", "m9"]
        assert [r.text for r in store.room_history("#b", 10)] == ["m6", "m8", "m10"]
        assert store._db.execute("SELECT COUNT(*) FROM room_history").fetchone() == (6,)
    finally:
        store.close()
