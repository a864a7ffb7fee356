"""What a connection may use of the server: a narrow view, so that a connection cannot reach
the listener, the other loops or the store except through the store worker."""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from securechat.server.addresses import AddressLimit
    from securechat.server.app import ServerConfig
    from securechat.server.connection import Connection
    from securechat.server.hub import Hub
    from securechat.server.worker import StoreWorker


@dataclass(frozen=True)
class ServerContext:
    config: ServerConfig
    ssl_context: ssl.SSLContext
    cert_sha256: bytes  # of the server's certificate, for the login transcript
    hub: Hub
    worker: StoreWorker  # the only way to the store
    welcome: Mapping[str, Any]  # the fields of every welcome frame
    closed: Callable[[Connection], None]  # a connection released its socket
    new_names: AddressLimit | None = None  # the store worker's alone (--new-names); None: no cap
    clock: Callable[[], float] = time.monotonic  # for new_names
