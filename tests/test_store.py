"""The SQLite store on real files: group commit, and one failed operation in a batch undoing only
itself. (Crash durability through the server is in test_durable.py; devices, prekeys and the
per-device queues and their quotas in test_device_store.py.)"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from securechat.client import Client
from securechat.errors import StorageError
from securechat.server.store import Claim, DMQuota, HistoryRow, QuotaExceeded, SQLiteStore
from tests.conftest import start_server
from tests.test_device_store import envelope, new_device, pending

KEY = b"k" * 32
LIMITS = {"ttl_ms": 60_000, "quota": DMQuota(2, 10_000, 2, 10_000)}


def test_a_batch_commits_together_and_a_refused_operation_undoes_only_itself(
    tmp_path: Path, make_identity
) -> None:
    path = tmp_path / "db.sqlite"
    store = SQLiteStore(path)
    _, phone = new_device(make_identity("bob"), "bob")
    with store.batch():
        assert store.put_device(phone, 1_000)
        store.queue_envelope(envelope("first-id1", phone.device_id), **LIMITS)
        assert store.claim_name("carol", KEY) is Claim.NEW
        store.queue_envelope(envelope("second-id", phone.device_id), **LIMITS)
        with pytest.raises(QuotaExceeded, match="bob's queue of waiting messages for device"):
            store.queue_envelope(envelope("third-id1", phone.device_id), **LIMITS)
        assert store.claim_name("dave", KEY) is Claim.NEW
    store.close()
    reopened = SQLiteStore(path)  # what was committed, as another process would see it
    assert pending(reopened, phone.device_id) == ["first-id1", "second-id"]
    assert reopened.claim_name("carol", KEY) is Claim.OWNER
    assert reopened.claim_name("dave", KEY) is Claim.OWNER


def test_a_batch_that_fails_stores_nothing(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    store = SQLiteStore(path)
    with pytest.raises(RuntimeError), store.batch():
        assert store.claim_name("carol", KEY) is Claim.NEW
        raise RuntimeError("the worker died mid-batch")
    assert store.public_key("carol") is None
    assert store.claim_name("dave", KEY) is Claim.NEW  # and the store still works on its own
    assert SQLiteStore(path).public_key("dave") == KEY


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


def test_a_rooms_mode_is_kept_with_its_history_and_encrypted_rows_keep_their_metadata(
    tmp_path: Path,
) -> None:
    store = SQLiteStore(tmp_path / "server.db")
    try:
        sealed = HistoryRow("#team", "alice", "AAEC", 1, False, "ABCDEFGHIJKLMNOP", "s1")
        store.append_history([HistoryRow("#open", "bob", "hi", 2), sealed], keep=5)
        assert store.room_history("#team", 5) == [sealed]
        assert store.room_modes() == {"#open": "plain", "#team": "encrypted"}
        # A mode without history is not remembered (the room would be forgotten once empty).
        store._db.execute("INSERT INTO room_modes (room, mode) VALUES ('#gone', 'encrypted')")
        assert "#gone" not in store.room_modes()
    finally:
        store.close()
