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

# Once over budget, a loop sheds down to this share of it, not just under it: each look for the
# biggest queues walks every connection, and a flood that keeps the total at the limit would
# otherwise pay that walk for nearly every frame it queues (a fifth of the I/O thread's time
# under 1,000 non-readers; BENCHMARKS.md).
SHED_TO = 7 / 8


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
        """On `loop`'s thread, the total over budget: drop its biggest queues until the total is
        down to SHED_TO of the budget, while no other loop holds a bigger one; then publish the
        biggest it has left. Those dropped in one call go together (drop_all_not_reading), so
        their rooms announce them in a row."""
        heap = [(-c.queued, i, c) for i, c in enumerate(loop.connections) if c.queued]
        heapq.heapify(heap)
        others = max((other.biggest for other in self.loops if other is not loop), default=0)
        over = self.queued - int(self.limit * SHED_TO) if self.limit else 0
        shed: list[Connection] = []
        while heap and -heap[0][0] >= others and over > 0:
            conn = heapq.heappop(heap)[2]
            shed.append(conn)
            over -= conn.charged  # what leaves the total when it closes
        drop_all_not_reading(shed, "the server's output budget")
        loop.shed += len(shed)
        loop.biggest = -heap[0][0] if heap else 0
