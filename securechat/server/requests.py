"""The requests that need the store: direct messages, key lookups, acknowledgements, and the
name claim that ends a login.

Each handler runs on the connection's I/O loop, hands its store work to the store worker, and
answers from the worker's result, back on that loop. Nothing here blocks or touches a socket.
Room requests (join, part, say, rooms, who, history) are the hub's (hub.py).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from securechat.errors import ErrorCode, ProtocolError, StorageError
from securechat.identity import fingerprint
from securechat.protocol import DM, Ack, Keys, LoginVerified, RequestFrame, State, b64, now_ms
from securechat.server.store import Claim, QueuedDM, QuotaExceeded, Store

if TYPE_CHECKING:
    from securechat.server.connection import Connection

log = logging.getLogger("securechat.server")

DM_FRAME_OVERHEAD = 512  # bytes a relayed DM frame adds around the sealed box


def reply(conn: Connection, request_id: int, result: object, fields: Mapping[str, Any]) -> None:
    """Send the "ok" to a store-backed request, or its error."""
    if not conn.open:
        return
    if isinstance(result, QuotaExceeded):
        conn.session.reply_error(request_id, ErrorCode.QUOTA_EXCEEDED, str(result))
    elif isinstance(result, ProtocolError):
        conn.session.reply_error(request_id, ErrorCode(result.code), result.message)
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


def dm(conn: Connection, frame: DM) -> None:
    """Store the sealed DM durably, then relay it if its recipient is online.

    The sender hears "delivered" or "queued" only once the DM is committed, so a crash of the
    server after that cannot lose it; it leaves the store when the recipient acks it.
    """
    ctx, to = conn.ctx, frame.to
    config = ctx.config
    if len(frame.box) > config.max_frame - DM_FRAME_OVERHEAD:
        # Relayed, it gains the sender's name and key: it must still fit in one frame.
        conn.session.reply_error(
            frame.id, ErrorCode.TOO_LARGE, "this direct message is too large to relay; split it"
        )
        return
    queued = QueuedDM(
        conn.user, conn.session.public_key or b"", to, frame.msg_id, frame.box, now_ms()
    )

    def accept(store: Store) -> QueuedDM:
        if store.public_key(to) is None:
            raise ProtocolError(ErrorCode.NO_SUCH_USER, f"nobody is called {to}")
        store.queue_dm(queued, ttl_ms=config.dm_ttl_ms, quota=config.dm_quota())
        return queued

    def then(result: object) -> None:
        fields: dict[str, Any] = {"to": to, "msg_id": queued.msg_id, "ts": queued.ts}
        if isinstance(result, QueuedDM):
            online = ctx.hub.deliver_dm(queued, conn.public_key_b64, queued=False)
            fields["status"] = "delivered" if online else "queued"
        reply(conn, frame.id, result, fields)

    ctx.worker.run(accept, then, conn.loop)


def ack(conn: Connection, frame: Ack) -> None:
    user, ids = conn.user, list(frame.msg_ids)
    conn.ctx.worker.run(lambda store: store.ack_dms(user, ids), lambda _: None, conn.loop)


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


# The requests answered here; the hub answers the rest (checked in connection.py at import).
HANDLERS: dict[type[RequestFrame], Callable[[Connection, Any], None]] = {
    DM: dm,
    Keys: keys,
    Ack: ack,
}


# -- the end of a login -----------------------------------------------------------------------


def claim(conn: Connection, event: LoginVerified) -> None:
    """Bind the name to the key that proved itself (or learn it belongs to another key)."""
    ctx, ip = conn.ctx, conn.ip

    def bind(store: Store) -> Claim:
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
        return store.claim_name(event.user, event.public_key)

    ctx.worker.run(bind, lambda result: _claimed(conn, event, result), conn.loop)


def _claimed(conn: Connection, event: LoginVerified, result: object) -> None:
    if not conn.open or conn.session.state is not State.AUTHENTICATING:
        return
    if isinstance(result, StorageError):
        log.error("store error during login of %s: %s", event.user, result)
        close = conn.session.close_with_error(ErrorCode.SERVER_ERROR, "server storage error")
        conn.close_soon(close.reason)
    elif isinstance(result, ProtocolError):
        log.info("refused new name %s from %s: %s", event.user, conn.addr, result.message)
        close = conn.session.close_with_error(ErrorCode(result.code), result.message)
        conn.close_soon(close.reason)
    elif result is Claim.TAKEN:
        log.info("refused name %s from %s: bound to another key", event.user, conn.addr)
        close = conn.session.close_with_error(
            ErrorCode.NAME_TAKEN, f'the name "{event.user}" belongs to another identity key'
        )
        conn.close_soon(close.reason)
    else:
        conn.logged_in(event.user, event.public_key)
        old = conn.ctx.hub.login(conn)
        if old is not None:
            old.loop.call_soon(lambda: old.kick("logged in again from elsewhere"))
        _deliver_queue(conn)
        log.info(
            "%s logged in from %s (key %s)%s",
            conn.user,
            conn.addr,
            fingerprint(event.public_key)[:19],
            " (new name)" if result is Claim.NEW else "",
        )
    conn.loop.mark_dirty(conn)


def _deliver_queue(conn: Connection) -> None:
    """After login: everything that waited for us, in order, until we acknowledge it."""
    user, hub = conn.user, conn.ctx.hub

    def then(result: object) -> None:
        if not conn.open:
            return
        if not isinstance(result, list):
            log.error("could not read the DM queue of %s: %s", user, result)
            result = []
        for queued in result:
            hub.deliver_dm(queued, b64(queued.sender_key), queued=True)
        # Same connection, same loop: this frame follows the DMs above.
        conn.session.send({"type": "queue_end", "count": len(result)})
        conn.loop.mark_dirty(conn)

    conn.ctx.worker.run(lambda store: store.pending_dms(user, now_ms()), then, conn.loop)
