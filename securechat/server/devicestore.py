"""The server's tables for version 2 DMs: each user's devices (signed records and revocations),
their prekeys, and one offline queue per device.

Each function runs inside one store operation (its own transaction, or a savepoint of a batch)
on the connection SQLiteStore passes in; SQLiteStore wraps each as a method. Records, prekeys and
envelopes are kept as the opaque forms clients published or sent: clients check every signature
against the identity they pinned. What only the store can promise is bookkeeping: a one-time key
goes to one claimer, a revoked device gets nothing more, and every table is bounded per user.
"""

from __future__ import annotations

import enum
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from securechat.errors import StorageError
from securechat.server.quota import DMQuota, check_quota

MAX_DEVICES = 32  # devices one user may have that are not revoked
# Revoked devices stay on record for good, so that a revoked id can never be published again;
# this bounds how many a user may ever accumulate.
MAX_DEVICE_RECORDS = 1024
# One-time keys held per device: the client publishes at most 25 at a time (e2e/prekeys.py).
MAX_ONE_TIME_KEYS = 100


class DeviceStatus(enum.Enum):
    ACTIVE = "active"  # published and not revoked
    REVOKED = "revoked"  # its user revoked it: no login, no DMs, no prekeys
    UNKNOWN = "unknown"  # never published


class UnknownDevice(StorageError):
    """No such device has been published for that user."""


class RevokedDevice(StorageError):
    """The device was revoked; it may not log in, publish, or receive DMs."""


class TooManyDevices(StorageError):
    """The user has as many devices as one person may have; a new one was refused."""


class DeviceConflict(StorageError):
    """A device id was published again with another record; a device's keys never change."""


class PrekeyRefused(StorageError):
    """A batch of prekeys was refused as a whole (a key id already held, too many keys)."""


class TooManyClaims(StorageError):
    """A claim names more devices than one request may claim for; nothing was claimed."""


@dataclass(frozen=True)
class DeviceEntry:
    """A device as its user publishes it. `record` is the signed device record, as the server
    relays it; the keys and creation time are copies of its fields, for lookups and listings."""

    user: str
    device_id: str
    record: str
    curve25519: str
    ed25519: str
    created_ms: int


@dataclass(frozen=True)
class StoredDevice:
    entry: DeviceEntry
    last_seen_ms: int  # the last login, or the publication
    revocation: str | None  # the signed revocation as published; None while the device counts
    revoked_ms: int | None  # when the server stored the revocation

    @property
    def revoked(self) -> bool:
        return self.revocation is not None


@dataclass(frozen=True)
class Prekey:
    """One signed prekey of a device, in the form its device published it."""

    key_id: str
    prekey: str
    fallback: bool


@dataclass(frozen=True)
class PrekeyCount:
    """What a device holds on the server: the figure it replenishes by."""

    one_time: int
    fallback: bool


@dataclass(frozen=True)
class DeviceEnvelope:
    """An Olm envelope for one device, waiting for that device's acknowledgement."""

    recipient: str
    recipient_device: str
    sender: str  # the authenticated sending user
    sender_device: str
    msg_id: str
    ciphertext: bytes  # opaque: version byte, Olm message type, Olm ciphertext
    ts: int  # when the server accepted it, ms


_DEVICE_COLUMNS = (
    "user, device_id, record, curve25519, ed25519, created_ms, last_seen_ms, revocation, revoked_ms"
)


def _device(row: tuple[Any, ...]) -> StoredDevice:
    return StoredDevice(DeviceEntry(*row[:6]), row[6], row[7], row[8])


# -- devices ---------------------------------------------------------------------------------------


def status(db: sqlite3.Connection, user: str, device_id: str) -> DeviceStatus:
    row = db.execute(
        "SELECT revocation IS NOT NULL FROM devices WHERE user = ? AND device_id = ?",
        (user, device_id),
    ).fetchone()
    if row is None:
        return DeviceStatus.UNKNOWN
    return DeviceStatus.REVOKED if row[0] else DeviceStatus.ACTIVE


def require_active(db: sqlite3.Connection, user: str, device_id: str) -> None:
    """UnknownDevice or RevokedDevice unless `device_id` is one of `user`'s current devices."""
    found = status(db, user, device_id)
    if found is DeviceStatus.UNKNOWN:
        raise UnknownDevice(f"{user} has no device {device_id}")
    if found is DeviceStatus.REVOKED:
        raise RevokedDevice(f"{user}'s device {device_id} was revoked")


def put_device(db: sqlite3.Connection, entry: DeviceEntry, now_ms: int, max_devices: int) -> bool:
    """Store a published device; True if it is new, False if that very record was already held."""
    held = device(db, entry.user, entry.device_id)
    if held is not None:
        if held.revoked:
            raise RevokedDevice(
                f"{entry.user}'s device {entry.device_id} was revoked; a revoked device cannot "
                "be published again"
            )
        if held.entry != entry:
            raise DeviceConflict(
                f"{entry.user}'s device {entry.device_id} was published before with another "
                "record; a device's keys never change (make a new device instead)"
            )
        return False
    active, total = db.execute(
        "SELECT COALESCE(SUM(revocation IS NULL), 0), COUNT(*) FROM devices WHERE user = ?",
        (entry.user,),
    ).fetchone()
    if active >= max_devices:
        raise TooManyDevices(
            f"{entry.user} already has {active} devices, the most one person may have; revoke "
            "one first"
        )
    if total >= MAX_DEVICE_RECORDS:
        raise TooManyDevices(
            f"{entry.user} has published {total} devices, the most this server keeps; no more "
            "can be added"
        )
    db.execute(
        "INSERT INTO devices (user, device_id, record, curve25519, ed25519, created_ms,"
        " last_seen_ms) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            entry.user,
            entry.device_id,
            entry.record,
            entry.curve25519,
            entry.ed25519,
            entry.created_ms,
            now_ms,
        ),
    )
    return True


def device(db: sqlite3.Connection, user: str, device_id: str) -> StoredDevice | None:
    row = db.execute(
        f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE user = ? AND device_id = ?",  # noqa: S608
        (user, device_id),
    ).fetchone()
    return None if row is None else _device(row)


def list_devices(db: sqlite3.Connection, user: str) -> list[StoredDevice]:
    """Every device `user` published, revoked ones included, in the order they were published."""
    rows = db.execute(
        f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE user = ? ORDER BY seq",  # noqa: S608
        (user,),
    ).fetchall()
    return [_device(r) for r in rows]


def devices_with_key(db: sqlite3.Connection, key: str) -> list[StoredDevice]:
    """The devices whose Curve25519 or Ed25519 key is `key` (any user), oldest first."""
    rows = db.execute(
        f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE curve25519 = ? OR ed25519 = ?"  # noqa: S608
        " ORDER BY seq",
        (key, key),
    ).fetchall()
    return [_device(r) for r in rows]


def touch_device(db: sqlite3.Connection, user: str, device_id: str, now_ms: int) -> DeviceStatus:
    """A device logs in: note the time if it is active; say what it is either way."""
    found = status(db, user, device_id)
    if found is DeviceStatus.ACTIVE:
        db.execute(
            "UPDATE devices SET last_seen_ms = MAX(last_seen_ms, ?) "
            "WHERE user = ? AND device_id = ?",
            (now_ms, user, device_id),
        )
    return found


def revoke_device(
    db: sqlite3.Connection, user: str, device_id: str, revocation: str, now_ms: int
) -> int:
    """Mark a device revoked and drop its prekeys and its queue; returns how many envelopes
    waiting for it were dropped. Revoking it again keeps the first revocation and drops nothing."""
    found = status(db, user, device_id)
    if found is DeviceStatus.UNKNOWN:
        raise UnknownDevice(f"{user} has no device {device_id}")
    if found is DeviceStatus.REVOKED:
        return 0
    db.execute(
        "UPDATE devices SET revocation = ?, revoked_ms = ? WHERE user = ? AND device_id = ?",
        (revocation, now_ms, user, device_id),
    )
    db.execute("DELETE FROM prekeys WHERE user = ? AND device_id = ?", (user, device_id))
    return db.execute(
        "DELETE FROM device_queue WHERE recipient = ? AND recipient_device = ?", (user, device_id)
    ).rowcount


# -- prekeys ---------------------------------------------------------------------------------------


def prekey_count(db: sqlite3.Connection, user: str, device_id: str) -> PrekeyCount:
    require_active(db, user, device_id)
    one_time, fallback = db.execute(
        "SELECT COALESCE(SUM(NOT fallback), 0), COALESCE(SUM(fallback), 0) "
        "FROM prekeys WHERE user = ? AND device_id = ?",
        (user, device_id),
    ).fetchone()
    return PrekeyCount(one_time, fallback > 0)


def publish_prekeys(
    db: sqlite3.Connection,
    user: str,
    device_id: str,
    keys: Sequence[Prekey],
    max_one_time: int,
) -> PrekeyCount:
    """Add one-time keys and at most one fallback key (which replaces the one held), all or none.

    A key id the device already holds for that kind of key, or one given twice, refuses the
    whole batch: a one-time key handed out twice would lose its forward secrecy.
    """
    require_active(db, user, device_id)
    fallbacks = [k for k in keys if k.fallback]
    if len(fallbacks) > 1:
        raise PrekeyRefused(f"{len(fallbacks)} fallback keys were published at once; one at most")
    # vodozemac numbers one-time and fallback keys apart, so an id is unique within its kind.
    ids = [(k.fallback, k.key_id) for k in keys]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    held = db.execute(
        "SELECT fallback, key_id FROM prekeys WHERE user = ? AND device_id = ?", (user, device_id)
    ).fetchall()
    repeated += sorted({(bool(f), k) for f, k in held}.intersection(ids))
    if repeated:
        kind = "fallback" if repeated[0][0] else "one-time"
        raise PrekeyRefused(
            f"{kind} key id {repeated[0][1]} is already held for {user}'s device {device_id}; "
            "no key of this batch was stored"
        )
    count = prekey_count(db, user, device_id)
    one_time = count.one_time + len(keys) - len(fallbacks)
    if one_time > max_one_time:
        raise PrekeyRefused(
            f"{user}'s device {device_id} would hold {one_time} one-time keys, more than "
            f"{max_one_time}; no key of this batch was stored"
        )
    if fallbacks:
        db.execute(
            "DELETE FROM prekeys WHERE user = ? AND device_id = ? AND fallback",
            (user, device_id),
        )
    db.executemany(
        "INSERT INTO prekeys (user, device_id, key_id, fallback, prekey) VALUES (?, ?, ?, ?, ?)",
        [(user, device_id, k.key_id, int(k.fallback), k.prekey) for k in keys],
    )
    return PrekeyCount(one_time, bool(fallbacks) or count.fallback)


def claim_prekey(db: sqlite3.Connection, user: str, device_id: str) -> Prekey | None:
    """Take one one-time key of the device (the oldest), else its fallback key, else None.

    The caller's transaction holds the write lock from its start (BEGIN IMMEDIATE), so the
    select and the delete cannot interleave with another claimer's: each one-time key is handed
    out once. The fallback key stays until a new one replaces it.
    """
    row = db.execute(
        "SELECT seq, key_id, prekey FROM prekeys WHERE user = ? AND device_id = ? AND NOT fallback"
        " ORDER BY seq LIMIT 1",
        (user, device_id),
    ).fetchone()
    if row is not None:
        if db.execute("DELETE FROM prekeys WHERE seq = ?", (row[0],)).rowcount != 1:
            raise StorageError(f"a one-time key of {user}'s device {device_id} vanished mid-claim")
        return Prekey(row[1], row[2], fallback=False)
    row = db.execute(
        "SELECT key_id, prekey FROM prekeys WHERE user = ? AND device_id = ? AND fallback",
        (user, device_id),
    ).fetchone()
    return None if row is None else Prekey(row[0], row[1], fallback=True)


def claim_prekeys(
    db: sqlite3.Connection,
    wanted: Sequence[tuple[str, Sequence[str] | None]],
    max_devices: int,
) -> dict[str, dict[str, Prekey | None]]:
    """For each (user, device ids) of `wanted`: one prekey per active device of that user (or
    of those of the ids that are active). More than `max_devices` devices in all refuses the
    whole claim before any key is taken, so a refusal costs no device a one-time key."""
    plan: dict[str, list[str]] = {}
    for user, device_ids in wanted:
        active = [
            r[0]
            for r in db.execute(
                "SELECT device_id FROM devices WHERE user = ? AND revocation IS NULL ORDER BY seq",
                (user,),
            )
        ]
        plan[user] = active if device_ids is None else [d for d in active if d in set(device_ids)]
    total = sum(len(ids) for ids in plan.values())
    if total > max_devices:
        raise TooManyClaims(
            f"this claim is for {total} devices; one request may claim prekeys for at most "
            f"{max_devices} (split it)"
        )
    return {user: {d: claim_prekey(db, user, d) for d in ids} for user, ids in plan.items()}


# -- one offline queue per device ------------------------------------------------------------------


def queue_envelope(
    db: sqlite3.Connection, env: DeviceEnvelope, ttl_ms: int, quota: DMQuota
) -> None:
    """Store an envelope for an active device, within that device's quota and the sender's share
    of it. The same envelope sent again (same devices, sender and id) is stored once."""
    require_active(db, env.recipient, env.recipient_device)
    waiting = (
        "SELECT COUNT(*), COALESCE(SUM(LENGTH(ciphertext)), 0) FROM device_queue "
        "WHERE recipient = ? AND recipient_device = ? AND expires > ?"
    )
    device_key = (env.recipient, env.recipient_device, env.ts)
    check_quota(
        quota,
        len(env.ciphertext),
        db.execute(waiting, device_key).fetchone(),
        db.execute(waiting + " AND sender = ?", (*device_key, env.sender)).fetchone(),
        env.recipient,
        env.recipient_device,
    )
    db.execute(
        "INSERT OR IGNORE INTO device_queue (recipient, recipient_device, sender, sender_device,"
        " msg_id, ciphertext, ts, expires) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            env.recipient,
            env.recipient_device,
            env.sender,
            env.sender_device,
            env.msg_id,
            env.ciphertext,
            env.ts,
            env.ts + ttl_ms,
        ),
    )


def pending_envelopes(
    db: sqlite3.Connection, recipient: str, device_id: str, now_ms: int
) -> list[DeviceEnvelope]:
    """The device's unexpired envelopes in the order they were accepted; drops expired ones."""
    db.execute("DELETE FROM device_queue WHERE expires <= ?", (now_ms,))
    rows = db.execute(
        "SELECT recipient, recipient_device, sender, sender_device, msg_id, ciphertext, ts "
        "FROM device_queue WHERE recipient = ? AND recipient_device = ? ORDER BY seq",
        (recipient, device_id),
    ).fetchall()
    return [DeviceEnvelope(r[0], r[1], r[2], r[3], r[4], bytes(r[5]), r[6]) for r in rows]


def ack_envelopes(
    db: sqlite3.Connection, recipient: str, device_id: str, msg_ids: list[str]
) -> int:
    """Delete what the device acknowledged (its own queue only); returns how many were deleted."""
    cur = db.executemany(
        "DELETE FROM device_queue WHERE recipient = ? AND recipient_device = ? AND msg_id = ?",
        [(recipient, device_id, m) for m in msg_ids],
    )
    return cur.rowcount
