"""The server's durable state behind a small interface: which key owns which name.

SQLiteStore is the embedded default (WAL mode, a schema version and ordered migrations). A store
is used from one worker thread only, never from an I/O loop, because every call may block.
It holds public keys and names only: never a secret or a message text.
"""

from __future__ import annotations

import enum
import hmac
import sqlite3
import time
from pathlib import Path
from typing import Protocol

from securechat.errors import StorageError


class Claim(enum.Enum):
    NEW = "new"  # the name was free and is now bound to the key
    OWNER = "owner"  # the name was already bound to this key
    TAKEN = "taken"  # the name belongs to another key


class Store(Protocol):
    def claim_name(self, user: str, public_key: bytes) -> Claim: ...
    def public_key(self, user: str) -> bytes | None: ...
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
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executescript(MIGRATIONS[target - 1])
                self._db.execute(f"PRAGMA user_version = {target:d}")

    def claim_name(self, user: str, public_key: bytes) -> Claim:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            row = self._db.execute(
                "SELECT public_key FROM identities WHERE user = ?", (user,)
            ).fetchone()
            if row is None:
                self._db.execute(
                    "INSERT INTO identities (user, public_key, created_at) VALUES (?, ?, ?)",
                    (user, public_key, int(time.time())),
                )
                result = Claim.NEW
            elif hmac.compare_digest(bytes(row[0]), public_key):
                result = Claim.OWNER
            else:
                result = Claim.TAKEN
            self._db.execute("COMMIT")
            return result
        except sqlite3.Error as exc:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise StorageError(f"server database error: {exc}") from None

    def public_key(self, user: str) -> bytes | None:
        """The identity key bound to `user`, or None for a name nobody has claimed."""
        try:
            row = self._db.execute(
                "SELECT public_key FROM identities WHERE user = ?", (user,)
            ).fetchone()
        except sqlite3.Error as exc:
            raise StorageError(f"server database error: {exc}") from None
        return None if row is None else bytes(row[0])

    def close(self) -> None:
        self._db.close()
