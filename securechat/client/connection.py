"""The client's TLS connection: opened and logged in by the caller, then owned by one I/O thread.

Until login completes the socket is used only by the thread that called open_connection(); from
then on only by the ClientConnection thread (docs/ARCHITECTURE.md says why). Other threads send
by handing bytes to that thread (send()), which coalesces what is queued into one TLS write.
"""

from __future__ import annotations

import collections
import logging
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from securechat.client.pacing import MAX_TRIES, Paced, Pacer, Verdict
from securechat.client.session import ClientSession
from securechat.errors import (
    AuthError,
    CertificateError,
    ConnectError,
    ConnectionClosed,
    ProtocolError,
)
from securechat.identity import Identity
from securechat.protocol import PROTOCOL_VERSION
from securechat.ratelimit import RATE_LIMITED
from securechat.tls import TLSStream

log = logging.getLogger("securechat.client")
RECV_SIZE = 64 * 1024
KEEPALIVE = 60.0  # seconds of silence from the server before we ping it
KEEPALIVE_ANSWER = 20.0  # seconds it then has to say anything before we call it gone
# Requests the server rate-limits (ratelimit.RATE_LIMITED) are paced to its announced rate
# rather than be refused, and sent again if they are refused all the same.


def _tls_error(exc: ssl.SSLError, where: str) -> ConnectError:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return ConnectError(
            f"the server at {where} failed certificate verification ({exc.verify_message}); "
            "check that --ca is the ca.pem of that server and --host is a name on its certificate"
        )
    reason = exc.reason or str(exc)
    if "CERTIFICATE_REQUIRED" in reason:
        return ConnectError(
            f"the server at {where} requires a client certificate; pass --cert and --cert-key"
        )
    if "UNKNOWN_CA" in reason or "BAD_CERTIFICATE" in reason:
        return _refused_certificate(where, reason)
    if "UNSUPPORTED_CERTIFICATE" in reason:
        return _refused_certificate(where, f"{reason}: it is not a client certificate")
    if "CERTIFICATE_EXPIRED" in reason:
        return _refused_certificate(where, f"{reason}: it has expired or is not valid yet")
    if "PROTOCOL_VERSION" in reason or "UNSUPPORTED_PROTOCOL" in reason:
        return ConnectError(f"the server at {where} does not speak TLS 1.3 ({reason})")
    return ConnectError(f"TLS with {where} failed: {reason}")


def _refused_certificate(where: str, why: str) -> ConnectError:
    return ConnectError(f"the server at {where} refused our client certificate ({why})")


class _Blocking:
    """Drives a TLSStream over a blocking socket, for the handshake and login only."""

    def __init__(self, sock: socket.socket, tls: TLSStream, where: str, deadline: float) -> None:
        self.sock, self.tls, self.where, self.deadline = sock, tls, where, deadline

    def _recv(self) -> None:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise ConnectError(f"timed out talking to {self.where}")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(RECV_SIZE)
        except TimeoutError:
            raise ConnectError(f"timed out talking to {self.where}") from None
        except OSError as exc:
            raise ConnectError(
                f"connection to {self.where} failed: {exc.strerror or exc}"
            ) from None
        self.tls.feed(data)

    def _send(self) -> None:
        out = self.tls.data_to_send()
        if out:
            try:
                self.sock.sendall(out)
            except OSError as exc:
                raise ConnectError(
                    f"connection to {self.where} failed: {exc.strerror or exc}"
                ) from None

    def handshake(self) -> None:
        try:
            while not self.tls.do_handshake():
                self._send()
                self._recv()
            self._send()
        except ssl.SSLError as exc:
            raise _tls_error(exc, self.where) from None

    def send(self, data: bytes) -> None:
        self.tls.write(data)
        self._send()

    def frames(self, session: ClientSession) -> list[dict[str, Any]]:
        """Block until at least one frame arrives."""
        while True:
            try:
                data = self.tls.read()
            except ssl.SSLError as exc:
                raise _tls_error(exc, self.where) from None
            except ConnectionClosed:
                raise ConnectError(f"{self.where} closed the connection during login") from None
            if data:
                frames = session.receive_data(data)
                if frames:
                    return frames
            self._recv()


def open_connection(
    host: str,
    port: int,
    ctx: ssl.SSLContext,
    identity: Identity,
    user: str,
    timeout: float = 10.0,
    device: str | None = None,
) -> tuple[socket.socket, TLSStream, ClientSession, dict[str, Any], list[dict[str, Any]]]:
    """Connect, handshake and log in; return the logged-in pieces for ClientConnection.

    Returns (socket, tls, session, welcome frame, frames that arrived right after welcome).
    """
    where = f"{host}:{port}"
    deadline = time.monotonic() + timeout
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise ConnectError(
            f"cannot connect to {where}: {exc.strerror or exc}; is `securechat server` running?"
        ) from None
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tls = TLSStream(ctx, server_side=False, server_hostname=host)
        io = _Blocking(sock, tls, where, deadline)
        io.handshake()
        try:
            server_fp = tls.peer_cert_sha256()
        except CertificateError as exc:
            raise ConnectError(str(exc)) from None
        session = ClientSession()
        io.send(session.hello(user, identity, device))
        frames = io.frames(session)
        first = frames.pop(0)
        if first["type"] == "challenge":
            io.send(session.auth(first, user, identity, server_fp))
            while not frames:
                frames = io.frames(session)
            first = frames.pop(0)
        _check_welcome(first, user, where)
        session.adopt_limits(first)
        return sock, tls, session, first, frames
    except ProtocolError as exc:
        sock.close()
        raise ConnectError(f"{where} broke the protocol during login: {exc}") from None
    except BaseException:
        sock.close()
        raise


def _check_welcome(first: dict[str, Any], user: str, where: str) -> None:
    """Refuse any answer to our login other than a welcome for the name we logged in with."""
    if first["type"] == "error" and first.get("code") == "bad_certificate":
        raise _refused_certificate(where, str(first.get("message", "no reason given")))
    if first["type"] == "error":
        raise AuthError(
            f"{where} refused the login: {first.get('message', 'no reason given')}",
            code=str(first.get("code", "auth_failed")),
        )
    if first["type"] != "welcome":
        raise ConnectError(f"{where} answered the login with an unexpected {first['type']!r}")
    if first.get("version") != PROTOCOL_VERSION:
        # No downgrade: an older server would take our DMs in a format we no longer trust.
        raise ConnectError(
            f"{where} does not speak protocol version {PROTOCOL_VERSION} (it said "
            f"{str(first.get('version'))!r:.20}); disconnected"
        )
    if first.get("user") != user:
        # Adopting another name would file DMs and pins under someone else's identity.
        raise ConnectError(
            f"{where} welcomed us under another name ({str(first.get('user'))!r:.40}) than "
            f"the one we logged in with ({user!r}); disconnected. The server may be hostile"
        )


class ClientConnection(threading.Thread):
    """The one thread that owns a logged-in client's socket and TLS stream.

    It answers the server's keep-alive pings, pings a server that has gone quiet (and gives up on
    one that stays quiet), and paces rate-limited requests to the rate the server announced,
    sending again those it refuses for rate (see pacing.py).
    """

    def __init__(
        self,
        sock: socket.socket,
        tls: TLSStream,
        session: ClientSession,
        on_frame: Callable[[dict[str, Any]], None],
        on_close: Callable[[str], None],
        *,
        rate: float | None = None,
        burst: int | None = None,
        flood_refusals: int | None = None,
        keepalive: float = KEEPALIVE,
        keepalive_answer: float = KEEPALIVE_ANSWER,
    ) -> None:
        super().__init__(name="securechat-client-io", daemon=True)
        self.sock, self.tls, self.session = sock, tls, session
        self._on_frame, self._on_close = on_frame, on_close
        self._outbox: collections.deque[bytes] = collections.deque()
        # Paced requests from any thread, in request-id order, for the owner's pacer.
        self._incoming: collections.deque[Paced] = collections.deque()
        self._pacer = (
            Pacer(rate, burst, flood_refusals, time.monotonic(), session.encode)
            if rate and burst
            else None
        )
        self._keepalive, self._keepalive_answer = keepalive, keepalive_answer
        self._heard = time.monotonic()
        self._probed = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._closing = False
        self._bye_sent = False
        self._close_reason: str | None = None
        self._outbuf = bytearray()
        self.closed = threading.Event()
        self.pending: dict[int, Future[dict[str, Any]]] = {}
        self._pending_lock = threading.Lock()

    # -- any thread -------------------------------------------------------------------------------

    def request(self, ftype: str, **fields: Any) -> Future[dict[str, Any]]:
        future: Future[dict[str, Any]] = Future()
        with self._pending_lock:
            if self.closed.is_set():
                future.set_exception(ConnectionClosed(self._close_reason or "connection closed"))
                return future
            request_id, data = self.session.request(ftype, **fields)
            self.pending[request_id] = future
            paced = self._pacer is not None and ftype in RATE_LIMITED
            if paced:  # under the lock, so that the queue keeps the order of the ids
                self._incoming.append(Paced(request_id, request_id, ftype, fields, future, data))
        if paced:
            self._wake()
        else:
            self.send(data)
        return future

    def outstanding(self) -> list[Future[dict[str, Any]]]:
        """The requests still waiting for their reply."""
        with self._pending_lock:
            return list(self.pending.values())

    def send(self, data: bytes) -> None:
        self._outbox.append(data)
        self._wake()

    def close(self, reason: str = "closed by user") -> None:
        """Say goodbye once every paced request has gone out and been answered (a refused one
        must still be sent again), then close once that is written."""
        if not self._closing:
            self._close_reason = reason
            self._closing = True
            self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass  # buffer full (a wake-up is pending) or already closed

    # -- owner thread -----------------------------------------------------------------------------

    def run(self) -> None:
        reason = "connection closed"
        sel = selectors.DefaultSelector()
        self.sock.setblocking(False)
        sel.register(self.sock, selectors.EVENT_READ, "sock")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            self._serve(sel)
            reason = self._close_reason or reason
        except ConnectionClosed as exc:
            reason = self._close_reason or exc.reason
        except ssl.SSLError as exc:
            reason = f"TLS error: {exc.reason or exc}"
        except ProtocolError as exc:
            reason = f"server broke the protocol: {exc}"
        except OSError as exc:
            reason = f"connection lost: {exc.strerror or exc}"
        finally:
            sel.close()
            self.sock.close()
            self._wake_r.close()
            self._finish(reason)

    def _serve(self, sel: selectors.BaseSelector) -> None:
        """Run until our bye and the TLS close_notify are sent; errors propagate to run()."""
        want_write = False
        while True:
            for key, mask in sel.select(self._next_timer()):
                if key.data == "wake":
                    self._drain_wake()
                elif mask & selectors.EVENT_READ:
                    self._read()
                if key.data == "sock" and mask & selectors.EVENT_WRITE:
                    self._write()
            self._check_alive()
            if self._closing and not self._bye_sent and self._paced_done():
                self._outbox.append(self.session.encode({"type": "bye"}))
                self._bye_sent = True
            self._take_outbox()
            self._write()
            if self._bye_sent and not self._outbuf:
                self.tls.close()
                self._outbuf += self.tls.data_to_send()
                self._write()
                return
            if bool(self._outbuf) != want_write:
                want_write = bool(self._outbuf)
                sel.modify(
                    self.sock,
                    selectors.EVENT_READ | (selectors.EVENT_WRITE if want_write else 0),
                    "sock",
                )

    def _finish(self, reason: str) -> None:
        with self._pending_lock:
            self.closed.set()
            pending, self.pending = self.pending, {}
        for future in pending.values():
            future.set_exception(ConnectionClosed(reason))
        self._wake_w.close()
        self._on_close(reason)

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _next_timer(self) -> float:
        """Seconds until a paced request may go or the keep-alive needs a look."""
        now = time.monotonic()
        wait = self._heard + self._keepalive + (self._keepalive_answer if self._probed else 0)
        timeout = max(0.0, wait - now)
        if self._pacer is not None:
            due = self._pacer.next_due(now)
            if due is not None:
                timeout = min(timeout, due)
        return timeout

    def _paced_done(self) -> bool:
        return self._pacer is None or (self._pacer.idle and not self._incoming)

    def _check_alive(self) -> None:
        silent = time.monotonic() - self._heard
        if silent >= self._keepalive + self._keepalive_answer and self._probed:
            raise ConnectionClosed(
                f"the server stopped answering (nothing heard for {silent:.0f} seconds)"
            )
        if silent >= self._keepalive and not self._probed:
            self._probed = True
            with self._pending_lock:
                self._outbox.append(self.session.request("ping")[1])

    def _take_outbox(self) -> None:
        pacer = self._pacer
        if pacer is not None:
            while self._incoming:
                pacer.add(self._incoming.popleft())
            due, failed = pacer.take_due(time.monotonic())
            self._outbox.extend(due)
            for request, exc in failed:
                with self._pending_lock:
                    self.pending.pop(request.request_id, None)
                request.future.set_exception(exc)
        outbox = self._outbox
        if outbox:
            chunks = []
            while outbox:
                chunks.append(outbox.popleft())
            self.tls.write(b"".join(chunks))
            self._outbuf += self.tls.data_to_send()

    def _write(self) -> None:
        buf = self._outbuf
        while buf:
            try:
                sent = self.sock.send(buf)
            except (BlockingIOError, InterruptedError):
                return
            del buf[:sent]

    def feed_frames(self, frames: list[dict[str, Any]]) -> None:
        for frame in frames:
            self._dispatch(frame)

    def _read(self) -> None:
        try:
            data = self.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        self._heard = time.monotonic()
        self._probed = False
        self.tls.feed(data)
        plaintext = self.tls.read()
        if plaintext:
            self.feed_frames(self.session.receive_data(plaintext))

    def _dispatch(self, frame: dict[str, Any]) -> None:
        ftype = frame["type"]
        request_id = frame.get("id")
        if ftype in ("ok", "error", "pong") and isinstance(request_id, int):
            refused = ftype == "error" and frame.get("code") == "rate_limited"
            if refused and self._retry(request_id, frame):
                return
            with self._pending_lock:
                future = self.pending.pop(request_id, None)
            if self._pacer is not None and not refused:
                self._pacer.answered(request_id, carried_out=ftype == "ok")
            if future is not None:
                if ftype == "error":
                    future.set_exception(RequestError(frame))
                else:
                    future.set_result(frame)
                return
        if ftype == "bye":
            raise ConnectionClosed(str(frame.get("reason", "server closed the connection")))
        if ftype == "ping" and request_id is None:
            self._outbox.append(self.session.encode({"type": "pong"}))  # the server's keep-alive
            return
        self._on_frame(frame)

    def _retry(self, request_id: int, frame: dict[str, Any]) -> bool:
        """A rate_limited refusal: True if the request is queued to go again (its future now
        waits under a new id); False to fail it with the server's words."""
        if self._pacer is None:
            return False
        with self._pending_lock:
            new_id = self.session.next_id()
            verdict = self._pacer.refused(
                request_id, frame.get("retry_after"), time.monotonic(), new_id
            )
            if verdict is Verdict.RETRY:
                self.pending[new_id] = self.pending.pop(request_id)
                return True
        if verdict is Verdict.GIVE_UP and self._pacer.max_refusals is not None:
            frame["message"] = f"{frame.get('message', 'refused')} (refused {MAX_TRIES} times)"
        return False


class RequestError(ProtocolError):
    """The server refused one request; `code` says why in a stable word."""

    def __init__(self, frame: dict[str, Any]) -> None:
        super().__init__(str(frame.get("code", "error")), str(frame.get("message", "refused")))
