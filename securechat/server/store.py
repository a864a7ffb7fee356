"""The server's durable state behind a small interface (Store), so sessions never know which
store they use: names bound to keys, room history, and for DMs (protocol version 2) devices,
their prekeys and one queue of envelopes per device (the SQL is in devicestore.py).

SQLiteStore is the embedded default (WAL mode, a schema version and ordered migrations). A store
is used from one worker thread only, never from an I/O loop, because every call may block.
It holds public keys, DM envelopes (opaque ciphertext it cannot read), room modes and room
history: the text of plain rooms, and only the Megolm ciphertext of end-to-end encrypted rooms;
never a secret, a DM's text or an encrypted room's text.
"""

from __future__ import annotations

import contextlib
import enum
import hmac
import json
import sqlite3
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple, Protocol

from securechat.errors import StorageError
from securechat.protocol import MODE_ENCRYPTED, MODE_PLAIN
from securechat.server import devicestore
from securechat.server.devicestore import (
    MAX_DEVICES,
    MAX_ONE_TIME_KEYS,
    DeviceEntry,
    DeviceEnvelope,
    DeviceStatus,
    Prekey,
    PrekeyCount,
    RevokedDevice,
    StoredDevice,
    UnknownDevice,
)
from securechat.server.quota import DMQuota
from securechat.server.quota import QuotaExceeded as QuotaExceeded
from securechat.server.quota import SenderShareExceeded as SenderShareExceeded

# What refuses one envelope of a batch and leaves the others be.
ENVELOPE_REFUSALS = (UnknownDevice, RevokedDevice, QuotaExceeded)


class Claim(enum.Enum):
    NEW = "new"  # the name was free and is now bound to the key
    OWNER = "owner"  # the name was already bound to this key
    TAKEN = "taken"  # the name belongs to another key


# A room message as the store keeps it: room, sender, text, ts, action, device, session_id. In an
# encrypted room `text` is the Megolm ciphertext (base64, as relayed), `device` the sending device
# and `session_id` its Megolm session; in a plain room both are "". The hub hands the store worker
# a plain tuple of these, made under its lock for every message, so nothing is built for it.
HistoryFields = tuple[str, str, str, int, bool, str, str]


class HistoryRow(NamedTuple):
    """HistoryFields by name (what the store reads back)."""

    room: str
    sender: str
    text: str  # the ciphertext, for an encrypted room's message
    ts: int
    action: bool = False
    device: str = ""
    session_id: str = ""  # "" for a plain room's message

    @property
    def encrypted(self) -> bool:
        return bool(self.session_id)


class Store(Protocol):
    def batch(self) -> contextlib.AbstractContextManager[None]: ...
    def claim_name(self, user: str, public_key: bytes) -> Claim: ...
    def public_key(self, user: str) -> bytes | None: ...
    def append_history(self, rows: Sequence[HistoryFields], keep: int) -> None: ...
    def room_history(self, room: str, limit: int) -> list[HistoryRow]: ...
    def rooms_with_history(self) -> list[str]: ...
    def room_modes(self) -> dict[str, str]: ...
    def put_device(self, entry: DeviceEntry, now_ms: int, *, max_devices: int = ...) -> bool: ...
    def device(self, user: str, device_id: str) -> StoredDevice | None: ...
    def list_devices(self, user: str) -> list[StoredDevice]: ...
    def devices_with_key(self, key: str) -> list[StoredDevice]: ...
    def touch_device(self, user: str, device_id: str, now_ms: int) -> DeviceStatus: ...
    def revoke_device(self, user: str, device_id: str, revocation: str, now_ms: int) -> int: ...
    def publish_prekeys(
        self, user: str, device_id: str, keys: Sequence[Prekey], *, max_one_time: int = ...
    ) -> PrekeyCount: ...
    def prekey_count(self, user: str, device_id: str) -> PrekeyCount: ...
    def claim_prekeys(
        self, user: str, device_ids: Sequence[str] | None = None
    ) -> dict[str, Prekey | None]: ...
    def claim_prekeys_many(
        self, wanted: Sequence[tuple[str, Sequence[str] | None]], *, max_devices: int
    ) -> dict[str, dict[str, Prekey | None]]: ...
    def queue_envelope(self, env: DeviceEnvelope, *, ttl_ms: int, quota: DMQuota) -> None: ...
    def queue_envelopes(
        self, envs: Sequence[DeviceEnvelope], *, ttl_ms: int, quota: DMQuota
    ) -> list[StorageError | None]: ...
    def pending_envelopes(
        self, recipient: str, device_id: str, now_ms: int
    ) -> list[DeviceEnvelope]: ...
    def ack_envelopes(self, recipient: str, device_id: str, msg_ids: list[str]) -> int: ...
    def close(self) -> None: ...


# Each entry moves the schema from version i to i + 1. Append only; never edit a shipped one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE identities (
        user TEXT PRIMARY KEY,
        public_key BLOB NOT NULL,
        created_at INTEGER NOT NULL
    );
    """,
    """
    CREATE TABLE queued_dms (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        recipient TEXT NOT NULL,
        sender TEXT NOT NULL,
        sender_key BLOB NOT NULL,
        msg_id TEXT NOT NULL,
        box TEXT NOT NULL,
        ts INTEGER NOT NULL,
        expires INTEGER NOT NULL,
        UNIQUE (recipient, sender, msg_id)
    );
    CREATE INDEX queued_dms_by_recipient ON queued_dms (recipient, seq);
    CREATE TABLE room_history (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        room TEXT NOT NULL,
        sender TEXT NOT NULL,
        text TEXT NOT NULL,
        ts INTEGER NOT NULL,
        action INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX room_history_by_room ON room_history (room, seq);
    """,
    # Version 2 DMs: devices, their prekeys, and one offline queue per device (devicestore.py).
    """
    CREATE TABLE devices (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        user TEXT NOT NULL,
        device_id TEXT NOT NULL,
        record TEXT NOT NULL,
        curve25519 TEXT NOT NULL,
        ed25519 TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        last_seen_ms INTEGER NOT NULL,
        revocation TEXT,
        revoked_ms INTEGER,
        UNIQUE (user, device_id)
    );
    CREATE INDEX devices_by_curve25519 ON devices (curve25519);
    CREATE INDEX devices_by_ed25519 ON devices (ed25519);
    CREATE TABLE prekeys (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        user TEXT NOT NULL,
        device_id TEXT NOT NULL,
        key_id TEXT NOT NULL,
        fallback INTEGER NOT NULL,
        prekey TEXT NOT NULL,
        UNIQUE (user, device_id, fallback, key_id)
    );
    CREATE INDEX prekeys_by_device ON prekeys (user, device_id, fallback, seq);
    CREATE TABLE device_queue (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        recipient TEXT NOT NULL,
        recipient_device TEXT NOT NULL,
        sender TEXT NOT NULL,
        sender_device TEXT NOT NULL,
        msg_id TEXT NOT NULL,
        ciphertext BLOB NOT NULL,
        ts INTEGER NOT NULL,
        expires INTEGER NOT NULL,
        UNIQUE (recipient, recipient_device, sender, sender_device, msg_id)
    );
    CREATE INDEX device_queue_by_device ON device_queue (recipient, recipient_device, seq);
    CREATE INDEX device_queue_by_expiry ON device_queue (expires);
    """,
    # Version 1 (Box) DMs are no longer sent, and version 2 clients refuse them: their queue goes.
    """
    DROP TABLE queued_dms;
    """,
    # End-to-end encrypted rooms: a room's mode, kept while it has history, and the metadata of
    # an encrypted message (its text column holds the ciphertext). Older history is plaintext, so
    # its rooms are plain.
    """
    CREATE TABLE room_modes (
        room TEXT PRIMARY KEY,
        mode TEXT NOT NULL CHECK (mode IN ('plain', 'encrypted'))
    );
    INSERT INTO room_modes (room, mode) SELECT DISTINCT room, 'plain' FROM room_history;
    ALTER TABLE room_history ADD COLUMN device TEXT;
    ALTER TABLE room_history ADD COLUMN session_id TEXT;
    """,
)


class SQLiteStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except (OSError, sqlite3.Error) as exc:
            raise StorageError(f"cannot open the server database {path}: {exc}") from None

    @property
    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        version = self.schema_version
        if version > len(MIGRATIONS):
            raise StorageError(
                f"{self.path} has schema version {version}, newer than this securechat "
                f"understands ({len(MIGRATIONS)}); upgrade securechat"
            )
        for target in range(version + 1, len(MIGRATIONS) + 1):
            # One script, one transaction: a crash mid-migration leaves the old version intact.
            script = MIGRATIONS[target - 1]
            self._db.executescript(
                f"BEGIN IMMEDIATE; {script} PRAGMA user_version = {target:d}; COMMIT;"
            )

    # -- transactions ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Group commit: the operations inside share one transaction, so one sync to disk.

        Each operation is a savepoint of its own, so one that fails (a full queue, say) undoes
        only itself. Nothing inside is durable until this block ends without raising.
        """
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StorageError(f"server database error: {exc}") from None
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise StorageError(f"server database error: {exc}") from None
            raise

    @contextlib.contextmanager
    def _operation(self) -> Iterator[sqlite3.Connection]:
        """One operation, all or nothing: its own transaction, or a savepoint inside a batch.

        Its own transaction takes the write lock from the start (BEGIN IMMEDIATE), as a batch
        does: an operation that reads then writes (a prekey claim, a quota check) must not
        interleave with another connection's on the same file.
        """
        db, nested = self._db, True
        try:
            nested = db.in_transaction
            db.execute("SAVEPOINT operation" if nested else "BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                if nested:
                    db.execute("ROLLBACK TO operation")
                    db.execute("RELEASE operation")
                else:
                    db.execute("ROLLBACK")
                raise
            db.execute("RELEASE operation" if nested else "COMMIT")
        except sqlite3.Error as exc:
            if not nested and db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            raise StorageError(f"server database error: {exc}") from None

    # -- names -------------------------------------------------------------------------------------

    def claim_name(self, user: str, public_key: bytes) -> Claim:
        with self._operation() as db:
            row = db.execute("SELECT public_key FROM identities WHERE user = ?", (user,)).fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO identities (user, public_key, created_at) VALUES (?, ?, ?)",
                    (user, public_key, int(time.time())),
                )
                return Claim.NEW
            if hmac.compare_digest(bytes(row[0]), public_key):
                return Claim.OWNER
            return Claim.TAKEN

    def public_key(self, user: str) -> bytes | None:
        """The identity key bound to `user`, or None for a name nobody has claimed."""
        try:
            row = self._db.execute(
                "SELECT public_key FROM identities WHERE user = ?", (user,)
            ).fetchone()
        except sqlite3.Error as exc:
            raise StorageError(f"server database error: {exc}") from None
        return None if row is None else bytes(row[0])

    # -- version 2 DMs: devices, prekeys, one queue per device (devicestore.py) -------------------

    def put_device(
        self, entry: DeviceEntry, now_ms: int, *, max_devices: int = MAX_DEVICES
    ) -> bool:
        """Store a device its user published; True if new, False if that record was held.

        RevokedDevice for a revoked id, DeviceConflict for a known id with another record,
        TooManyDevices past `max_devices` devices that are not revoked.
        """
        with self._operation() as db:
            return devicestore.put_device(db, entry, now_ms, max_devices)

    def device(self, user: str, device_id: str) -> StoredDevice | None:
        with self._operation() as db:
            return devicestore.device(db, user, device_id)

    def list_devices(self, user: str) -> list[StoredDevice]:
        """Every device of `user`, revoked ones included (marked), in publication order."""
        with self._operation() as db:
            return devicestore.list_devices(db, user)

    def devices_with_key(self, key: str) -> list[StoredDevice]:
        """The devices (of any user) whose Curve25519 or Ed25519 key is `key`."""
        with self._operation() as db:
            return devicestore.devices_with_key(db, key)

    def touch_device(self, user: str, device_id: str, now_ms: int) -> DeviceStatus:
        """At login: ACTIVE (last seen is now `now_ms`), REVOKED or UNKNOWN (refuse the login)."""
        with self._operation() as db:
            return devicestore.touch_device(db, user, device_id, now_ms)

    def revoke_device(self, user: str, device_id: str, revocation: str, now_ms: int) -> int:
        """Keep the signed revocation; drop the device's prekeys and queued envelopes (returns
        how many envelopes). UnknownDevice for a device never published."""
        with self._operation() as db:
            return devicestore.revoke_device(db, user, device_id, revocation, now_ms)

    def publish_prekeys(
        self,
        user: str,
        device_id: str,
        keys: Sequence[Prekey],
        *,
        max_one_time: int = MAX_ONE_TIME_KEYS,
    ) -> PrekeyCount:
        """Add one-time keys and at most one fallback key (replacing the one held), all or none:
        PrekeyRefused for a key id already held or repeated, or past `max_one_time`."""
        with self._operation() as db:
            return devicestore.publish_prekeys(db, user, device_id, keys, max_one_time)

    def prekey_count(self, user: str, device_id: str) -> PrekeyCount:
        with self._operation() as db:
            return devicestore.prekey_count(db, user, device_id)

    def claim_prekeys(
        self, user: str, device_ids: Sequence[str] | None = None
    ) -> dict[str, Prekey | None]:
        """For each active device of `user` (or of `device_ids`): a one-time key, handed to this
        claimer only, else the fallback key, else None; in one transaction."""
        return self.claim_prekeys_many([(user, device_ids)], max_devices=MAX_DEVICES)[user]

    def claim_prekeys_many(
        self, wanted: Sequence[tuple[str, Sequence[str] | None]], *, max_devices: int
    ) -> dict[str, dict[str, Prekey | None]]:
        """claim_prekeys for each (user, device ids) of `wanted`, in one transaction, keyed by
        user; TooManyClaims (and nothing claimed) past `max_devices` devices in all."""
        with self._operation() as db:
            return devicestore.claim_prekeys(db, wanted, max_devices)

    def queue_envelope(self, env: DeviceEnvelope, *, ttl_ms: int, quota: DMQuota) -> None:
        """Store an envelope for one device (durable once its transaction commits), within the
        device's quota and the sender's share of it. UnknownDevice, RevokedDevice, QuotaExceeded,
        SenderShareExceeded."""
        with self._operation() as db:
            devicestore.queue_envelope(db, env, ttl_ms, quota)

    def queue_envelopes(
        self, envs: Sequence[DeviceEnvelope], *, ttl_ms: int, quota: DMQuota
    ) -> list[StorageError | None]:
        """queue_envelope for each of `envs`, in one transaction: each is refused on its own
        (None where it was stored, else its refusal), in order, so an earlier one counts towards
        a later one's quota. A database failure undoes them all and raises."""
        results: list[StorageError | None] = []
        with self._operation():
            for env in envs:
                try:
                    self.queue_envelope(env, ttl_ms=ttl_ms, quota=quota)
                except ENVELOPE_REFUSALS as exc:
                    results.append(exc)
                else:
                    results.append(None)
        return results

    def pending_envelopes(
        self, recipient: str, device_id: str, now_ms: int
    ) -> list[DeviceEnvelope]:
        with self._operation() as db:
            return devicestore.pending_envelopes(db, recipient, device_id, now_ms)

    def ack_envelopes(self, recipient: str, device_id: str, msg_ids: list[str]) -> int:
        with self._operation() as db:
            return devicestore.ack_envelopes(db, recipient, device_id, msg_ids)

    # -- room history ------------------------------------------------------------------------------

    def append_history(self, rows: Sequence[HistoryFields], keep: int) -> None:
        """Append a batch of room messages in one transaction, keeping the last `keep` per room
        (the batched writer calls this; never once per message on the I/O path). Each room's
        mode is its newest message's: a room has the mode of the messages it takes."""
        # One statement for the whole batch, its rows handed over as one JSON array: executemany
        # would let go of the interpreter lock and take it back for every row, and each time
        # it wants it back while an I/O loop is busy, that loop has to stop and hand it over.
        batch = json.dumps(
            [
                (room, sender, text, ts, int(action), device, session_id)
                for room, sender, text, ts, action, device, session_id in _newest(rows, keep)
            ]
        )
        modes = {row[0]: MODE_ENCRYPTED if row[6] else MODE_PLAIN for row in rows}
        with self._operation() as db:
            db.execute(
                "INSERT INTO room_history (room, sender, text, ts, action, device, session_id) "
                "SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), "
                "json_extract(value, '$[2]'), json_extract(value, '$[3]'), "
                "json_extract(value, '$[4]'), NULLIF(json_extract(value, '$[5]'), ''), "
                "NULLIF(json_extract(value, '$[6]'), '') FROM json_each(?) ORDER BY key",
                (batch,),
            )
            for room, mode in modes.items():
                db.execute(
                    "INSERT INTO room_modes (room, mode) VALUES (?, ?) "
                    "ON CONFLICT (room) DO UPDATE SET mode = excluded.mode",
                    (room, mode),
                )
                db.execute(
                    "DELETE FROM room_history WHERE room = ? AND seq <= COALESCE(("
                    "SELECT seq FROM room_history WHERE room = ? "
                    "ORDER BY seq DESC LIMIT 1 OFFSET ?), -1)",
                    (room, room, keep),
                )

    def room_history(self, room: str, limit: int) -> list[HistoryRow]:
        """The last `limit` messages of a room, oldest first."""
        try:
            rows = self._db.execute(
                "SELECT room, sender, text, ts, action, COALESCE(device, ''), "
                "COALESCE(session_id, '') FROM room_history WHERE room = ? "
                "ORDER BY seq DESC LIMIT ?",
                (room, limit),
            ).fetchall()
        except sqlite3.Error as exc:
            raise StorageError(f"server database error: {exc}") from None
        return [HistoryRow(r[0], r[1], r[2], r[3], bool(r[4]), r[5], r[6]) for r in reversed(rows)]

    def rooms_with_history(self) -> list[str]:
        try:
            return [r[0] for r in self._db.execute("SELECT DISTINCT room FROM room_history")]
        except sqlite3.Error as exc:
            raise StorageError(f"server database error: {exc}") from None

    def room_modes(self) -> dict[str, str]:
        """The mode of each room with history: what the server remembers of rooms across a
        restart (a room without history and without members is forgotten)."""
        try:
            rows = self._db.execute(
                "SELECT room, mode FROM room_modes m WHERE EXISTS "
                "(SELECT 1 FROM room_history h WHERE h.room = m.room)"
            ).fetchall()
        except sqlite3.Error as exc:
            raise StorageError(f"server database error: {exc}") from None
        return dict(rows)

    def close(self) -> None:
        self._db.close()


def _newest(rows: Sequence[HistoryFields], keep: int) -> list[HistoryFields]:
    """The last `keep` rows of each room, in order: a busy room's batch holds hundreds of rows,
    and writing the ones the same batch would delete again is most of its cost."""
    seen: dict[str, int] = {}
    newest = []
    for row in reversed(rows):
        room = row[0]
        count = seen.get(room, 0)
        if count < keep:
            seen[room] = count + 1
            newest.append(row)
    newest.reverse()
    return newest
