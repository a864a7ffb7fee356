"""Limits per source address that are cheap enough to check before any work: how fast one
address may open connections, and how many new names it may bind an hour. Addresses on the
`--trusted` list (a reverse proxy, a NAT gateway everyone sits behind) skip both.

The clock is the caller's (monotonic seconds), so tests move it instead of sleeping.
"""

from __future__ import annotations

import ipaddress

from securechat.errors import ConfigError
from securechat.ratelimit import AddressBuckets

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
HOUR = 3600.0


def parse_trusted(text: str) -> tuple[Network, ...]:
    """'127.0.0.0/8, ::1, 10.1.2.3' -> networks; a bad entry is a ConfigError naming it."""
    networks = []
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ConfigError(
                f"--trusted: {entry!r} is not an IP address or network (like 10.0.0.0/8 or ::1)"
            ) from None
    return tuple(networks)


class AddressLimit:
    """A token bucket per address (none for trusted ones); rate 0 means no limit."""

    def __init__(self, rate: float, burst: int, trusted: tuple[Network, ...]) -> None:
        self._buckets = AddressBuckets(rate, burst) if rate > 0 else None
        self._trusted = trusted
        self._verdicts: dict[str, bool] = {}  # address -> trusted, remembered for the hot path

    def allow(self, address: str, now: float) -> bool:
        if self._buckets is None or self.trusted(address):
            return True
        return self._buckets.take(address, now)

    def trusted(self, address: str) -> bool:
        if not self._trusted:
            return False
        verdict = self._verdicts.get(address)
        if verdict is None:
            if len(self._verdicts) > 4096:  # many addresses passing by: start afresh
                self._verdicts.clear()
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                ip = None
            verdict = ip is not None and any(ip in net for net in self._trusted)
            self._verdicts[address] = verdict
        return verdict

    def retry_after(self, address: str, now: float) -> float:
        return 0.0 if self._buckets is None else self._buckets.retry_after(address, now)

    @property
    def refused(self) -> int:
        return 0 if self._buckets is None else self._buckets.refused


def new_name_cap(per_hour: int, trusted: tuple[Network, ...]) -> AddressLimit:
    """New names an hour from one address: `per_hour` at once, then refilled over the hour."""
    return AddressLimit(per_hour / HOUR, max(1, per_hour), trusted)
