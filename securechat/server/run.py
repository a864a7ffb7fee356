"""`securechat server`: configure logging, start the server, stop it gracefully on a signal."""

from __future__ import annotations

import logging
import resource
import signal

from securechat.server.app import Server, ServerConfig
from securechat.server.loop import MAX_LINGERING

FD_SPARE = 64  # descriptors besides connections: listener, wake-up pairs, database, logs


def raise_fd_limit(max_connections: int, io_threads: int) -> None:
    """Let the process hold --max-connections sockets, as far as the hard limit allows, and the
    sockets of closed connections that each I/O thread keeps open a moment longer."""
    log = logging.getLogger("securechat.server")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    spare = FD_SPARE + max(1, io_threads) * MAX_LINGERING
    wanted = max_connections + spare if max_connections else hard
    if hard != resource.RLIM_INFINITY:
        wanted = min(wanted, hard)
    if wanted > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        soft = wanted
    if max_connections and soft < max_connections + spare:
        log.warning(
            "only %d file descriptors allowed (ulimit -n): expect at most about %d connections, "
            "not the %d of --max-connections",
            soft,
            max(0, soft - spare),
            max_connections,
        )


def serve(config: ServerConfig, log_level: str) -> None:
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    raise_fd_limit(config.max_connections, config.io_threads)
    # Block SIGINT and SIGTERM before any thread starts: threads inherit the mask, so neither
    # signal can land on a server thread (where it would not wake the main thread); sigwait()
    # below takes them.
    signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    server = Server(config)
    server.start()
    # Line that scripts and tests wait for; it carries the real port when --port 0 was given.
    print(f"securechat server listening on {server.address[0]}:{server.address[1]}", flush=True)
    received = signal.Signals(signal.sigwait(signals)).name
    logging.getLogger("securechat.server").info("%s received; shutting down", received)
    server.stop("server shutting down")
