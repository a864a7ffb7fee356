"""The server: a listener thread, a few I/O loop threads, a store worker, and the hub.

The listener only accepts and hands each socket to a loop (round robin); the TLS handshake runs
non-blocking on that loop, so a slow or silent client never holds up the listener or anyone
else. Blocking work runs on the store worker thread (worker.py) and reports back through the
loop's inbox. docs/ARCHITECTURE.md describes the threads and what each owns.
"""

from __future__ import annotations

import functools
import itertools
import logging
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from securechat import __version__
from securechat.errors import ConfigError
from securechat.server.addresses import AddressLimit, Network, new_name_cap, parse_trusted
from securechat.server.admission import Admission, Refusal
from securechat.server.budget import OutputBudget
from securechat.server.connection import Connection
from securechat.server.context import ServerContext
from securechat.server.hub import Hub
from securechat.server.loop import IOLoop
from securechat.server.quota import DMQuota
from securechat.server.requests import PREKEY_LOW
from securechat.server.store import HistoryRow, SQLiteStore
from securechat.server.worker import StoreWorker
from securechat.settings import check_server_fields, server_default
from securechat.tls import server_context

log = logging.getLogger("securechat.server")
ACCEPT_PAUSE = 0.1  # seconds to wait after accept() fails before trying again
STATS_EVERY = 60.0  # seconds between two of the server's periodic log lines
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 seconds: close() sends a reset


@dataclass
class ServerConfig:
    """The server's settings. Each default, range and flag is declared once, in
    securechat.settings.SERVER; a value its flag would refuse is refused here too, when built."""

    host: str = server_default("host")
    port: int = server_default("port")
    certs_dir: Path = field(default_factory=partial(server_default, "certs_dir"))
    data_dir: Path = field(default_factory=partial(server_default, "data_dir"))
    require_client_cert: bool = server_default("require_client_cert")
    io_threads: int = server_default("io_threads")
    log_level: str = server_default("log_level")
    history: int = server_default("history")  # room messages kept per room, sent on join
    dm_ttl_ms: int = server_default("dm_ttl_ms")  # queued DMs expire after this
    dm_quota_count: int = server_default("dm_quota_count")  # per recipient
    dm_quota_bytes: int = server_default("dm_quota_bytes")  # per recipient
    dm_sender_share: int = server_default("dm_sender_share")  # percent one sender may fill
    max_frame: int = server_default("max_frame")
    handshake_timeout: float = server_default("handshake_timeout")  # accept to TLS done
    login_timeout: float = server_default("login_timeout")  # TLS done to logged in
    idle_timeout: float = server_default("idle_timeout")  # pinged at half of it; 0: never
    max_connections: int = server_default("max_connections")  # 0: no cap
    max_per_address: int = server_default("max_per_address")  # 0: no cap
    connect_rate: float = server_default("connect_rate")  # connections/s per address; 0: any
    connect_burst: int = server_default("connect_burst")
    new_names: int = server_default("new_names")  # per address and hour; 0: no cap
    trusted: str = server_default("trusted")  # addresses exempt from the two above
    rate: float = server_default("rate")  # requests a second per user, on average
    burst: int = server_default("burst")  # requests a user may send at once
    flood_refusals: int = server_default("flood_refusals")  # refusals in a row: dropped
    max_queue: int = server_default("max_queue")  # bytes queued for a client that does not read
    output_budget: int = server_default("output_budget")  # bytes queued for all; 0: no budget
    max_message: int = server_default("max_message")  # characters in a room message
    presence_limit: int = server_default("presence_limit")  # joins and parts not announced above
    backlog: int = 1024  # listen() backlog; no flag

    def __post_init__(self) -> None:
        check_server_fields(vars(self))
        self.trusted_networks()

    def trusted_networks(self) -> tuple[Network, ...]:
        return parse_trusted(self.trusted)

    def dm_quota(self) -> DMQuota:
        share = self.dm_sender_share
        return DMQuota(
            self.dm_quota_count,
            self.dm_quota_bytes,
            max(1, self.dm_quota_count * share // 100),
            max(1, self.dm_quota_bytes * share // 100),
        )


class Server:
    def __init__(self, config: ServerConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock  # for the per-address limits (tests move it instead of sleeping)
        self.ssl_context, self.cert_sha256 = server_context(
            config.certs_dir, require_client_cert=config.require_client_cert
        )
        self._worker = StoreWorker(
            lambda: SQLiteStore(config.data_dir / "securechat.db"), config.history
        )
        self.store = self._worker.store
        self.hub = Hub(
            config.max_frame,
            config.history,
            self._worker.add_history,
            config.max_message,
            config.presence_limit,
        )
        self.admission = Admission(config.max_connections, config.max_per_address)
        trusted = config.trusted_networks()
        self.throttle = AddressLimit(config.connect_rate, config.connect_burst, trusted)
        names = new_name_cap(config.new_names, trusted) if config.new_names else None
        self.hub.load_history(*self._worker.submit(self._stored_history).result())
        self.loops = [IOLoop(i) for i in range(max(1, config.io_threads))]
        self.budget = OutputBudget(config.output_budget, self.loops)
        for loop in self.loops:
            loop.budget = self.budget
        self._next_loop = itertools.cycle(self.loops)
        self._listener = self._listen()
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._accept_selector = selectors.DefaultSelector()
        self._stop_r, self._stop_w = socket.socketpair()
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name="listener", daemon=True
        )
        self._stopped = threading.Event()
        self._context = ServerContext(
            config=config,
            ssl_context=self.ssl_context,
            cert_sha256=self.cert_sha256,
            hub=self.hub,
            worker=self._worker,
            welcome=self.welcome(),
            closed=self.connection_closed,
            new_names=names,
            clock=clock,
        )

    def _listen(self) -> socket.socket:
        host, port = self.config.host, self.config.port
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror as exc:
            raise ConfigError(f"cannot resolve --host {host!r}: {exc.strerror}") from None
        family, _, _, _, sockaddr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(sockaddr)
            sock.listen(self.config.backlog)
        except OSError as exc:
            sock.close()
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        sock.setblocking(False)
        return sock

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> Server:
        for loop in self.loops:
            loop.start()
        self._accept_thread.start()
        host, port = self.address
        log.info(
            "securechat %s listening on %s:%d (TLS 1.3%s), %d I/O threads",
            __version__,
            host,
            port,
            ", client certificates required" if self.config.require_client_cert else "",
            len(self.loops),
        )
        return self

    def stop(self, reason: str = "server shutting down", timeout: float = 5.0) -> None:
        """Tell every client why, let the loops flush, then close everything."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._stop_w.send(b"\0")
        self._accept_thread.join(timeout)
        kicked = [threading.Event() for _ in self.loops]

        def kick_all(loop: IOLoop, done: threading.Event) -> None:
            for conn in list(loop.connections):
                conn.kick(reason) if conn.user else conn.abort(reason)
            done.set()

        for loop, done in zip(self.loops, kicked, strict=True):
            loop.call_soon(functools.partial(kick_all, loop, done))
        for done in kicked:
            done.wait(timeout)
        # Closing connections abort themselves once their last frames are written (or after
        # LINGER); wait for that rather than cutting them off mid-write.
        self.admission.wait_all_closed(timeout)
        for loop in self.loops:
            loop.stop()
        for loop in self.loops:
            loop.join(timeout)
        self._worker.stop(timeout)
        self._stop_r.close()
        self._stop_w.close()
        log.info("server stopped")

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- threads ----------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        sel = self._accept_selector
        sel.register(self._listener, selectors.EVENT_READ)
        sel.register(self._stop_r, selectors.EVENT_READ)
        next_stats = time.monotonic() + STATS_EVERY
        try:
            while not self._stopped.is_set():
                for key, _ in sel.select(max(0.0, next_stats - time.monotonic())):
                    if key.fileobj is self._stop_r:
                        return
                    if not self._accept_burst() and self._stopped.wait(ACCEPT_PAUSE):
                        return
                if time.monotonic() >= next_stats:
                    next_stats = time.monotonic() + STATS_EVERY
                    log.info("%s", self.stats_line())
        finally:
            sel.close()
            self._listener.close()

    def _accept_burst(self) -> bool:
        """Accept what is waiting; False when accept() failed (out of file descriptors, say),
        so the caller pauses instead of spinning on a listener that stays readable."""
        for _ in range(256):
            try:
                sock, addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return True
            except OSError as exc:
                log.warning("accept failed: %s; pausing accepts briefly", exc.strerror or exc)
                return False
            ip = addr[0]
            # The clock is read per connection: a burst can outlast the moment it began.
            if not self.throttle.allow(ip, self._clock()):
                # Over --connect-rate: no TLS, no loop, no log line; a reset rather than a FIN,
                # so that a flood leaves no TIME_WAIT sockets behind on our side either.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
                sock.close()
                continue
            refusal = self.admission.admit(ip)
            if refusal is not None and not self.admission.start_refusal():
                sock.close()  # refusing too many already: telling this one why costs too much
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer = f"{ip}:{addr[1]}" if len(addr) == 2 else f"[{ip}]:{addr[1]}"
            loop = next(self._next_loop)
            loop.call_soon(functools.partial(self._adopt, loop, sock, peer, ip, refusal))
        return True

    def _adopt(
        self, loop: IOLoop, sock: socket.socket, peer: str, ip: str, refusal: Refusal | None
    ) -> None:
        if self._stopped.is_set():
            sock.close()
            self._release(ip, refusal)
            return
        if refusal is None:
            log.info("connection from %s", peer)
        else:
            log.info("refusing %s: %s", peer, refusal.message)
        Connection(self._context, loop, sock, peer, ip, refusal)

    def connection_closed(self, conn: Connection) -> None:
        self._release(conn.ip, conn.refusal)

    def _release(self, ip: str, refusal: Refusal | None) -> None:
        if refusal is None:
            self.admission.release(ip)
        else:
            self.admission.end_refusal()

    # -- room history -----------------------------------------------------------------------------

    def _stored_history(self) -> tuple[list[HistoryRow], dict[str, str]]:
        rows = [
            row
            for room in self.store.rooms_with_history()
            for row in self.store.room_history(room, self.config.history)
        ]
        return rows, self.store.room_modes()

    def welcome(self) -> dict[str, Any]:
        config = self.config
        return {
            "server": f"securechat/{__version__}",
            "max_frame": config.max_frame,
            "max_message": config.max_message,
            "rate": config.rate,
            "burst": config.burst,
            "flood_refusals": config.flood_refusals,
            "idle_timeout": config.idle_timeout,
            "prekey_low": PREKEY_LOW,
        }

    @property
    def open_connections(self) -> int:
        return self.admission.open

    def stats_line(self) -> str:
        """The periodic log line: what the server holds, and what its limits turned away."""
        names = self._context.new_names
        return (
            f"stats: {self.admission.open} connections, "
            f"{self.budget.queued} bytes queued for clients (budget {self.config.output_budget}),"
            f" {self.budget.shed} shed over budget, {self.throttle.refused} connections "
            f"throttled, {names.refused if names else 0} new names refused"
        )
