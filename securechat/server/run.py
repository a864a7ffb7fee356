"""`securechat server`: configure logging, start the server, stop it gracefully on a signal."""

from __future__ import annotations

import logging
import signal
import threading

from securechat.server.app import Server, ServerConfig


def serve(config: ServerConfig, log_level: str) -> None:
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
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
