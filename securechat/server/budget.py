"""The global budget for queued output: how many bytes may wait in all clients' output buffers
together, and who goes when the total is over it.

Each I/O loop keeps the bytes queued in its own connections in `IOLoop.queued` (written by that
loop's thread only, so the hot path takes no lock); the total is the sum over the loops, read
without a lock: a few bytes stale at worst. A loop that finds the total over budget sheds from its
own connections only (the one-owner rule), biggest queue first, its share of the excess in
proportion to the bytes it holds. With one loop that is exactly "biggest first" server-wide; with
several, the loop holding the most sheds the most. A shed client is dropped as at --max-queue:
it loses room traffic; its DMs stay in the store until it acknowledges them.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from securechat.server.loop import IOLoop


class OutputBudget:
    def __init__(self, limit: int, loops: Sequence[IOLoop]) -> None:
        self.limit = limit  # bytes; 0: no budget
        self.loops = tuple(loops)

    @property
    def queued(self) -> int:
        """Bytes waiting in every connection's output buffer, on every loop."""
        return sum(loop.queued for loop in self.loops)

    @property
    def shed(self) -> int:
        """Connections dropped to stay within the budget, since the start."""
        return sum(loop.shed for loop in self.loops)

    def over(self) -> bool:
        return bool(self.limit) and self.queued > self.limit

    def shed_from(self, loop: IOLoop) -> None:
        """On `loop`'s thread: drop its biggest queues until its share of the excess is gone."""
        total = self.queued
        excess = total - self.limit
        if not self.limit or excess <= 0 or loop.queued <= 0:
            return
        share = excess if loop.queued >= total else math.ceil(excess * loop.queued / total)
        queued = [c for c in loop.connections if c.queued]
        # Rarely more than a few go at once, so take them off a heap rather than sort them all.
        heap = [(-c.queued, i, c) for i, c in enumerate(queued)]
        heapq.heapify(heap)
        while share > 0 and heap:
            size, _, conn = heapq.heappop(heap)
            share += size  # size is negative
            conn.drop_not_reading("the server's output budget")
            loop.shed += 1
