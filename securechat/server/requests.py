"""The requests that need the store: direct messages between devices, devices and prekeys, key
lookups, acknowledgements, and the name claim that ends a login.

Each handler runs on the connection's I/O loop, hands its store work to the store worker, and
answers from the worker's result, back on that loop. Nothing here blocks or touches a socket.
Room requests (join, part, say, rooms, who, history) are the hub's (hub.py). Device records,
revocations and prekeys are checked against the identity key bound to the name before they are
stored: clients check them again against the key they pinned, so this only keeps junk out.
"""

from __future__ import annotations

import base64
import json
import logging
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from securechat.e2e import prekeys as e2e_prekeys
from securechat.e2e import records
from securechat.errors import (
    DeviceRecordError,
    ErrorCode,
    PrekeyError,
    ProtocolError,
    SecureChatError,
    StorageError,
)
from securechat.identity import fingerprint
from securechat.protocol import (
    DM,
    Ack,
    ClaimPrekeys,
    Devices,
    DMs,
    Envelope,
    Keys,
    LoginVerified,
    PrekeyCount,
    PublishDevice,
    PublishPrekeys,
    RequestFrame,
    Revoke,
    State,
    b64,
    claim_devices_max,
    now_ms,
)
from securechat.server.devicestore import (
    DeviceConflict,
    DeviceEntry,
    DeviceEnvelope,
    DeviceStatus,
    Prekey,
    PrekeyRefused,
    RevokedDevice,
    TooManyClaims,
    TooManyDevices,
    UnknownDevice,
)
from securechat.server.store import Claim, QuotaExceeded, Store

if TYPE_CHECKING:
    from securechat.server.app import ServerConfig
    from securechat.server.connection import Connection
    from securechat.server.hub import Hub

log = logging.getLogger("securechat.server")

DM_FRAME_OVERHEAD = 512  # bytes a relayed DM frame adds around the envelope
PREKEY_LOW = 6  # below this many one-time keys a device is told to replenish (it keeps up to 25)

# The store's refusals that are the client's business, not a store failure.
_REFUSALS: tuple[tuple[type[StorageError], ErrorCode], ...] = (
    (QuotaExceeded, ErrorCode.QUOTA_EXCEEDED),
    (UnknownDevice, ErrorCode.NO_SUCH_DEVICE),
    (RevokedDevice, ErrorCode.DEVICE_REVOKED),
    (TooManyDevices, ErrorCode.TOO_MANY_DEVICES),
    (DeviceConflict, ErrorCode.DEVICE_CONFLICT),
    (PrekeyRefused, ErrorCode.PREKEYS_REFUSED),
    (TooManyClaims, ErrorCode.TOO_LARGE),
)


def _canonical(value: Mapping[str, Any]) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _error_of(result: object) -> tuple[ErrorCode, str] | None:
    """The error code and message a refusal is answered with; None for anything else."""
    refusal = next((code for cls, code in _REFUSALS if isinstance(result, cls)), None)
    if refusal is not None:
        return refusal, str(result)
    if isinstance(result, ProtocolError):
        return ErrorCode(result.code), result.message
    return None


def reply(conn: Connection, request_id: int, result: object, fields: Mapping[str, Any]) -> None:
    """Send the "ok" to a store-backed request, or its error."""
    if not conn.open:
        return
    error = _error_of(result)
    if error is not None:
        conn.session.reply_error(request_id, *error)
    elif isinstance(result, StorageError):
        # The store failed us, not the client: say so and close, as the protocol promises.
        log.error("store error for %s: %s", conn.user, result)
        close = conn.session.close_with_error(
            ErrorCode.SERVER_ERROR, "server storage error", request_id
        )
        conn.close_soon(close.reason)
    else:
        conn.session.send({"type": "ok", "id": request_id, **fields})
    conn.loop.mark_dirty(conn)


def _bound_key(conn: Connection) -> bytes:
    assert conn.session.public_key is not None  # only logged-in connections make requests
    return conn.session.public_key


def dm(conn: Connection, frame: DM) -> None:
    """Store one envelope for one device durably, then relay it if that device is online.

    The sender hears "delivered" or "queued" only once the envelope is committed, so a crash of
    the server after that cannot lose it; it leaves the store when its device acks it.
    """
    env = _envelope(conn, frame, now_ms())
    if isinstance(env, ProtocolError):
        conn.session.reply_error(frame.id, ErrorCode(env.code), env.message)
        return
    ctx, config = conn.ctx, conn.ctx.config

    def then(result: object) -> None:
        if isinstance(result, list):
            (result,) = result
        fields: dict[str, Any] = {"msg_id": env.msg_id, "ts": env.ts}
        if isinstance(result, DeviceEnvelope):
            fields["status"] = _relay(ctx.hub, result)
        reply(conn, frame.id, result, fields)

    ctx.worker.run(lambda store: _accept(store, [env], config), then, conn.loop)


def dms(conn: Connection, frame: DMs) -> None:
    """`dm` for many devices at once (a room key to every member's devices): each envelope is
    checked as its `dm` would be, the accepted ones are stored in one transaction (durable
    before the reply) and relayed, and the reply holds one result per envelope, in order."""
    ctx, config, ts = conn.ctx, conn.ctx.config, now_ms()
    envs = [_envelope(conn, item, ts) for item in frame.messages]

    def then(result: object) -> None:
        fields: dict[str, Any] = {}
        if isinstance(result, list):
            pairs = zip(frame.messages, result, strict=True)
            items = [_item_result(ctx.hub, m.msg_id, r) for m, r in pairs]
            fields = {"ts": ts, "results": items}
            if len(_canonical(fields)) > config.max_frame - DM_FRAME_OVERHEAD:
                for item in items:  # many long refusals: the codes alone still fit
                    item.pop("message", None)
        reply(conn, frame.id, result, fields)

    ctx.worker.run(lambda store: _accept(store, envs, config), then, conn.loop)


def _envelope(conn: Connection, item: DM | Envelope, ts: int) -> DeviceEnvelope | ProtocolError:
    """The envelope a `dm` (or an item of a `dms`) asks to store, or why it is refused."""
    if len(item.data) > conn.ctx.config.max_frame - DM_FRAME_OVERHEAD:
        # Relayed, it gains the sender's name and device: it must still fit in one frame.
        return ProtocolError(
            ErrorCode.TOO_LARGE, "this direct message is too large to relay; split it"
        )
    if item.user not in (item.to, conn.user):
        return ProtocolError(
            ErrorCode.BAD_FIELD,
            'field "user" must be "to" or yourself (a copy for your other devices)',
        )
    data = base64.b64decode(item.data)
    return DeviceEnvelope(item.user, item.device, conn.user, conn.device, item.msg_id, data, ts)


def _accept(
    store: Store, envs: list[DeviceEnvelope | ProtocolError], config: ServerConfig
) -> list[DeviceEnvelope | SecureChatError]:
    """On the store worker: queue each envelope (one transaction), or say why not, in order."""
    known: dict[str, bool] = {}
    checked: list[DeviceEnvelope | SecureChatError] = []
    for env in envs:
        if isinstance(env, DeviceEnvelope):
            if env.recipient not in known:
                known[env.recipient] = store.public_key(env.recipient) is not None
            if not known[env.recipient]:
                env = ProtocolError(ErrorCode.NO_SUCH_USER, f"nobody is called {env.recipient}")
        checked.append(env)
    todo = [env for env in checked if isinstance(env, DeviceEnvelope)]
    refusals = iter(store.queue_envelopes(todo, ttl_ms=config.dm_ttl_ms, quota=config.dm_quota()))
    return [(next(refusals) or env) if isinstance(env, DeviceEnvelope) else env for env in checked]


def _relay(hub: Hub, env: DeviceEnvelope) -> str:
    """Hand a stored envelope to its device: the status its sender hears."""
    return "delivered" if hub.deliver_dm(env, queued=False) else "queued"


def _item_result(hub: Hub, msg_id: str, result: object) -> dict[str, Any]:
    """One envelope's line in a `dms` reply: relayed, or its error as `dm` would answer it."""
    if isinstance(result, DeviceEnvelope):
        return {"msg_id": msg_id, "status": _relay(hub, result)}
    code, message = _error_of(result) or (ErrorCode.SERVER_ERROR, "server storage error")
    return {"msg_id": msg_id, "status": "error", "code": code, "message": message}


def ack(conn: Connection, frame: Ack) -> None:
    user, device, ids = conn.user, conn.device, list(frame.msg_ids)
    conn.ctx.worker.run(
        lambda store: store.ack_envelopes(user, device, ids), lambda _: None, conn.loop
    )


def keys(conn: Connection, frame: Keys) -> None:
    user = frame.user

    def lookup(store: Store) -> bytes:
        key = store.public_key(user)
        if key is None:
            raise ProtocolError(ErrorCode.NO_SUCH_USER, f"nobody is called {user}")
        return key

    def answer(result: object) -> None:
        fields = {"user": user, "key": b64(result)} if isinstance(result, bytes) else {}
        reply(conn, frame.id, result, fields)

    conn.ctx.worker.run(lookup, answer, conn.loop)


def publish_device(conn: Connection, frame: PublishDevice) -> None:
    try:
        record = records.verify_device(dict(frame.record), conn.user, _bound_key(conn))
    except DeviceRecordError as exc:
        conn.session.reply_error(frame.id, ErrorCode.BAD_RECORD, f"device record refused: {exc}")
        return
    if record.device_id != conn.device:
        conn.session.reply_error(
            frame.id,
            ErrorCode.BAD_RECORD,
            f"device record refused: it is for device {record.device_id}, but this connection "
            f"logged in as device {conn.device}",
        )
        return
    entry = DeviceEntry(
        record.user,
        record.device_id,
        _canonical(frame.record),
        record.curve25519,
        record.ed25519,
        record.created_ms,
    )
    conn.ctx.worker.run(
        lambda store: store.put_device(entry, now_ms()),
        lambda result: reply(
            conn, frame.id, result, {"device_id": entry.device_id, "new": result is True}
        ),
        conn.loop,
    )


DEVICES_REPLY_OVERHEAD = 256  # bytes of a `devices` reply besides its entries and name lists


def _device_entry(store: Store, user: str) -> dict[str, Any] | None:
    """What `devices` tells of one user, or None for a name nobody has claimed."""
    key = store.public_key(user)
    if key is None:
        return None
    found = store.list_devices(user)
    return {
        "key": b64(key),
        "devices": [json.loads(d.entry.record) for d in found],
        "revocations": [json.loads(d.revocation) for d in found if d.revocation],
        "seen": [
            {
                "device_id": d.entry.device_id,
                "last_seen_ms": d.last_seen_ms,
                "revoked_ms": d.revoked_ms,
            }
            for d in found
        ],
    }


def device_lists(store: Store, users: tuple[str, ...], budget: int) -> dict[str, Any]:
    """The reply to a `devices` request for several users: their entries in the order asked
    while they fit in `budget` bytes of JSON (the first always goes, as a one-user reply would),
    then `more`, the names left for another request. A name nobody has claimed goes to
    `unknown` rather than failing the others. One store job, so one transaction (the worker
    runs each round of jobs in one)."""
    entries: dict[str, Any] = {}
    unknown: list[str] = []
    for i, user in enumerate(users):
        entry = _device_entry(store, user)
        if entry is None:
            unknown.append(user)
            continue
        budget -= len(_canonical(entry).encode()) + len(user.encode()) + 4  # "name":...,
        if budget < 0 and entries:
            return {"users": entries, "unknown": unknown, "more": list(users[i:])}
        entries[user] = entry
    return {"users": entries, "unknown": unknown, "more": []}


def devices(conn: Connection, frame: Devices) -> None:
    user, users = frame.user, frame.users

    def lookup(store: Store) -> dict[str, Any]:
        if users is not None:
            # Every name may come back in `unknown` or `more`: room for them all is kept.
            names = sum(len(u.encode()) + 3 for u in users)
            budget = conn.ctx.config.max_frame - DEVICES_REPLY_OVERHEAD - names
            return device_lists(store, users, budget)
        assert user is not None  # the frame names one or the other
        entry = _device_entry(store, user)
        if entry is None:
            raise ProtocolError(ErrorCode.NO_SUCH_USER, f"nobody is called {user}")
        return {"user": user, **entry}

    conn.ctx.worker.run(
        lookup,
        lambda result: reply(conn, frame.id, result, result if isinstance(result, dict) else {}),
        conn.loop,
    )


def publish_prekeys(conn: Connection, frame: PublishPrekeys) -> None:
    user, device, key = conn.user, conn.device, _bound_key(conn)
    wire = [dict(k) for k in frame.keys]

    def publish(store: Store) -> object:
        held = store.device(user, device)
        if held is None:
            raise UnknownDevice(f"publish the record of device {device} before its prekeys")
        try:
            record = records.verify_device(json.loads(held.entry.record), user, key)
            checked = [e2e_prekeys.verify_prekey(k, record) for k in wire]
        except (DeviceRecordError, PrekeyError) as exc:
            raise ProtocolError(ErrorCode.BAD_RECORD, f"prekeys refused: {exc}") from None
        batch = [Prekey(k.key_id, _canonical(k.to_wire()), k.fallback) for k in checked]
        return store.publish_prekeys(user, device, batch)

    def then(result: object) -> None:
        fields = _count_fields(result)
        reply(conn, frame.id, result, fields)

    conn.ctx.worker.run(publish, then, conn.loop)


def _count_fields(result: object) -> dict[str, Any]:
    one_time, fallback = getattr(result, "one_time", 0), getattr(result, "fallback", False)
    return {"count": one_time, "fallback": fallback}


def prekey_count(conn: Connection, frame: PrekeyCount) -> None:
    user, device = conn.user, conn.device
    conn.ctx.worker.run(
        lambda store: store.prekey_count(user, device),
        lambda result: reply(conn, frame.id, result, _count_fields(result)),
        conn.loop,
    )


def claim_prekeys(conn: Connection, frame: ClaimPrekeys) -> None:
    """Hand out one prekey per device (each one-time key to one claimer only), for one user or
    many in one transaction, and tell a device that is running low to replenish."""
    hub, wanted = conn.ctx.hub, frame.wanted()
    most = claim_devices_max(conn.ctx.config.max_frame)

    def claim(store: Store) -> tuple[dict[str, Any], dict[tuple[str, str], Any]]:
        claimed = store.claim_prekeys_many(wanted, max_devices=most)
        keys = {
            user: {d: None if k is None else json.loads(k.prekey) for d, k in found.items()}
            for user, found in claimed.items()
        }
        counts = {(u, d): store.prekey_count(u, d) for u, found in claimed.items() for d in found}
        return keys, counts

    def then(result: object) -> None:
        if isinstance(result, tuple):
            keys, counts = result
            for (user, device), count in counts.items():
                if count.one_time < PREKEY_LOW:
                    hub.tell_device(user, device, {"type": "prekey_count", **_count_fields(count)})
            if frame.user is None:
                result = {"users": keys}
            else:
                result = {"user": frame.user, "keys": keys[frame.user]}
        reply(conn, frame.id, result, result if isinstance(result, dict) else {})

    conn.ctx.worker.run(claim, then, conn.loop)


def revoke(conn: Connection, frame: Revoke) -> None:
    """Any logged-in device of a user may revoke any device of theirs (the identity key signed
    the revocation); the revoked device is disconnected and gets nothing more."""
    user, hub = conn.user, conn.ctx.hub
    try:
        revocation = records.verify_revocation(dict(frame.revocation), user, _bound_key(conn))
    except DeviceRecordError as exc:
        conn.session.reply_error(frame.id, ErrorCode.BAD_RECORD, f"revocation refused: {exc}")
        return
    device, text = revocation.device_id, _canonical(frame.revocation)

    def then(result: object) -> None:
        if isinstance(result, int):
            target = hub.device_connection(user, device)
            if target is not None:
                target.loop.call_soon(lambda: target.kick("this device was revoked"))
            log.info("%s revoked device %s", user, device)
        reply(conn, frame.id, result, {"device_id": device, "dropped": result})

    conn.ctx.worker.run(
        lambda store: store.revoke_device(user, device, text, now_ms()), then, conn.loop
    )


# The requests answered here; the hub answers the rest (checked in connection.py at import).
HANDLERS: dict[type[RequestFrame], Callable[[Connection, Any], None]] = {
    DM: dm,
    DMs: dms,
    Keys: keys,
    Ack: ack,
    PublishDevice: publish_device,
    Devices: devices,
    PublishPrekeys: publish_prekeys,
    PrekeyCount: prekey_count,
    ClaimPrekeys: claim_prekeys,
    Revoke: revoke,
}


# -- the end of a login -----------------------------------------------------------------------


def claim(conn: Connection, event: LoginVerified) -> None:
    """Bind the name to the key that proved itself (or learn it belongs to another key), and
    learn whether the device logging in was revoked."""
    ctx, ip = conn.ctx, conn.ip

    def bind(store: Store) -> tuple[Claim, DeviceStatus | None]:
        # On the store worker, so the check and the claim cannot interleave with another's.
        names = ctx.new_names
        if names is not None and not names.trusted(ip) and store.public_key(event.user) is None:
            now = ctx.clock()
            if not names.allow(ip, now):
                minutes = math.ceil(names.retry_after(ip, now) / 60)
                raise ProtocolError(
                    ErrorCode.TOO_MANY_NAMES,
                    f"too many new names from your address (at most {ctx.config.new_names} an "
                    f"hour); log in with a name you already have, or try again in {minutes} "
                    f"minute{'' if minutes == 1 else 's'}",
                )
        claimed = store.claim_name(event.user, event.public_key)
        if claimed is Claim.TAKEN:
            return claimed, None
        return claimed, store.touch_device(event.user, event.device, now_ms())

    ctx.worker.run(bind, lambda result: _claimed(conn, event, result), conn.loop)


def _claimed(conn: Connection, event: LoginVerified, result: object) -> None:
    if not conn.open or conn.session.state is not State.AUTHENTICATING:
        return
    claimed, status = result if isinstance(result, tuple) else (result, None)
    if isinstance(result, StorageError):
        log.error("store error during login of %s: %s", event.user, result)
        close = conn.session.close_with_error(ErrorCode.SERVER_ERROR, "server storage error")
        conn.close_soon(close.reason)
    elif isinstance(result, ProtocolError):
        log.info("refused new name %s from %s: %s", event.user, conn.addr, result.message)
        close = conn.session.close_with_error(ErrorCode(result.code), result.message)
        conn.close_soon(close.reason)
    elif claimed is Claim.TAKEN:
        log.info("refused name %s from %s: bound to another key", event.user, conn.addr)
        close = conn.session.close_with_error(
            ErrorCode.NAME_TAKEN, f'the name "{event.user}" belongs to another identity key'
        )
        conn.close_soon(close.reason)
    elif status is DeviceStatus.REVOKED:
        log.info("refused revoked device %s of %s from %s", event.device, event.user, conn.addr)
        close = conn.session.close_with_error(
            ErrorCode.DEVICE_REVOKED, "this device was revoked; it cannot log in"
        )
        conn.close_soon(close.reason)
    else:
        conn.logged_in(event.user, event.public_key, event.device)
        old = conn.ctx.hub.login(conn)
        if old is not None:
            old.loop.call_soon(lambda: old.kick("logged in again from elsewhere"))
        _deliver_queue(conn)
        log.info(
            "%s logged in from %s (key %s, device %s)%s",
            conn.user,
            conn.addr,
            fingerprint(event.public_key)[:19],
            event.device,
            " (new name)" if claimed is Claim.NEW else "",
        )
    conn.loop.mark_dirty(conn)


def _deliver_queue(conn: Connection) -> None:
    """After login: everything that waited for this device, in order, until it acknowledges it."""
    user, device, hub = conn.user, conn.device, conn.ctx.hub

    def then(result: object) -> None:
        if not conn.open:
            return
        if not isinstance(result, list):
            log.error("could not read the DM queue of %s/%s: %s", user, device, result)
            result = []
        for queued in result:
            hub.deliver_dm(queued, queued=True)
        # Same connection, same loop: this frame follows the DMs above.
        conn.session.send({"type": "queue_end", "count": len(result)})
        conn.loop.mark_dirty(conn)

    conn.ctx.worker.run(
        lambda store: store.pending_envelopes(user, device, now_ms()), then, conn.loop
    )
