"""The global budget for queued output: how many bytes may wait in all clients' output buffers
together, and who goes when the total is over it.

Each I/O loop keeps the bytes queued in its own connections in `IOLoop.queued` (written by that
loop's thread only, so the hot path takes no lock); the total is the sum over the loops, read
without a lock, a little stale at worst. A loop that finds the total over budget sheds from its
own connections only (the one-owner rule), biggest queue first, and only while its biggest is at
least as big as the biggest any other loop last published (`IOLoop.biggest`): so the biggest
queues server-wide go first, whichever loop owns them. A shed client is dropped as at
--max-queue: it loses room traffic; its DMs stay in the store until it acknowledges them.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import TYPE_CHECKING

from securechat.server.connection import drop_all_not_reading

if TYPE_CHECKING:
    from securechat.server.connection import Connection
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
        """On `loop`'s thread: drop its biggest queues while the total is over budget and no
        other loop holds a bigger one; then publish the biggest it has left. Those dropped in
        one call go together (drop_all_not_reading), so their rooms announce them in a row."""
        heap = [(-c.queued, i, c) for i, c in enumerate(loop.connections) if c.queued]
        heapq.heapify(heap)
        others = max((other.biggest for other in self.loops if other is not loop), default=0)
        over = self.queued - self.limit if self.limit else 0
        shed: list[Connection] = []
        while heap and -heap[0][0] >= others and over > 0:
            conn = heapq.heappop(heap)[2]
            shed.append(conn)
            over -= conn.charged  # what leaves the total when it closes
        drop_all_not_reading(shed, "the server's output budget")
        loop.shed += len(shed)
        loop.biggest = -heap[0][0] if heap else 0
