"""Which rate-limited request the client sends next, and when: its side of the server's limit.

It paces requests a little under the rate the server announced and, when the server refuses one
anyway (`rate_limited`: the network held a burst back and delivered it late, so the server's
bucket lost the time it would have refilled in), queues it again in its place and sends it once
the server has a token for it. No I/O, no threads, no clock: the connection's owner thread
drives it and passes the time in.

The rules it keeps:
- Order. After a refusal the server refuses every later request until one says `resume`. We say
  it only once no request is in flight, so everything refused is back in the queue in its place,
  and nothing sent later can have overtaken it.
- Nothing twice. Only a `rate_limited` reply sends a request again, never a lost reply.
- Never a flood. The server drops a sender after `max_refusals` refusals in a row. We send only
  while the refusals it has counted, plus every request in flight, plus this one stay below that.
- Bounded. The wait before the `resume` request is the server's retry_after, counted from when
  its last refusal reached us: the request then arrives after the server's bucket has a token, so
  one retry is enough. A request the server refuses for itself MAX_TRIES times (not merely held
  behind an earlier refusal) is given up, with back-off between the tries.
"""

from __future__ import annotations

import bisect
import enum
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from securechat.errors import ProtocolError
from securechat.ratelimit import TokenBucket

# The server's bucket fills from before our welcome and spends a token when a frame arrives,
# never before we sent it: pacing a little under its rate with the same burst stays within it
# unless the network bunches our frames up.
PACE_MARGIN = 0.95
MAX_TRIES = 5
BACKOFF = 2.0  # each further refusal of the same request doubles the wait
MAX_WAIT = 30.0  # the most we believe of a server's retry_after, in seconds


@dataclass
class Paced:
    """One rate-limited request: its place in the order (`seq`), its frame and its future."""

    seq: int
    request_id: int
    ftype: str
    fields: dict[str, Any]
    future: Future[dict[str, Any]]
    data: bytes | None = None  # encoded for its first send; a resend is encoded anew
    refusals: int = 0  # refused for itself, not held behind an earlier refusal


class Verdict(enum.Enum):
    RETRY = "queued again under its new request id"
    GIVE_UP = "refused MAX_TRIES times: the caller fails it"
    NOT_OURS = "not a paced request in flight"


class Pacer:
    def __init__(
        self,
        rate: float,
        burst: int,
        max_refusals: int | None,
        now: float,
        encode: Callable[[dict[str, Any]], bytes],
    ) -> None:
        """`max_refusals` None: the server announced no flood limit, so nothing is retried."""
        self.rate = rate
        self.max_refusals = max_refusals
        self._bucket = TokenBucket.full(rate * PACE_MARGIN, burst, now, 1)
        self._encode = encode
        self._waiting: list[Paced] = []  # by seq
        self._inflight: dict[int, tuple[int, Paced]] = {}  # request id -> (wire number, request)
        self._wire = 0  # how many paced requests we have sent: the server sees them in this order
        self._last_ok = 0  # the wire number of the last one it carried out
        self._refused: list[int] = []  # wire numbers it refused after that: its count in a row
        self._holding = False  # refused: the server refuses all until we send `resume`
        self._resume_at = 0.0
        self.retries = 0  # requests sent again

    @property
    def idle(self) -> bool:
        """Nothing waits to be sent and no reply could bring a request back."""
        return not self._waiting and not self._inflight

    def add(self, request: Paced) -> None:
        bisect.insort(self._waiting, request, key=lambda p: p.seq)

    def take_due(self, now: float) -> tuple[list[bytes], list[tuple[Paced, ProtocolError]]]:
        """The requests to send now, encoded and in order, and those that no longer encode (a
        resend carries a longer id and `resume`: it may outgrow the frame limit)."""
        out: list[bytes] = []
        failed: list[tuple[Paced, ProtocolError]] = []
        if self._holding and (self._inflight or now < self._resume_at):
            return out, failed
        while self._waiting and self._room_for_one() and self._bucket.take(now):
            request = self._waiting.pop(0)
            data = request.data
            if data is None or self._holding:
                frame = {"type": request.ftype, "id": request.request_id, **request.fields}
                if self._holding:
                    frame["resume"] = True
                try:
                    data = self._encode(frame)
                except ProtocolError as exc:
                    failed.append((request, exc))
                    continue
            self._holding = False
            self._wire += 1
            self._inflight[request.request_id] = (self._wire, request)
            out.append(data)
        return out, failed

    def next_due(self, now: float) -> float | None:
        """Seconds until take_due() may send something; None while only a reply can help."""
        if not self._waiting:
            return None
        if self._holding:
            if self._inflight:
                return None
            wait = self._resume_at - now
        elif not self._room_for_one():
            return None
        else:
            wait = 0.0
        return max(0.0, wait, self._bucket.retry_after(now))

    def answered(self, request_id: int, carried_out: bool) -> None:
        """Any reply but `rate_limited`. Only an `ok` proves the server spent a token on it
        (a malformed request never reaches its bucket), which ends its refusals in a row."""
        entry = self._inflight.pop(request_id, None)
        if entry is not None and carried_out and entry[0] > self._last_ok:
            self._last_ok = entry[0]
            self._refused = [w for w in self._refused if w > self._last_ok]

    def refused(self, request_id: int, retry_after: Any, now: float, new_id: int) -> Verdict:
        """A `rate_limited` reply: queue the request again, in its place, under `new_id`."""
        entry = self._inflight.pop(request_id, None)
        if entry is None:
            return Verdict.NOT_OURS
        wire, request = entry
        if wire > self._last_ok:
            self._refused.append(wire)
        if self.max_refusals is None:
            return Verdict.GIVE_UP
        if not self._holding:  # the first refusal; the ones after it are only held behind it
            request.refusals += 1
            self._holding = True
        self._bucket.drain(now)  # the server has no token left: neither do we
        if request.refusals >= MAX_TRIES:
            return Verdict.GIVE_UP
        valid = isinstance(retry_after, int | float) and not isinstance(retry_after, bool)
        wait = min(float(retry_after), MAX_WAIT) if valid and retry_after >= 0 else 1 / self.rate
        wait *= BACKOFF ** max(0, request.refusals - 1) / PACE_MARGIN
        self._resume_at = max(self._resume_at, now + wait)
        request.request_id, request.data = new_id, None
        self.add(request)
        self.retries += 1
        return Verdict.RETRY

    def _room_for_one(self) -> bool:
        """Could one more request go without risking the flood limit if all were refused?"""
        if not self._inflight or self.max_refusals is None:
            return True
        return len(self._refused) + len(self._inflight) + 1 < self.max_refusals
