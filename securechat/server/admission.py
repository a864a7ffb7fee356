"""Who may open a connection: caps on connections in total and per source address.

The listener thread admits, the I/O loops release; one lock (and a condition on it, for stop()
to wait until every connection has closed) keeps the counts right. A connection
over a cap is not simply cut off: up to `max_refusing` of them at a time are told why in an error
frame after the TLS handshake, so a real user sees "the server is full" rather than a reset.
Past that, refusals are a plain close, so a flood of them costs the server next to nothing.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass

from securechat.errors import ErrorCode


@dataclass(frozen=True)
class Refusal:
    """Why a connection over a cap is refused: the error frame it is told after the handshake."""

    code: ErrorCode
    message: str


class Admission:
    def __init__(self, max_total: int, max_per_address: int, max_refusing: int = 64) -> None:
        self.max_total = max_total  # 0: no cap
        self.max_per_address = max_per_address  # 0: no cap
        self.max_refusing = max_refusing
        self._lock = threading.Lock()
        self._closed_all = threading.Condition(self._lock)
        self._total = 0
        self._by_address: Counter[str] = Counter()
        self._refusing = 0

    def admit(self, address: str) -> Refusal | None:
        """Count a new connection from `address`, or return why it is refused (not counted)."""
        with self._lock:
            if self.max_total and self._total >= self.max_total:
                return Refusal(
                    ErrorCode.SERVER_FULL,
                    f"the server is full ({self.max_total} connections); try again later",
                )
            if self.max_per_address and self._by_address[address] >= self.max_per_address:
                return Refusal(
                    ErrorCode.TOO_MANY_CONNECTIONS,
                    f"too many connections from your address (at most {self.max_per_address})",
                )
            self._total += 1
            self._by_address[address] += 1
            return None

    def release(self, address: str) -> None:
        with self._lock:
            self._total -= 1
            self._by_address[address] -= 1
            if self._by_address[address] <= 0:
                del self._by_address[address]
            self._notify_if_idle()

    def start_refusal(self) -> bool:
        """Whether a refused connection may be told why (False: just close it)."""
        with self._lock:
            if self._refusing >= self.max_refusing:
                return False
            self._refusing += 1
            return True

    def end_refusal(self) -> None:
        with self._lock:
            self._refusing -= 1
            self._notify_if_idle()

    def _notify_if_idle(self) -> None:
        if not self._total and not self._refusing:
            self._closed_all.notify_all()

    def wait_all_closed(self, timeout: float) -> bool:
        """Wait until every admitted or refusing connection has been released."""
        with self._closed_all:
            return self._closed_all.wait_for(
                lambda: not self._total and not self._refusing, timeout
            )

    @property
    def open(self) -> int:
        """Connections held: admitted ones and those being told why they are refused."""
        with self._lock:
            return self._total + self._refusing

    @property
    def total(self) -> int:
        with self._lock:
            return self._total

    def count(self, address: str) -> int:
        with self._lock:
            return self._by_address.get(address, 0)
