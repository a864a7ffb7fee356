"""One client connection on the server, driven only by the I/O loop that owns it.

It ties a non-blocking socket, a TLSStream and a ServerSession together: read, feed, act on the
session's events, and write everything queued in one go. Blocking work (the store) goes to a
worker thread whose answer comes back through the loop's inbox.
"""

from __future__ import annotations

import logging
import selectors
import socket
import ssl
import time
from typing import TYPE_CHECKING

from securechat.errors import ConnectionClosed, ProtocolError, StorageError
from securechat.identity import fingerprint
from securechat.protocol import (
    Close,
    LoginVerified,
    Request,
    ServerSession,
    State,
    b64,
    error_frame,
    now_ms,
)
from securechat.ratelimit import RATE_LIMITED, TokenBucket
from securechat.server.store import Claim, QueuedDM, QuotaExceeded
from securechat.tls import TLSStream, client_certificate_problem

if TYPE_CHECKING:
    from securechat.server.app import Server
    from securechat.server.loop import IOLoop

log = logging.getLogger("securechat.server")

RECV_SIZE = 64 * 1024
DM_FRAME_OVERHEAD = 512  # bytes a relayed DM frame adds around the sealed box
LINGER = 2.0  # seconds a closing connection may take to flush its last frames


class Connection:
    __slots__ = (
        "_acks", "_heard", "_hs_deadline", "_idle_at", "_login_deadline", "_pinged", "_rate",
        "_want_write", "addr", "closing", "ip", "loop", "open", "outbuf", "pending",
        "public_key_b64", "refusal", "rooms", "server", "session", "sock", "tls", "user",
    )  # fmt: skip

    def __init__(
        self,
        server: Server,
        loop: IOLoop,
        sock: socket.socket,
        addr: str,
        ip: str = "",
        refusal: str | None = None,
    ) -> None:
        self.server = server
        self.loop = loop
        self.sock = sock
        self.addr = addr
        self.ip = ip
        self.refusal = refusal  # over a connection cap: told why after the handshake, then closed
        self.tls = TLSStream(server.ssl_context, server_side=True)
        self.session = ServerSession(server.cert_sha256, server.config.max_frame)
        self.user: str = ""
        self.public_key_b64 = ""
        self.rooms: set[str] = set()
        # Encoded frames waiting for the next TLS write. The session's outbox is this very list,
        # so its replies and the hub's deliveries leave in the order they were queued.
        self.pending: list[bytes] = self.session.outbox
        self.outbuf = bytearray()  # TLS records the socket has not taken yet
        self.open = True
        self.closing: str | None = None
        self._want_write = False
        now = time.monotonic()
        self._hs_deadline = now + server.config.handshake_timeout
        self._login_deadline = self._hs_deadline + server.config.login_timeout  # set anew later
        self._heard = now  # when the client last sent anything
        self._idle_at = 0.0  # next idle check; 0 until login
        self._pinged = False
        self._rate: TokenBucket | None = None  # requests, from login on
        self._acks: TokenBucket | None = None  # acknowledgements, more generous
        loop.connections.add(self)
        loop.selector.register(sock, selectors.EVENT_READ, self)
        loop.add_deadline(self._hs_deadline, self)

    # -- events from the loop ---------------------------------------------------------------------

    def on_readable(self) -> None:
        try:
            data = self.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.abort(f"socket error: {exc.strerror or exc}")
            return
        self._heard = time.monotonic()
        self._pinged = False
        self.tls.feed(data)
        try:
            if not self.tls.handshake_done:
                if not self.tls.do_handshake():
                    self._flush_tls()
                    return
                if self.refusal is not None:
                    full = self.refusal.startswith("the server is full")
                    self._refuse("server_full" if full else "too_many_connections", self.refusal)
                    return
                if self.server.config.require_client_cert:
                    problem = client_certificate_problem(self.tls.peer_cert_der())
                    if problem is not None:
                        log.info("refusing the client certificate of %s: %s", self.addr, problem)
                        self._refuse("bad_certificate", problem)
                        return
                # --login-timeout counts from the end of the handshake, as its help says.
                self._login_deadline = time.monotonic() + self.server.config.login_timeout
                self.loop.add_deadline(self._login_deadline, self)
            plaintext = self.tls.read()
        except ssl.SSLError as exc:
            stage = "TLS" if self.tls.handshake_done else "TLS handshake"
            log.info("%s failed from %s: %s", stage, self.addr, exc.reason or exc)
            self._flush_tls()
            self.abort(f"{stage} error")
            return
        except ConnectionClosed as exc:
            self.abort(exc.reason)
            return
        if plaintext:
            for event in self.session.receive_data(plaintext):
                self._on_event(event)
        self.loop.dirty.add(self)

    def on_writable(self) -> None:
        self._send_outbuf()

    def _refuse(self, code: str, reason: str) -> None:
        """Over a cap, or a client certificate we do not take: say why in the one frame a client
        reads first, then close."""
        self.session.state = State.CLOSING
        self.session.send(error_frame(code, reason))
        self.close_soon(reason)

    def check_deadline(self, now: float) -> None:
        if self.closing is not None:
            self.abort(self.closing)
        elif not self.tls.handshake_done and now >= self._hs_deadline:
            log.info("TLS handshake timed out from %s", self.addr)
            self.abort("TLS handshake timed out")
        elif self.session.state is not State.AUTHENTICATED and now >= self._login_deadline:
            self.session.close("login timed out")
            self.close_soon("login timed out")
        elif self._idle_at and now >= self._idle_at:
            self._check_idle(now)

    def _check_idle(self, now: float) -> None:
        """Silent for half the idle timeout: ping (the client answers pong); for all of it:
        close. Any bytes from the client count as a sign of life."""
        idle = self.server.config.idle_timeout
        silent = now - self._heard
        if silent >= idle:
            self.kick(f"idle for {idle:g} seconds")
            return
        if silent >= idle / 2 and not self._pinged:
            self._pinged = True
            self.session.send({"type": "ping"})
            self.loop.dirty.add(self)
        next_check = self._heard + (idle if self._pinged else idle / 2)
        self._idle_at = max(next_check, now + 0.1)
        self.loop.add_deadline(self._idle_at, self)

    # -- session events ---------------------------------------------------------------------------

    def _on_event(self, event: object) -> None:
        if isinstance(event, Request):
            frame = event.frame
            if not self._within_rate(frame):
                return
            if frame["type"] in self._BLOCKING:
                getattr(self, f"_{frame['type']}")(frame)
                return
            try:
                reply = self.server.hub.handle(self, frame)
            except ProtocolError as exc:
                self.session.reply_error(frame["id"], exc.code, exc.message)
            else:
                self.session.send(reply)
        elif isinstance(event, LoginVerified):
            self.server.run_blocking(
                lambda: self.server.store.claim_name(event.user, event.public_key),
                lambda result: self._on_claim(event, result),
            )
        elif isinstance(event, Close):
            self.close_soon(event.reason)

    def _within_rate(self, frame: dict) -> bool:
        """Spend a token for this request; refuse it (and drop a flooder) when there is none."""
        limited = frame["type"] in RATE_LIMITED
        bucket = self._rate if limited else self._acks
        if bucket is None or bucket.take(self._heard):
            return True
        if bucket.flooding:
            log.info("dropping %s (%s): message flood", self.user, self.addr)
            self.kick("message flood: too many messages after being told to slow down")
        elif limited:  # a dropped ack only means the DM comes again later
            config = self.server.config
            self.session.reply_error(
                frame["id"],
                "rate_limited",
                f"slow down: the limit is {config.rate:g} requests a second, in bursts of at "
                f"most {config.burst}; this one was not sent",
            )
        return False

    # Requests that need the store: answered from the worker thread, never on this loop.
    _BLOCKING = frozenset({"keys", "dm", "ack"})

    def _reply(self, frame: dict, result: object, fields: dict) -> None:
        """Send the reply to a blocking request, or its error."""
        if not self.open:
            return
        if isinstance(result, QuotaExceeded):
            self.session.reply_error(frame["id"], "quota_exceeded", str(result))
        elif isinstance(result, ProtocolError):
            self.session.reply_error(frame["id"], result.code, result.message)
        elif isinstance(result, StorageError):
            log.error("store error for %s: %s", self.user, result)
            self.session.reply_error(frame["id"], "server_error", "server storage error")
        else:
            self.session.send({"type": "ok", "id": frame["id"], **fields})
        self.loop.dirty.add(self)

    def _dm(self, frame: dict) -> None:
        """Store the sealed DM durably, then relay it if its recipient is online.

        The sender hears "delivered" or "queued" only once the DM is committed, so a crash of
        the server after that cannot lose it; it leaves the store when the recipient acks it.
        """
        server, to = self.server, frame["to"]
        if len(frame["box"]) > server.config.max_frame - DM_FRAME_OVERHEAD:
            # Relayed, it gains the sender's name and key: it must still fit in one frame.
            self.session.reply_error(
                frame["id"], "too_large", "this direct message is too large to relay; split it"
            )
            return
        dm = QueuedDM(
            self.user, self.session.public_key or b"", to, frame["msg_id"], frame["box"], now_ms()
        )

        def accept() -> QueuedDM:
            if server.store.public_key(to) is None:
                raise ProtocolError("no_such_user", f"nobody is called {to}")
            server.store.queue_dm(
                dm, ttl_ms=server.config.dm_ttl_ms, quota=server.config.dm_quota()
            )
            return dm

        def then(result: object) -> None:
            fields = {"to": to, "msg_id": dm.msg_id, "ts": dm.ts}
            if isinstance(result, QueuedDM):
                online = server.hub.deliver_dm(dm, self.public_key_b64, queued=False)
                fields["status"] = "delivered" if online else "queued"
            self._reply(frame, result, fields)

        server.run_blocking(accept, then)

    def _ack(self, frame: dict) -> None:
        user, ids = self.user, frame["msg_ids"]
        self.server.run_blocking(lambda: self.server.store.ack_dms(user, ids), lambda _: None)

    def _deliver_queue(self) -> None:
        """After login: everything that waited for us, in order, until we acknowledge it."""
        user, server = self.user, self.server

        def then(result: object) -> None:
            if not self.open:
                return
            if not isinstance(result, list):
                log.error("could not read the DM queue of %s: %s", user, result)
                result = []
            for dm in result:
                server.hub.deliver_dm(dm, b64(dm.sender_key), queued=True)
            # Same connection, same loop: this frame follows the DMs above.
            self.session.send({"type": "queue_end", "count": len(result)})
            self.loop.dirty.add(self)

        server.run_blocking(lambda: server.store.pending_dms(user, now_ms()), then)

    def _keys(self, frame: dict) -> None:
        user = frame["user"]

        def lookup() -> bytes:
            key = self.server.store.public_key(user)
            if key is None:
                raise ProtocolError("no_such_user", f"nobody is called {user}")
            return key

        def answer(result: object) -> None:
            fields = {"user": user, "key": b64(result)} if isinstance(result, bytes) else {}
            self._reply(frame, result, fields)

        self.server.run_blocking(lookup, answer)

    def _on_claim(self, event: LoginVerified, result: object) -> None:
        if not self.open or self.session.state is not State.AUTHENTICATING:
            return
        if isinstance(result, StorageError):
            log.error("store error during login of %s: %s", event.user, result)
            self.close_soon(
                self.session.login_refused("server_error", "server storage error").reason
            )
        elif result is Claim.TAKEN:
            log.info("refused name %s from %s: bound to another key", event.user, self.addr)
            close = self.session.login_refused(
                "name_taken", f'the name "{event.user}" belongs to another identity key'
            )
            self.close_soon(close.reason)
        else:
            self.user = event.user
            self.public_key_b64 = b64(event.public_key)
            self._start_limits()
            self.session.login_accepted(self.server.welcome())
            old = self.server.hub.login(self)
            if old is not None:
                old.loop.call_soon(lambda: old.kick("logged in again from elsewhere"))
            self._deliver_queue()
            log.info(
                "%s logged in from %s (key %s)%s",
                self.user,
                self.addr,
                fingerprint(event.public_key)[:19],
                " (new name)" if result is Claim.NEW else "",
            )
        self.loop.dirty.add(self)

    def _start_limits(self) -> None:
        config, now = self.server.config, time.monotonic()
        self._rate = TokenBucket.full(config.rate, config.burst, now, config.flood_refusals)
        # A client acknowledges each queued DM it gets at login, so acks may come a queue at once.
        self._acks = TokenBucket.full(
            config.rate * 10, max(config.burst, config.dm_quota_count), now, config.flood_refusals
        )
        if config.idle_timeout > 0:
            self._idle_at = now + config.idle_timeout / 2
            self.loop.add_deadline(self._idle_at, self)

    # -- output -----------------------------------------------------------------------------------

    def flush(self) -> None:
        """Encrypt everything queued as one TLS write and hand it to the socket."""
        if not self.open:
            return
        if self.pending:
            data = b"".join(self.pending) if len(self.pending) > 1 else self.pending[0]
            self.pending.clear()
            self.tls.write(data)
        self._flush_tls()
        if len(self.outbuf) > self.server.config.max_queue and self.closing is None:
            log.info(
                "dropping %s (%s): not reading, outbound queue full", self.user or "-", self.addr
            )
            self.abort("outbound queue full: client not reading")
        elif self.closing is not None and not self.outbuf:
            self.abort(self.closing)

    def _flush_tls(self) -> None:
        out = self.tls.data_to_send()
        if not out:
            return
        if self.outbuf:
            self.outbuf += out
        else:
            # The usual case: nothing is waiting, so hand the records straight to the socket and
            # keep only what it did not take (no copy into the buffer first).
            try:
                sent = self.sock.send(out)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self.abort(f"socket error: {exc.strerror or exc}")
                return
            if sent == len(out):
                if self._want_write or self.closing is not None:
                    self._send_outbuf()
                return
            self.outbuf = bytearray(memoryview(out)[sent:])
        self._send_outbuf()

    def _send_outbuf(self) -> None:
        buf = self.outbuf
        while buf:
            try:
                sent = self.sock.send(buf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self.abort(f"socket error: {exc.strerror or exc}")
                return
            del buf[:sent]
        if not buf:
            # Drained: let go of the capacity a burst grew, so an idle connection stays small.
            self.outbuf = buf = bytearray()
        want = bool(buf)
        if want != self._want_write:
            self._want_write = want
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0)
            self.loop.selector.modify(self.sock, events, self)
        if not buf and self.closing is not None:
            self.abort(self.closing)

    # -- closing ----------------------------------------------------------------------------------

    def kick(self, reason: str) -> None:
        """Tell the client why it is being closed, then close once that is written."""
        if self.open and self.closing is None:
            self.session.close(reason)
            self.close_soon(reason)

    def close_soon(self, reason: str) -> None:
        if self.closing is None:
            self.closing = reason
            self.loop.add_deadline(time.monotonic() + LINGER, self)
        self.loop.dirty.add(self)

    def abort(self, reason: str) -> None:
        """Close now: leave the hub, send close_notify if we can, release the socket."""
        if not self.open:
            return
        self.open = False
        if self.user:
            self.server.hub.logout(self, reason)
            log.info("%s left (%s)", self.user, reason)
        if self.tls.handshake_done:
            self.tls.close()
            out = self.tls.data_to_send()
            if out and not self.outbuf:
                try:
                    self.sock.send(out)
                except OSError:
                    pass
        self.loop.connections.discard(self)
        self.loop.dirty.discard(self)
        try:
            self.loop.selector.unregister(self.sock)
        except (KeyError, ValueError):
            pass
        self.sock.close()
        self.server.connection_closed(self)
