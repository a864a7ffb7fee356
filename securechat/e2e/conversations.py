"""Sequence numbers and hash chains of DMs: the sender's counters, and what the receiver shows.

Each sending device keeps one chain per recipient device (inner.py). The receiving device feeds
every record it decrypted to ConversationTracker.accept, which says how it arrived:

  - IN_ORDER: the next in its chain, and its `prev` is the hash of the one before;
  - GAP: later than the next: the messages in between are missing ("a message from bob is
    missing"), which is how a drop by the server becomes visible;
  - OUT_OF_ORDER: one of those missing messages, arriving late (marked as such), whose hash
    must be the `prev` its successor named;
  and refuses a replay (a sequence number already seen, or a chain the sender has since left)
  with ReplayedRecord, and a record that does not fit its chain with BrokenChain.

Message ids also pass the v1 ReplayGuard (a week's window, bounded, persisted). The state is
bounded: MAX_CHAINS chains (the least recently used go first; the ReplayGuard still stands for
them) and MAX_MISSING remembered gaps per chain (older gaps are then given up as lost). It is
exported as plain JSON, to be saved sealed (storage.py) after every accepted record, so replays
are refused across restarts too. Not thread-safe; no I/O here.
"""

from __future__ import annotations

import enum
import secrets
from dataclasses import dataclass, field, replace
from typing import Any

from securechat.e2e.inner import RECORD_KIND, InnerRecord
from securechat.errors import BrokenChain, DeviceStateError, ReplayedRecord
from securechat.sealing import OpenedDM, ReplayGuard, ReplayStateError

MAX_CHAINS = 4096
MAX_MISSING = 1000
MAX_OLD_CHAINS = 8

_Key = tuple[str, str, str]


class Arrival(enum.Enum):
    IN_ORDER = "in_order"
    GAP = "gap"
    OUT_OF_ORDER = "out_of_order"


@dataclass(frozen=True)
class Delivery:
    """An accepted record and how it arrived; `missing` is how many went missing before it."""

    record: InnerRecord
    arrival: Arrival
    missing: int = 0

    def notice(self, me: str) -> str | None:
        """The line the front end shows beside the message, or None."""
        who = (
            f"you sent from device {self.record.sender_device}"
            if self.record.sender == me
            else f"from {self.record.sender}"
        )
        if self.arrival is Arrival.GAP:
            count = "a message" if self.missing == 1 else f"{self.missing} messages"
            verb = "is" if self.missing == 1 else "are"
            return f"{count} {who} {verb} missing"
        if self.arrival is Arrival.OUT_OF_ORDER:
            return "(arrived out of order)"
        return None


@dataclass(frozen=True)
class _Chain:
    chain: str
    last_seq: int
    last_hash: str
    missing: dict[int, str] = field(default_factory=dict)  # seq -> expected hash, "" if unknown
    old_chains: tuple[str, ...] = ()


def _new_chain_id() -> str:
    return secrets.token_hex(8)


class ConversationTracker:
    def __init__(
        self,
        me: str,
        my_device: str,
        *,
        guard: ReplayGuard | None = None,
        max_chains: int = MAX_CHAINS,
        max_missing: int = MAX_MISSING,
    ) -> None:
        self.me = me
        self.my_device = my_device
        self.guard = guard if guard is not None else ReplayGuard()
        self.max_chains = max_chains
        self.max_missing = max_missing
        # Insertion order is recency: the first entry is the least recently used.
        # Incoming chains by (sender, sender device, recipient): the recipient is us, or, for a
        # copy of what we sent from another device, the person it went to. Outgoing chains by
        # (us, recipient, recipient device).
        self._in: dict[_Key, _Chain] = {}
        self._out: dict[_Key, _Chain] = {}

    # -- sending ----------------------------------------------------------------------------------

    def next_record(
        self,
        recipient: str,
        recipient_device: str,
        message_id: str,
        ts: int,
        body: str,
        kind: str = RECORD_KIND,
    ) -> InnerRecord:
        """The record to send to one device next; call record_sent once it is handed over."""
        chain = self._out.get((self.me, recipient, recipient_device))
        chain_id, seq, prev = (
            (chain.chain, chain.last_seq + 1, chain.last_hash)
            if chain
            else (_new_chain_id(), 1, "")
        )
        return InnerRecord(
            sender=self.me,
            sender_device=self.my_device,
            recipient=recipient,
            recipient_device=recipient_device,
            message_id=message_id,
            ts=ts,
            body=body,
            chain=chain_id,
            seq=seq,
            prev=prev,
            kind=kind,
        )

    def record_sent(self, record: InnerRecord) -> None:
        key = (record.sender, record.recipient, record.recipient_device)
        old = self._out.pop(key, None)
        expected = (old.chain, old.last_seq + 1) if old else (record.chain, 1)
        if (record.chain, record.seq) != expected:
            if old is not None:
                self._out[key] = old  # not the record next_record made: nothing changes
            return
        self._put(self._out, key, _Chain(record.chain, record.seq, record.digest))

    # -- receiving --------------------------------------------------------------------------------

    def accept(self, record: InnerRecord, now_ms: int | None = None) -> Delivery:
        """How `record` arrived, remembering it; ReplayedRecord, BrokenChain, or the
        ReplayGuard's ReplayedMessage / StaleMessage refuse it."""
        key = (record.sender, record.sender_device, record.recipient)
        chain, delivery = self._place(self._in.get(key), record)
        self.guard.check(
            OpenedDM(record.sender, record.recipient, record.message_id, record.ts, record.body),
            now_ms,
        )
        self._in.pop(key, None)
        self._put(self._in, key, chain)
        return delivery

    def _place(self, chain: _Chain | None, record: InnerRecord) -> tuple[_Chain, Delivery]:
        """The chain's next state with `record` in it, and how it arrived (nothing changes)."""
        who = f"{record.sender}'s device {record.sender_device}"
        if chain is not None and record.chain in chain.old_chains:
            raise ReplayedRecord(
                f"a direct message from {who} belongs to a chain it has since left; it was "
                "dropped as a replay. The server may be replaying old messages"
            )
        if chain is None or chain.chain != record.chain:
            old = (*chain.old_chains, chain.chain)[-MAX_OLD_CHAINS:] if chain else ()
            chain = _Chain(record.chain, 0, "", {}, old)
        if record.seq == chain.last_seq + 1:
            if record.prev != chain.last_hash:
                raise self._broken(who)
            nxt = replace(chain, last_seq=record.seq, last_hash=record.digest)
            return nxt, Delivery(record, Arrival.IN_ORDER)
        if record.seq > chain.last_seq:
            gap = record.seq - chain.last_seq - 1
            first = max(chain.last_seq + 1, record.seq - self.max_missing)
            missing = {**chain.missing, **dict.fromkeys(range(first, record.seq), "")}
            missing[record.seq - 1] = record.prev  # the late one must hash to this
            kept = dict(sorted(missing.items())[-self.max_missing :])
            nxt = replace(chain, last_seq=record.seq, last_hash=record.digest, missing=kept)
            return nxt, Delivery(record, Arrival.GAP, gap)
        if record.seq in chain.missing:
            expected = chain.missing[record.seq]
            if expected and expected != record.digest:
                raise self._broken(who)
            missing = {s: h for s, h in chain.missing.items() if s != record.seq}
            if record.seq - 1 in missing and not missing[record.seq - 1]:
                missing[record.seq - 1] = record.prev
            return replace(chain, missing=missing), Delivery(record, Arrival.OUT_OF_ORDER)
        raise ReplayedRecord(
            f"a direct message from {who} arrived again (its sequence number was seen before); "
            "the copy was dropped. The server may be replaying old messages"
        )

    @staticmethod
    def _broken(who: str) -> BrokenChain:
        return BrokenChain(
            f"a direct message from {who} does not fit the messages before it (its hash chain "
            "breaks); it was dropped"
        )

    def missing(self, sender: str, sender_device: str) -> int:
        """How many messages of that device's chain to us are still missing."""
        chain = self._in.get((sender, sender_device, self.me))
        return len(chain.missing) if chain else 0

    def _put(self, table: dict[_Key, _Chain], key: _Key, chain: _Chain) -> None:
        table[key] = chain
        while len(table) > self.max_chains:
            del table[next(iter(table))]

    # -- persistence ------------------------------------------------------------------------------

    def export(self) -> dict[str, Any]:
        """Plain JSON-able state; ConversationTracker.load reads it back."""

        def rows(table: dict[_Key, _Chain]) -> list[list[Any]]:
            return [
                [
                    list(key),
                    c.chain,
                    c.last_seq,
                    c.last_hash,
                    [[s, h] for s, h in sorted(c.missing.items())],
                    list(c.old_chains),
                ]
                for key, c in table.items()
            ]

        return {
            "version": 1,
            "me": self.me,
            "device": self.my_device,
            "incoming": rows(self._in),
            "outgoing": rows(self._out),
            "guard": self.guard.export(),
        }

    @classmethod
    def load(cls, data: dict[str, Any], me: str, my_device: str, what: str) -> ConversationTracker:
        """The tracker `export` gave; DeviceStateError when it is damaged or someone else's."""
        damaged = DeviceStateError(
            f"{what} is damaged; move it aside to start afresh (replays of old messages may then "
            "be shown once more)"
        )
        if data.get("version") != 1 or data.get("me") != me or data.get("device") != my_device:
            raise damaged
        try:
            guard = ReplayGuard.load(data.get("guard"))
        except ReplayStateError:
            raise damaged from None
        tracker = cls(me, my_device, guard=guard)
        for name, table in (("incoming", tracker._in), ("outgoing", tracker._out)):
            items = data.get(name)
            if not isinstance(items, list):
                raise damaged
            for item in items:
                row = _parse_row(item)
                if row is None:
                    raise damaged
                table[row[0]] = row[1]
        return tracker


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _parse_row(item: Any) -> tuple[_Key, _Chain] | None:
    if not (isinstance(item, list) and len(item) == 6):
        return None
    key, chain, last, last_hash, missing, old = item
    if not (isinstance(key, list) and len(key) == 3 and all(isinstance(k, str) for k in key)):
        return None
    if not (isinstance(chain, str) and _is_int(last) and isinstance(last_hash, str)):
        return None
    if not (isinstance(old, list) and all(isinstance(c, str) for c in old)):
        return None
    if not isinstance(missing, list):
        return None
    gaps: dict[int, str] = {}
    for pair in missing:
        if not (isinstance(pair, list) and len(pair) == 2 and _is_int(pair[0])):
            return None
        if not isinstance(pair[1], str):
            return None
        gaps[pair[0]] = pair[1]
    return (key[0], key[1], key[2]), _Chain(chain, last, last_hash, gaps, tuple(old))
