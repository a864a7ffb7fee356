"""The client's local history: every DM and room message it saw or sent, encrypted at rest.

One SQLite file beside the key file (alice.key -> alice.history.db, mode 0600). Each row is a
SecretBox blob (the entry as JSON, padded to a multiple of PAD bytes so lengths leak less) and two
keyed-hash tags: one naming the entry, so a redelivered DM or a room message replayed as history
is stored once, and one naming its conversation, so `/history @bob` reads only bob's rows. Both
keys come from the identity's secret seed, which only the passphrase unseals; without it the file
shows how many entries there are, roughly how long, and which belong together, but no name and
no word. Search decrypts and scans, newest first: a chat history is small enough for that, and a
searchable index would leak the words.

Each row is bound to its place: the sealed entry holds every field its two tags are made from
(conversation; sender and id, or room, sender, time and text), so reading recomputes both tags
and refuses a row whose stored tags differ. A row moved to another conversation, or a blob copied
onto another row, is counted in Recalled.refused and reported, never shown. An entry must also
have the shape of its conversation: "@peer" rows are DMs (a message id, a valid name), "#room"
rows are room lines. Files written before this check have the same format and are read the same
way (no migration); a room line that an older client filed under "@peer" because a server sent it
there is refused as malformed.
"""

from __future__ import annotations

import hmac
import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nacl.encoding
import nacl.exceptions
import nacl.hash
import nacl.secret

from securechat.errors import SecureChatError
from securechat.identity import Identity
from securechat.protocol import valid_name, valid_room

SCHEMA_VERSION = 1
PAD = 64
_CHECK = b"securechat local history"  # sealed in the file: tells a wrong identity apart


class HistoryError(SecureChatError):
    """The local history cannot be opened or written; the message says what to do."""


@dataclass(frozen=True)
class Entry:
    """One remembered message. `conversation` is "#room" or "@peer" (the other side of a DM)."""

    conversation: str
    sender: str
    text: str
    ts: int  # milliseconds since the epoch (server time for rooms, sender's time for DMs)
    action: bool = False
    msg_id: str = ""  # DMs only


class Recalled(list[Entry]):
    """Entries read back, oldest first; `refused` counts rows that failed their checks (altered,
    moved between conversations, or not the shape of their conversation) and were left out."""

    def __init__(self, entries: list[Entry], refused: int = 0) -> None:
        super().__init__(entries)
        self.refused = refused


def well_formed(entry: Entry) -> bool:
    """Whether `entry` has the shape of its conversation: "@peer" holds only DMs (with a message
    id) and "#room" only room lines, each under a valid name."""
    where, name = entry.conversation[:1], entry.conversation[1:]
    if valid_name(entry.sender):
        return False
    if where == "@":
        return bool(entry.msg_id) and not valid_name(name) and not entry.action
    return where == "#" and not entry.msg_id and not valid_room(entry.conversation)


def history_path(key_path: Path) -> Path:
    """The history file beside an identity's key file: alice.key -> alice.history.db."""
    key_path = Path(key_path)
    return key_path.with_name(f"{key_path.stem or key_path.name}.history.db")


class LocalHistory:
    """Thread-safe: the connection thread records while the UI thread reads."""

    def __init__(self, path: Path, identity: Identity) -> None:
        self.path = Path(path)
        self._box = nacl.secret.SecretBox(identity.subkey(b"sc-history-box"))
        self._tag_key = identity.subkey(b"sc-history-tag")
        self._lock = threading.Lock()
        self.failure: str | None = None  # set once a write failed; recording then stops
        self._db = self._open()

    @classmethod
    def beside(cls, identity: Identity) -> LocalHistory:
        if identity.path is None:
            raise HistoryError("an identity without a key file has no place for a local history")
        return cls(history_path(identity.path), identity)

    def _open(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Create it 0600 before SQLite does (SQLite gives its side files the same mode).
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
            os.chmod(self.path, 0o600)
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            with db:
                db.execute("BEGIN IMMEDIATE")
                db.execute("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v BLOB)")
                db.execute(
                    "CREATE TABLE IF NOT EXISTS entries (seq INTEGER PRIMARY KEY,"
                    " tag BLOB UNIQUE NOT NULL, conv BLOB NOT NULL, blob BLOB NOT NULL)"
                )
                db.execute("CREATE INDEX IF NOT EXISTS entries_conv ON entries (conv, seq)")
                rows = dict(db.execute("SELECT k, v FROM meta"))
                if not rows:
                    db.execute("INSERT INTO meta VALUES ('version', ?)", (SCHEMA_VERSION,))
                    db.execute("INSERT INTO meta VALUES ('check', ?)", (self._box.encrypt(_CHECK),))
                    rows = {"version": SCHEMA_VERSION}
        except (OSError, sqlite3.Error) as exc:
            raise HistoryError(
                f"cannot open the local history {self.path}: {exc}; "
                "use --no-history to chat without it"
            ) from None
        if rows.get("version") != SCHEMA_VERSION:
            db.close()
            raise HistoryError(
                f"the local history {self.path} has format {rows.get('version')!r}, which this "
                "version does not read; move it aside or use --no-history"
            )
        if "check" in rows and not self._opens(rows["check"]):
            db.close()
            raise HistoryError(
                f"the local history {self.path} belongs to another identity key; "
                "move it aside or use --no-history"
            )
        return db

    def _opens(self, blob: bytes) -> bool:
        try:
            self._box.decrypt(blob)
        except nacl.exceptions.CryptoError:
            return False
        return True

    def _tag(self, *parts: str) -> bytes:
        data = json.dumps(parts, ensure_ascii=False).encode()
        return nacl.hash.blake2b(
            data, digest_size=16, key=self._tag_key, encoder=nacl.encoding.RawEncoder
        )

    def _entry_tag(self, entry: Entry) -> bytes:
        if entry.msg_id:  # a DM: its sender and id name it, however often it is delivered
            return self._tag("dm", entry.sender, entry.msg_id)
        return self._tag(
            "room", entry.conversation, entry.sender, str(entry.ts), str(entry.action), entry.text
        )

    # -- writing ----------------------------------------------------------------------------------

    def add(self, entry: Entry) -> bool:
        """Remember `entry`; False if it was already there, recording has stopped, or it is not
        of the shape of its conversation (see well_formed: "@peer" keeps only DMs)."""
        if not well_formed(entry):
            return False
        plain = json.dumps(asdict(entry), ensure_ascii=False).encode()
        plain += b" " * (-len(plain) % PAD)
        with self._lock:
            if self.failure is not None:
                return False
            try:
                cur = self._db.execute(
                    "INSERT OR IGNORE INTO entries (tag, conv, blob) VALUES (?, ?, ?)",
                    (
                        self._entry_tag(entry),
                        self._tag("conv", entry.conversation),
                        self._box.encrypt(plain),
                    ),
                )
            except sqlite3.Error as exc:
                # The chat goes on; /history and /search say why the record stopped.
                self.failure = f"recording stopped: {exc}"
                return False
            return cur.rowcount == 1

    # -- reading ----------------------------------------------------------------------------------

    def seen_dm(self, sender: str, msg_id: str) -> bool:
        """Whether the DM `msg_id` from `sender` is already remembered (shown before)."""
        try:
            rows = self._query(
                "SELECT 1 FROM entries WHERE tag = ?", self._tag("dm", sender, msg_id)
            )
        except HistoryError:
            return False  # the replay guard still stands; a lost history must not stop DMs
        return bool(rows)

    def conversation(self, name: str, limit: int = 100) -> Recalled:
        """The last `limit` entries of "#room" or "@peer", oldest first."""
        rows = self._query(
            "SELECT tag, conv, blob FROM entries WHERE conv = ? ORDER BY seq DESC LIMIT ?",
            self._tag("conv", name),
            limit,
        )
        opened = [self._open_entry(*row) for row in rows]
        entries = [e for e in opened if e is not None]
        return Recalled(sorted(entries, key=lambda e: e.ts), len(opened) - len(entries))

    def search(self, words: str, limit: int = 50) -> Recalled:
        """The newest `limit` entries whose text holds every word (any case), oldest first."""
        wanted = words.casefold().split()
        found: list[Entry] = []
        refused = 0
        if not wanted:
            return Recalled(found)
        for entry in self._newest_first():
            if entry is None:
                refused += 1
                continue
            text = entry.text.casefold()
            if all(w in text for w in wanted):
                found.append(entry)
                if len(found) >= limit:
                    break
        return Recalled(sorted(found, key=lambda e: e.ts), refused)

    def __len__(self) -> int:
        return int(self._query("SELECT count(*) FROM entries")[0][0])

    def _query(self, sql: str, *params: object) -> list[Any]:
        with self._lock:
            try:
                return self._db.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise HistoryError(f"cannot read the local history {self.path}: {exc}") from None

    def _newest_first(self, batch: int = 500) -> Iterator[Entry | None]:
        """Every row's entry, newest first; None for a row that failed its checks."""
        last = None
        while True:
            rows = self._query(
                "SELECT seq, tag, conv, blob FROM entries WHERE seq < coalesce(?, 9e18)"
                " ORDER BY seq DESC LIMIT ?",
                last,
                batch,
            )
            if not rows:
                return
            for seq, tag, conv, blob in rows:
                last = seq
                yield self._open_entry(tag, conv, blob)

    def _open_entry(self, tag: bytes, conv: bytes, blob: bytes) -> Entry | None:
        """The row's entry, or None when the row is damaged, not where it was written (its tags
        are not the ones its sealed content makes), or not the shape of its conversation. Such
        a row is left out, not fatal: the rest of the history stays readable."""
        try:
            record: dict[str, Any] = json.loads(self._box.decrypt(blob))
            entry = Entry(**record)
            placed = hmac.compare_digest(self._entry_tag(entry), tag) and hmac.compare_digest(
                self._tag("conv", entry.conversation), conv
            )
            return entry if placed and well_formed(entry) else None
        except (nacl.exceptions.CryptoError, ValueError, TypeError, AttributeError):
            return None

    def close(self) -> None:
        with self._lock:
            self.failure = self.failure or "the local history is closed"
            self._db.close()
