"""One client connection on the server, driven only by the I/O loop that owns it.

It ties a non-blocking ssl.SSLSocket and a ServerSession together: read, feed, act on the
session's events, and write everything queued in one go, straight through the SSLSocket (no
memory BIOs: no copy of each record and two fewer calls a write, and about 2 KiB less a
connection; docs/ARCHITECTURE.md, "The TLS socket"). Requests go to the hub (rooms) or to
the store-backed handlers in requests.py, through explicit tables checked at import. Only the
owning loop's thread calls anything here (docs/ARCHITECTURE.md, "Threads").
"""

from __future__ import annotations

import logging
import math
import os
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
from securechat.tls import READ_CHUNK, WRITE_CHUNK, client_certificate_problem

if TYPE_CHECKING:
    from securechat.server.context import ServerContext
    from securechat.server.loop import IOLoop

log = logging.getLogger("securechat.server")

LINGER = 2.0  # seconds a closing connection may take to flush its last frames
NOT_READING = "outbound queue full: client not reading"  # why one is dropped, as its peers see it
# The kernel's send buffer per connection (Linux doubles it). Left to autotuning it grows to
# tcp_wmem's maximum (4 MiB by default) for a client that does not read: memory the output
# budget cannot see, and records encrypted for nobody. 256 KiB still carries about 2.5 MB/s to a
# client 100 ms away, far more than chat needs.
SEND_BUFFER = 256 * 1024


class Connection:
    __slots__ = (
        "_acks", "_counted", "_heard", "_hs_deadline", "_idle_at", "_login_deadline", "_pinged",
        "_rate", "_want_write", "addr", "closing", "ctx", "device", "handshake_done", "ip", "loop",
        "open", "outbox", "public_key_b64", "refusal", "session", "sock", "unsent", "user",
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
        self.addr = addr
        self.ip = ip
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        except OSError:
            pass  # not every platform lets a socket's buffer be set; the budget still holds
        self.refusal = refusal  # over a connection cap: told why after the handshake, then closed
        # Made here, on the loop's thread, which owns it from now on (the listener only accepted
        # the plain socket). Ragged EOFs raise, so a missing close_notify is told apart.
        self.sock = ctx.ssl_context.wrap_socket(
            sock, server_side=True, do_handshake_on_connect=False, suppress_ragged_eofs=False
        )
        self.handshake_done = False
        # Encoded frames waiting for the next TLS write: the session's replies (it hands each
        # over as it is made) and the hub's deliveries, in the order they were queued.
        self.outbox = Outbox()
        self.session = ServerSession(ctx.cert_sha256, ctx.config.max_frame, emit=self._emit)
        self.user: str = ""
        self.device = ""  # the device id it logged in as
        self.public_key_b64 = ""
        # Plaintext of the TLS write the socket stopped (SSLWantWriteError). OpenSSL holds its
        # encrypted records; the write must be retried with this same buffer before any other.
        self.unsent: bytes | memoryview = b""
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
        self._heard = time.monotonic()  # bytes (or the end of them) arrived: a sign of life
        self._pinged = False
        self._receive()
        if self.unsent and not self._want_write and self.open:
            self._send_unsent()  # a write that wanted the peer's bytes (SSLWantReadError)

    def on_writable(self) -> None:
        if self.handshake_done:
            self._send_unsent()
        else:
            self._receive()  # the socket had no room for all of the handshake's flight

    def _receive(self) -> None:
        """Advance the handshake, then read and act on what the client sent."""
        try:
            if not self.handshake_done:
                if not self._handshake():
                    return
                if self.refusal is not None:
                    self._refuse_connection(self.refusal.code, self.refusal.message)
                    return
                if self.ctx.config.require_client_cert:
                    der = self.sock.getpeercert(binary_form=True)
                    problem = client_certificate_problem(der)
                    if problem is not None:
                        log.info("refusing the client certificate of %s: %s", self.addr, problem)
                        self._refuse_connection(ErrorCode.BAD_CERTIFICATE, problem)
                        return
                # --login-timeout counts from the end of the handshake, as its help says.
                self._login_deadline = time.monotonic() + self.ctx.config.login_timeout
                self.loop.add_deadline(self._login_deadline, self)
            plaintext = self._read()
        except ssl.SSLError as exc:
            # OpenSSL has already written its alert, if any, to the socket.
            stage = "TLS" if self.handshake_done else "TLS handshake"
            log.info("%s failed from %s: %s", stage, self.addr, exc.reason or exc)
            self.abort(f"{stage} error")
            return
        except ConnectionClosed as exc:
            self.abort(exc.reason)
            return
        except OSError as exc:
            self.abort(f"socket error: {exc.strerror or exc}")
            return
        if plaintext:
            for event in self.session.receive_data(plaintext):
                self._on_event(event)
        self.loop.mark_dirty(self)

    def _handshake(self) -> bool:
        """Advance the handshake; True once it is complete. Raises ssl.SSLError on failure."""
        try:
            self.sock.do_handshake()
        except ssl.SSLWantReadError:
            return False
        except ssl.SSLWantWriteError:
            self._watch_writable(True)
            return False
        self.handshake_done = True
        self._watch_writable(False)
        return True

    def _read(self) -> bytes:
        """All application data the socket holds (b"" if none yet).

        OpenSSL reads one record a call, so this reads until it wants more. Raises
        ConnectionClosed when the peer closed, ssl.SSLError on a bad record or an alert (under
        TLS 1.3 a refused client certificate shows up here).
        """
        chunks: list[bytes] = []
        recv = self.sock.recv
        while True:
            try:
                chunk = recv(READ_CHUNK)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                break
            except ssl.SSLEOFError:
                if chunks:
                    break
                raise ConnectionClosed("connection closed without TLS close_notify") from None
            if not chunk:  # the peer's close_notify
                if chunks:
                    break
                raise ConnectionClosed("peer closed the TLS session")
            chunks.append(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _refuse_connection(self, code: ErrorCode, message: str) -> None:
        """Over a cap, or a client certificate we do not take: say why in the one frame a
        client reads first, then close."""
        close = self.session.close_with_error(code, message)
        self.close_soon(close.reason)

    def check_deadline(self, now: float) -> None:
        if self.closing is not None:
            self.abort(self.closing)
        elif not self.handshake_done and now >= self._hs_deadline:
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
        """Encrypt and send what is queued, 64 KiB at a time while the socket takes it.

        Once the socket stops taking, the rest stays in the outbox as it is: a room's frames are
        shared there by all its members, while encrypted (or joined) they would be a copy per
        member, made for a client that may never read them. More is taken when it drains.
        """
        if not self.open:
            return
        if self.unsent:
            if self._want_write and self.closing is None:
                # The socket is full (a room's frames woke every member): only the count changes.
                self._count()
                if self.queued > self.ctx.config.max_queue:
                    self.drop_not_reading("outbound queue")
                return
            if not self._want_write:
                self._send_unsent()  # it wanted the peer's bytes: maybe they came
        while not self.unsent and self.open:
            data = self.outbox.take(WRITE_CHUNK)
            if not data:
                break
            self._write(data)
            if len(data) < WRITE_CHUNK:
                break  # take() gave all there was: no second call to find the outbox empty
        if not self.open:
            return
        self._count()
        if self.queued > self.ctx.config.max_queue and self.closing is None:
            self.drop_not_reading("outbound queue")
        elif self.closing is not None and not self.unsent:
            self.abort(self.closing)

    def _write(self, data: bytes | memoryview) -> None:
        """One SSL_write. Without SSL_MODE_ENABLE_PARTIAL_WRITE (CPython does not set it) it
        either takes all of data or wants to be called again with the same buffer: OpenSSL
        keeps the records it made of part of it and carries on from there (CPython sets
        SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER, so the same bytes at another address will do)."""
        try:
            self.sock.send(data)
        except ssl.SSLWantWriteError:
            self.unsent = data
            self._watch_writable(True)
        except ssl.SSLWantReadError:  # renegotiation is off; kept for the peer's next bytes
            self.unsent = data
        except OSError as exc:
            self.abort(f"socket error: {exc.strerror or exc}")
        else:
            if self.unsent:
                self.unsent = b""
                self._watch_writable(False)

    def _send_unsent(self) -> None:
        """The socket has room again: finish the write it stopped, then take more."""
        if not self.unsent:
            self._watch_writable(False)
            return
        self._write(self.unsent)
        if not self.open or self.unsent:
            return
        self._count()
        if self.closing is not None:
            self.abort(self.closing)
        elif self.outbox.backlog():
            self.loop.mark_dirty(self)  # frames waited for the socket: take them now

    def _watch_writable(self, want: bool) -> None:
        if want != self._want_write:
            self._want_write = want
            self.loop.watch_writable(self, want)

    def _count(self) -> None:
        """Charge the loop's total (the output budget) with what this connection holds: the
        plaintext of a write the socket stopped and the frames waiting behind it. (OpenSSL's
        own buffer adds at most one record, about 16 KiB, of what it already encrypted.)"""
        held = self.queued
        if held != self._counted:
            self.loop.queued += held - self._counted
            self._counted = held

    @property
    def queued(self) -> int:
        """Bytes waiting for a socket that would not take them (a client not reading): the
        plaintext of the stopped write and the frames not yet taken behind it."""
        unsent = self.unsent
        return len(unsent) + self.outbox.backlog() if unsent else 0

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

    def abort(self, reason: str) -> None:
        """Close now: leave the hub, send close_notify if we can, release the socket."""
        if not self.open:
            return
        self.open = False
        if self.user:
            self.ctx.hub.logout(self, reason)
            log.info("%s left (%s)", self.user, reason)
        if self.handshake_done and not self.unsent:
            # close_notify, best effort. Not while a write is unfinished: OpenSSL must not start
            # another record before it; a client not reading gets no alert, as before.
            try:
                self.sock.unwrap()
            except (OSError, ValueError):
                pass
        self.loop.queued -= self._counted
        self._counted = 0
        self.unsent = b""
        # What it never took goes now: a room's roster may name it as departed for a while.
        self.outbox = Outbox()
        self.loop.unregister(self)
        _discard_unread(self.sock)
        self.sock.close()
        self.ctx.closed(self)


def drop_all_not_reading(conns: Sequence[Connection], limit: str) -> None:
    """drop_not_reading() for many connections of one loop at once: they leave the hub together
    first, so that each room announces their departures in a row (hub.logout_all)."""
    if conns:
        conns[0].ctx.hub.logout_all([c for c in conns if c.user], NOT_READING)
    for conn in conns:
        conn.drop_not_reading(limit)


def _discard_unread(sock: socket.socket) -> None:
    """Drop what the client sent that TLS has not read (OpenSSL reads a record at a time).
    Closing a socket with unread bytes sends a reset, and a reset can destroy our last records
    (a handshake alert, the frame saying why) before the client has read them."""
    try:
        os.read(sock.fileno(), READ_CHUNK)
    except OSError:
        pass


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
