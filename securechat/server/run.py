"""`securechat server`: configure logging, start the server, stop it gracefully on a signal."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

from securechat.server.app import Server, ServerConfig


def serve(
    *,
    host: str,
    port: int,
    certs_dir: Path,
    data_dir: Path,
    require_client_cert: bool,
    io_threads: int | None,
    log_level: str,
) -> None:
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    config = ServerConfig(
        host=host,
        port=port,
        certs_dir=certs_dir,
        data_dir=data_dir,
        require_client_cert=require_client_cert,
    )
    if io_threads:
        config.io_threads = io_threads
    server = Server(config)
    stop = threading.Event()
    received: list[str] = []

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    server.start()
    # Line that scripts and tests wait for; it carries the real port when --port 0 was given.
    print(f"securechat server listening on {server.address[0]}:{server.address[1]}", flush=True)
    while not stop.wait(3600):
        pass
    logging.getLogger("securechat.server").info("%s received; shutting down", received[0])
    server.stop("server shutting down")
