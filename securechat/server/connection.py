"""One client connection on the server, driven only by the I/O loop that owns it.

It ties a non-blocking socket, a TLSStream and a ServerSession together: read, feed, act on the
session's events, and write everything queued in one go. Requests go to the hub (rooms) or to
the store-backed handlers in requests.py, through explicit tables checked at import. Only the
owning loop's thread calls anything here (docs/ARCHITECTURE.md, "Threads").
"""

from __future__ import annotations

import logging
import math
import socket
import ssl
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from securechat.errors import ConnectionClosed, ErrorCode, ProtocolError
from securechat.protocol import (
    REQUEST_CLASSES,
    Ack,
    Close,
    LoginVerified,
    Request,
    RequestFrame,
    ServerSession,
    State,
    b64,
)
from securechat.ratelimit import RATE_LIMITED, TokenBucket
from securechat.server import requests
from securechat.server.admission import Refusal
from securechat.server.hub import Hub, RoomRequest
from securechat.server.outbox import Outbox
from securechat.tls import WRITE_CHUNK, TLSStream, client_certificate_problem

if TYPE_CHECKING:
    from securechat.server.context import ServerContext
    from securechat.server.loop import IOLoop

log = logging.getLogger("securechat.server")

RECV_SIZE = 64 * 1024
LINGER = 2.0  # seconds a closing connection may take to flush its last frames
NOT_READING = "outbound queue full: client not reading"  # why one is dropped, as its peers see it
# The kernel's send buffer per connection (Linux doubles it). Left to autotuning it grows to
# tcp_wmem's maximum (4 MiB by default) for a client that does not read: memory the output
# budget cannot see, and records encrypted for nobody. 256 KiB still carries about 2.5 MB/s to a
# client 100 ms away, far more than chat needs.
SEND_BUFFER = 256 * 1024
# Of that, what may wait unsent in the kernel (TCP_NOTSENT_LOWAT, Linux and macOS): bytes in
# flight to a client that reads are not counted, so a far client keeps the whole buffer, while a
# client that does not read (a closed window: nothing is in flight) stops taking at this much.
# Without it each of 1,000 non-readers took about 380 KB of records, encrypted and copied for
# nobody on the I/O thread, while the legitimate members' frames waited behind them.
UNSENT_LIMIT = 16 * 1024


class Connection:
    __slots__ = (
        "_acks", "_counted", "_heard", "_hs_deadline", "_idle_at", "_login_deadline", "_pinged",
        "_rate", "_want_write", "addr", "closing", "ctx", "device", "ip", "loop", "open", "outbox",
        "outbuf", "public_key_b64", "refusal", "session", "sock", "tls", "user",
    )  # fmt: skip

    def __init__(
        self,
        ctx: ServerContext,
        loop: IOLoop,
        sock: socket.socket,
        addr: str,
        ip: str = "",
        refusal: Refusal | None = None,
    ) -> None:
        self.ctx = ctx
        self.loop = loop
        self.sock = sock
        self.addr = addr
        self.ip = ip
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
            if hasattr(socket, "TCP_NOTSENT_LOWAT"):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, UNSENT_LIMIT)
        except OSError:
            pass  # not every platform lets a socket's buffers be set; the budget still holds
        self.refusal = refusal  # over a connection cap: told why after the handshake, then closed
        self.tls = TLSStream(ctx.ssl_context, server_side=True)
        # Encoded frames waiting for the next TLS write: the session's replies (it hands each
        # over as it is made) and the hub's deliveries, in the order they were queued.
        self.outbox = Outbox()
        self.session = ServerSession(ctx.cert_sha256, ctx.config.max_frame, emit=self._emit)
        self.user: str = ""
        self.device = ""  # the device id it logged in as
        self.public_key_b64 = ""
        self.outbuf = bytearray()  # TLS records the socket has not taken yet
        self._counted = 0  # outbuf's memory as last added to the loop's total (the output budget)
        self.open = True
        self.closing: str | None = None
        self._want_write = False
        now = time.monotonic()
        self._hs_deadline = now + ctx.config.handshake_timeout
        self._login_deadline = self._hs_deadline + ctx.config.login_timeout  # set anew later
        self._heard = now  # when the client last sent anything
        self._idle_at = 0.0  # next idle check; 0 until login
        self._pinged = False
        self._rate: TokenBucket | None = None  # requests, from login on
        self._acks: TokenBucket | None = None  # acknowledgements, more generous
        loop.register(self)
        loop.add_deadline(self._hs_deadline, self)

    def _emit(self, data: bytes) -> None:
        self.outbox.push(data)

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
                    self._refuse_connection(self.refusal.code, self.refusal.message)
                    return
                if self.ctx.config.require_client_cert:
                    problem = client_certificate_problem(self.tls.peer_cert_der())
                    if problem is not None:
                        log.info("refusing the client certificate of %s: %s", self.addr, problem)
                        self._refuse_connection(ErrorCode.BAD_CERTIFICATE, problem)
                        return
                # --login-timeout counts from the end of the handshake, as its help says.
                self._login_deadline = time.monotonic() + self.ctx.config.login_timeout
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
        self.loop.mark_dirty(self)

    def on_writable(self) -> None:
        self._send_outbuf()

    def _refuse_connection(self, code: ErrorCode, message: str) -> None:
        """Over a cap, or a client certificate we do not take: say why in the one frame a
        client reads first, then close."""
        close = self.session.close_with_error(code, message)
        self.close_soon(close.reason)

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
        idle = self.ctx.config.idle_timeout
        silent = now - self._heard
        if silent >= idle:
            self.kick(f"idle for {idle:g} seconds")
            return
        if silent >= idle / 2 and not self._pinged:
            self._pinged = True
            self.session.send({"type": "ping"})
            self.loop.mark_dirty(self)
        next_check = self._heard + (idle if self._pinged else idle / 2)
        self._idle_at = max(next_check, now + 0.1)
        self.loop.add_deadline(self._idle_at, self)

    # -- session events ---------------------------------------------------------------------------

    def _on_event(self, event: object) -> None:
        if isinstance(event, Request):
            frame = event.frame
            if self._within_rate(frame):
                self._on_request(frame)
        elif isinstance(event, LoginVerified):
            requests.claim(self, event)
        elif isinstance(event, Close):
            self.close_soon(event.reason)

    def _on_request(self, frame: RequestFrame) -> None:
        handler = requests.HANDLERS.get(type(frame))
        if handler is not None:
            handler(self, frame)  # answered later, from the store worker
            return
        assert isinstance(frame, RoomRequest)  # the rest are the hub's (checked at import)
        hub = self.ctx.hub
        try:
            if type(frame) in Hub.SAYS:
                # What session.send would do with its reply, encoded already.
                self.outbox.push(hub.say(self, frame))  # type: ignore[arg-type]  # a room message
                return
            reply = hub.handle(self, frame)
        except ProtocolError as exc:
            self.session.reply_error(frame.id, ErrorCode(exc.code), exc.message)
        else:
            self.session.send(reply)

    def _within_rate(self, frame: RequestFrame) -> bool:
        """Spend a token for this request; refuse it (and drop a flooder) when there is none."""
        acking = isinstance(frame, Ack)
        # Acks, and a device's publications at login, spend from the more generous bucket.
        bucket = self._rate if frame.TYPE in RATE_LIMITED else self._acks
        if bucket is None:
            return True
        if acking:  # never sent again, so a refused one holds nothing up
            passed = bucket.take(self._heard)
        else:  # requests that clients send again: what passes keeps its order
            passed = bucket.take_in_order(self._heard, getattr(frame, "resume", False))
        if passed:
            return True
        if bucket.flooding:
            log.info("dropping %s (%s): message flood", self.user, self.addr)
            self.kick("message flood: too many messages after being told to slow down")
        elif not isinstance(frame, Ack):  # a dropped ack only means the DM comes again later
            config = self.ctx.config
            self.session.reply_error(
                frame.id,
                ErrorCode.RATE_LIMITED,
                f"slow down: the limit is {config.rate:g} requests a second, in bursts of at "
                f"most {config.burst}; this one was not sent",
                retry_after=_whole_ms_up(bucket.retry_after(self._heard)),
            )
        return False

    def logged_in(self, user: str, public_key: bytes, device: str) -> None:
        """The store bound the name to the key: welcome the client and start its limits."""
        self.user = user
        self.device = device
        self.public_key_b64 = b64(public_key)
        self._start_limits()
        self.session.login_accepted(self.ctx.welcome)

    def _start_limits(self) -> None:
        config, now = self.ctx.config, time.monotonic()
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
        """Encrypt what is queued, 64 KiB at a time while the socket takes it, and send it.

        Once the socket stops taking, the rest stays in the outbox as it is: a room's frames are
        shared there by all its members, while encrypted (or joined) they would be a copy per
        member, made for a client that may never read them. More is taken when it drains.
        """
        if not self.open:
            return
        if self.outbuf and self.closing is None:
            # The socket is full (a room's frames woke every member): only the count changes.
            self._count()
            if self.queued > self.ctx.config.max_queue:
                self.drop_not_reading("outbound queue")
            return
        wrote = False
        while not self.outbuf and self.open:
            data = self.outbox.take(WRITE_CHUNK)
            if not data:
                break
            self._send_records(self.tls.encrypt(data))
            wrote = True
            if len(data) < WRITE_CHUNK:
                break  # take() gave all there was: no second call to find the outbox empty
        if not wrote:
            self._flush_tls()
        if not self._counted and not self.outbuf and self.closing is None:
            return  # the usual end: the socket took it all, so nothing is held to count
        self._count()
        if self.queued > self.ctx.config.max_queue and self.closing is None:
            self.drop_not_reading("outbound queue")
        elif self.closing is not None and not self.outbuf:
            self.abort(self.closing, said=True)

    def _flush_tls(self) -> None:
        self._send_records(self.tls.data_to_send())

    def _send_records(self, out: bytes) -> None:
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
            if self._want_write and self.outbox.backlog():
                self.loop.mark_dirty(self)  # frames waited for the socket: take them now
        self._count()
        want = bool(buf)
        if want != self._want_write:
            self._want_write = want
            self.loop.watch_writable(self, want)
        if not buf and self.closing is not None:
            self.abort(self.closing, said=True)

    def _count(self) -> None:
        """Charge the loop's total (the output budget) with what this connection holds: the
        encrypted buffer's memory, not only its bytes (a buffer drained from the front keeps its
        capacity until it empties), and the frames waiting behind it."""
        buf = self.outbuf
        held = buf.__sizeof__() + self.outbox.backlog() if buf else 0
        if held != self._counted:
            self.loop.queued += held - self._counted
            self._counted = held

    @property
    def queued(self) -> int:
        """Bytes waiting for a socket that would not take them (a client not reading): the
        encrypted ones and the frames not yet taken behind them."""
        buf = self.outbuf
        return len(buf) + self.outbox.backlog() if buf else 0

    # -- closing ----------------------------------------------------------------------------------

    @property
    def charged(self) -> int:
        """What this connection adds to its loop's total for the output budget."""
        return self._counted

    def drop_not_reading(self, limit: str) -> None:
        """Over `--max-queue` or the server's output budget: the same reason either way."""
        log.info("dropping %s (%s): not reading, %s full", self.user or "-", self.addr, limit)
        self.abort(NOT_READING)

    def kick(self, reason: str) -> None:
        """Tell the client why it is being closed, then close once that is written."""
        if self.open and self.closing is None:
            self.session.close(reason)
            self.close_soon(reason)

    def close_soon(self, reason: str) -> None:
        if self.closing is None:
            self.closing = reason
            self.loop.add_deadline(time.monotonic() + LINGER, self)
        self.loop.mark_dirty(self)

    def abort(self, reason: str, *, said: bool = False) -> None:
        """Close now: leave the hub, send close_notify if we can, release the socket.

        `said`: every frame queued for the client has gone (the goodbye that says why among
        them), so the socket is shut for writing and left to the loop to close once the client
        closes too (IOLoop.linger), rather than reset under frames it has not read yet.
        """
        if not self.open:
            return
        self.open = False
        if self.user:
            self.ctx.hub.logout(self, reason)
            log.info("%s left (%s)", self.user, reason)
        if self.tls.handshake_done:
            self.tls.close()
            out = self.tls.data_to_send()
            if out and not self.outbuf:
                try:
                    said = self.sock.send(out) == len(out) and said
                except OSError:
                    said = False
        self.loop.queued -= self._counted
        self._counted = 0
        self.outbuf = bytearray()
        # What it never took goes now: a room's roster may name it as departed for a while.
        self.outbox = Outbox()
        self.loop.unregister(self)
        if said and _shut_for_writing(self.sock):
            self.loop.linger(self.sock)
        else:
            self.sock.close()
        self.ctx.closed(self)


def drop_all_not_reading(conns: Sequence[Connection], limit: str) -> None:
    """drop_not_reading() for many connections of one loop at once: they leave the hub together
    first, so that each room announces their departures in a row (hub.logout_all)."""
    if conns:
        conns[0].ctx.hub.logout_all([c for c in conns if c.user], NOT_READING)
    for conn in conns:
        conn.drop_not_reading(limit)


def _shut_for_writing(sock: socket.socket) -> bool:
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        return False  # the client is gone already: nothing to wait for
    return True


def _whole_ms_up(seconds: float) -> float:
    """Rounded up to the millisecond (a client that waits this long finds a token), but not
    beyond the float noise of a wait that is really zero."""
    return math.ceil(seconds * 1000 - 1e-6) / 1000


def _check_dispatch() -> None:
    """At import: every request the protocol accepts has exactly one handler, here or in the
    hub, and every handler answers a request the protocol accepts."""
    here, hub = set(requests.HANDLERS), set(Hub.HANDLERS)
    if here & hub or here | hub != set(REQUEST_CLASSES):
        raise RuntimeError(
            f"request handlers disagree with the protocol: store {sorted(c.TYPE for c in here)}, "
            f"hub {sorted(c.TYPE for c in hub)}"
        )


_check_dispatch()
