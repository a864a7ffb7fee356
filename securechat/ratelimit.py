"""A token bucket: the server limits each user's request rate with it, and the client paces
itself to the rate the server announced, so that it is slowed down rather than refused.

No clock of its own and no I/O: the caller passes monotonic time, so tests feed it numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

# The requests each user's bucket limits, and so the ones a client paces. Acks have a bucket of
# their own (a dropped ack only means the DM comes again); pings, pongs and bye are free.
# A device's own publications at login (publish_device, prekey_count, publish_prekeys) are not
# counted: the store bounds them (one record per device, at most 100 one-time keys held).
RATE_LIMITED = frozenset(
    {"join", "part", "say", "say_encrypted", "rooms", "who", "history", "keys", "dm", "devices"}
    | {"claim_prekeys", "revoke"}
    | {"dms"}  # one token for its whole batch of envelopes, as claim_prekeys for many users
)


@dataclass(slots=True)  # two per connection: slots keep a held connection smaller
class TokenBucket:
    """`rate` tokens a second, at most `burst` saved up; each request spends one.

    After `max_refusals` refusals in a row (a sender that goes on while told to slow down) the
    bucket reports a flood, and the caller drops the sender. A request that gets through resets
    that count: a client that only bursts now and then is never dropped.

    take_in_order() is for a sender that pipelines and sends refused requests again: once it
    refuses one, it refuses every later one too (spending nothing, but counting each refusal)
    until one comes with `resume`, which the sender sets only once it has seen the refusals. What
    gets through is then always in the order it was sent, with no gap a retry would fill late.
    """

    rate: float
    burst: int
    max_refusals: int
    tokens: float = 0.0
    stamp: float = 0.0
    refusals: int = 0
    held: bool = False

    @classmethod
    def full(cls, rate: float, burst: int, now: float, max_refusals: int) -> TokenBucket:
        return cls(rate, burst, max_refusals, tokens=float(burst), stamp=now)

    def take(self, now: float) -> bool:
        """Spend a token if there is one; False means refuse this request."""
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            self.refusals = 0
            return True
        self.refusals += 1
        return False

    def take_in_order(self, now: float, resume: bool) -> bool:
        """take(), but after a refusal refuse everything until a request says `resume`."""
        if self.held and not resume:
            self.refusals += 1
            return False
        self.held = not self.take(now)
        return not self.held

    def drain(self, now: float) -> None:
        """Spend everything saved up (the other side of a link says it has nothing left)."""
        self._refill(now)
        self.tokens = 0.0

    def retry_after(self, now: float) -> float:
        """Seconds until the next token."""
        self._refill(now)
        return max(0.0, 1.0 - self.tokens) / self.rate

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(float(self.burst), self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    @property
    def flooding(self) -> bool:
        return self.refusals >= self.max_refusals


class AddressBuckets:
    """A TokenBucket per source address, for limits that must cost next to nothing: the
    connection throttle (checked before any TLS work) and the cap on new names.

    An address gets a full bucket the first time it is seen. Buckets that have filled up again
    are forgotten now and then, so the table stays as small as the set of addresses that are
    busy right now, however many addresses come and go. Not thread-safe: each instance belongs
    to one thread (the listener, or the store worker).
    """

    PRUNE_EVERY = 1024  # takes between two sweeps of full buckets

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self.refused = 0  # for the server's periodic log line
        self._buckets: dict[str, TokenBucket] = {}
        self._takes = 0

    def take(self, address: str, now: float) -> bool:
        """Spend one of `address`'s tokens; False means refuse."""
        self._takes += 1
        if self._takes % self.PRUNE_EVERY == 0:
            self._prune(now)
        bucket = self._buckets.get(address)
        if bucket is None:
            bucket = self._buckets[address] = TokenBucket.full(self.rate, self.burst, now, 1)
        if bucket.take(now):
            return True
        self.refused += 1
        return False

    def retry_after(self, address: str, now: float) -> float:
        """Seconds until `address` has a token again (0 for an address not seen)."""
        bucket = self._buckets.get(address)
        return 0.0 if bucket is None else bucket.retry_after(now)

    def _prune(self, now: float) -> None:
        buckets = self._buckets
        full = [a for a, b in buckets.items() if b.tokens + (now - b.stamp) * b.rate >= b.burst]
        for address in full:
            del buckets[address]

    def __len__(self) -> int:
        return len(self._buckets)
