"""Every setting of `securechat server` (and the connection options of the clients), declared once.

The click options, ServerConfig's defaults and its checks, and README's table of server settings
are all made from these tables, so a default or a range is never written twice.
`python -m securechat.settings --markdown` prints README's table; a test compares the two.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from securechat import framing, protocol
from securechat.errors import ConfigError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 12345
DEFAULT_CERTS = Path("certs")
DEFAULT_CA = DEFAULT_CERTS / "ca.pem"
KIB, MIB = 1024, 1024 * 1024


@dataclass(frozen=True)
class Setting:
    """One option: its flag and variable, the field it sets, its type, range and default.

    `kind` is int, float, str, bool (a flag that is off by default) or Path. `per_unit` converts
    what the flag takes into what the field holds (`--dm-ttl` takes hours, `dm_ttl_ms` holds
    milliseconds). `at_limit` is README's word on what happens at the limit, where help is terse.
    """

    name: str  # the ServerConfig field (or client option) it sets
    flag: str
    env: str
    kind: type
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    unit: str = ""
    choices: tuple[str, ...] = ()
    per_unit: int = 1
    default_text: str = ""  # for a default worked out at run time (default None)
    at_limit: str = ""

    def to_field(self, value: Any) -> Any:
        """What the field holds for a value given in the flag's unit."""
        return value if self.per_unit == 1 else int(value * self.per_unit)

    @property
    def field_default(self) -> Any:
        return self.to_field(self.default)

    def check(self, held: Any) -> None:
        """Refuse a field value (in the field's unit) that the flag would refuse."""
        if self.choices and held not in self.choices:
            choices = ", ".join(self.choices)
            raise ConfigError(f"{self.name} ({self.flag}) must be one of {choices}, not {held!r}")
        if self.kind not in (int, float):
            return
        numeric = (int,) if self.kind is int else (int, float)
        if isinstance(held, bool) or not isinstance(held, numeric):
            kind = "an integer" if self.kind is int else "a number"
            raise ConfigError(f"{self.name} ({self.flag}) must be {kind}, not {held!r}")
        value = held / self.per_unit
        subject = f"{self.name}={_num(held)} ({self.flag}"
        if self.per_unit != 1:
            subject += f" {_num(value)} {self.unit}"
        if self.minimum is not None and value < self.minimum:
            raise ConfigError(f"{subject}) is below the minimum, {_amount(self.minimum, self)}")
        if self.maximum is not None and value > self.maximum:
            raise ConfigError(f"{subject}) is above the maximum, {_amount(self.maximum, self)}")


def _num(number: float) -> str:
    """An integer without a point, and other numbers briefly (10.0 -> "10", 0.01 -> "0.01")."""
    if isinstance(number, int) or float(number).is_integer():
        return str(int(number))
    return f"{number:g}"


def _amount(number: float, s: Setting) -> str:
    return _human(number, s.unit) if s.unit in ("%", "/s") else f"{_num(number)} {s.unit}".rstrip()


SERVER: tuple[Setting, ...] = (
    Setting("host", "--host", "SECURECHAT_HOST", str, DEFAULT_HOST, "Address to listen on."),
    Setting("port", "--port", "SECURECHAT_PORT", int, DEFAULT_PORT,
            "TCP port to listen on (0 picks a free one).", 0, 65535),
    Setting("certs_dir", "--certs", "SECURECHAT_CERTS", Path, DEFAULT_CERTS,
            "Folder with server.pem, server.key and ca.pem."),
    Setting("data_dir", "--data", "SECURECHAT_DATA", Path, Path("data"),
            "Folder for the server's SQLite database."),
    Setting("require_client_cert", "--require-client-cert", "SECURECHAT_REQUIRE_CLIENT_CERT",
            bool, False, "Mutual TLS: refuse clients without a certificate from our CA."),
    Setting("io_threads", "--io-threads", "SECURECHAT_IO_THREADS", int, 1,
            "I/O event-loop threads. One is the fastest measured: the threads share one "
            "interpreter lock, so more add lock hand-offs and no throughput (BENCHMARKS.md); "
            "the way past one core is several server processes.", 1, 64),
    Setting("log_level", "--log-level", "SECURECHAT_LOG_LEVEL", str, "info",
            "How much to log (to stderr).", choices=("debug", "info", "warning", "error")),
    Setting("history", "--history", "SECURECHAT_HISTORY", int, 100,
            "Room messages kept per room and shown to whoever joins (0: none).", 0, 100_000),
    Setting("dm_ttl_ms", "--dm-ttl", "SECURECHAT_DM_TTL", float, 168.0,
            "Hours a DM waits for an offline recipient.", 0.01, 24 * 365, "hours",
            per_unit=3600 * 1000, at_limit="a DM still waiting for its recipient is deleted"),
    Setting("dm_quota_count", "--dm-quota-count", "SECURECHAT_DM_QUOTA_COUNT", int, 1000,
            "Most DMs waiting for one recipient.", 1, None,
            at_limit="more DMs for that recipient are refused until some are delivered"),
    Setting("dm_quota_bytes", "--dm-quota-bytes", "SECURECHAT_DM_QUOTA_BYTES", int, 10 * MIB,
            "Most bytes of DMs waiting for one recipient.", KIB, None, "bytes",
            at_limit="the same, counted in bytes"),
    Setting("dm_sender_share", "--dm-sender-share", "SECURECHAT_DM_SENDER_SHARE", int, 10,
            "Percent of each recipient's DM quota (count and bytes) one sender may fill.", 1, 100,
            "%", at_limit="one sender may fill at most this share of each recipient's queue of "
            "waiting DMs; more is refused with \"your "
            "share of bob's queue of waiting messages is full\", and other senders still get "
            "through"),
    Setting("max_frame", "--max-frame", "SECURECHAT_MAX_FRAME", int, framing.MAX_FRAME_DEFAULT,
            "Largest frame a client may send, in bytes (checked before it is read).",
            framing.MIN_FRAME, framing.MAX_FRAME_CEILING, "bytes",
            at_limit="a larger frame header is refused before anything is read, and the "
            "connection closed; the server announces the limit, and our client keeps to it"),
    Setting("handshake_timeout", "--handshake-timeout", "SECURECHAT_HANDSHAKE_TIMEOUT", float,
            10.0, "Seconds a new connection has to finish its TLS handshake.", 0.1, 600, "s",
            at_limit="a connection that has not finished TLS is closed"),
    Setting("login_timeout", "--login-timeout", "SECURECHAT_LOGIN_TIMEOUT", float, 30.0,
            "Seconds after the handshake to finish logging in.", 0.1, 600, "s",
            at_limit="one that has not logged in after its handshake is told so and closed"),
    Setting("idle_timeout", "--idle-timeout", "SECURECHAT_IDLE_TIMEOUT", float, 300.0,
            "Seconds of silence before a client is closed; pinged at half of it (0: never).",
            0, None, "s",
            at_limit="a client silent for half of it is pinged; silent for all of it, closed "
            "(0: never). Our client answers pings, and itself gives up on a server silent for "
            "80 s, then reconnects"),
    Setting("max_connections", "--max-connections", "SECURECHAT_MAX_CONNECTIONS", int, 10_000,
            "Connections in total; more are refused with a reason (0: no cap).", 0, None,
            at_limit="more are told \"the server is full\" and closed (0: no cap); the server "
            "raises its own file limit to match, and warns if the system will not allow it"),
    Setting("max_per_address", "--max-per-address", "SECURECHAT_MAX_PER_ADDRESS", int, 500,
            "Connections from one IP address (0: no cap).", 0, None,
            at_limit="more from one IP address are told so and closed (0: no cap)"),
    Setting("connect_rate", "--connect-rate", "SECURECHAT_CONNECT_RATE", float, 10.0,
            "New connections a second one IP address may open, on average (0: no limit).", 0,
            None, "/s",
            at_limit="more from one address are closed at once, before any TLS work (a flood "
            "of handshakes costs next to nothing); behind a reverse proxy or NAT every client "
            "shares one address: list the proxy in `--trusted` and let it do the limiting"),
    Setting("connect_burst", "--connect-burst", "SECURECHAT_CONNECT_BURST", int, 50,
            "New connections one IP address may open at once, before --connect-rate applies.",
            1, None),
    Setting("new_names", "--new-names", "SECURECHAT_NEW_NAMES", int, 20,
            "New names one IP address may bind to new keys, per hour (0: no cap).", 0, None,
            "names",
            at_limit="that many at once, then the allowance refills over the hour; a login that "
            "would bind one more is refused with `too_many_names` (existing names log in as "
            "always)"),
    Setting("trusted", "--trusted", "SECURECHAT_TRUSTED", str, "127.0.0.0/8,::1",
            "Comma-separated IP addresses or networks exempt from --connect-rate and "
            "--new-names (a reverse proxy, a NAT gateway); --max-per-address still applies.",
            at_limit="addresses or networks (comma-separated) that skip `--connect-rate` and "
            "`--new-names`: a reverse proxy or NAT gateway, whose clients all share its "
            "address; `--max-per-address` still applies to them. Empty: nobody"),
    Setting("rate", "--rate", "SECURECHAT_RATE", float, 10.0,
            "Requests (messages, joins, DMs...) a user may send per second, on average.", 0.1,
            None, "/s",
            at_limit="a user's requests over the rate are refused with \"slow down\" and not "
            "relayed; our client paces itself to the rate the server announces, and sends "
            "again (in order, once) what a jittery link still got refused, so a bot piping in "
            "a thousand lines is slowed, never cut off and never loses a line"),
    Setting("burst", "--burst", "SECURECHAT_BURST", int, 30,
            "Requests a user may send at once, before the rate limit applies.", 1, None),
    Setting("flood_refusals", "--flood-refusals", "SECURECHAT_FLOOD_REFUSALS", int, 20,
            "Rate-limited requests in a row after which the sender is disconnected.", 1, None,
            at_limit="that many refused requests in a row disconnect the sender"),
    Setting("max_queue", "--max-queue", "SECURECHAT_MAX_QUEUE", int, 4 * MIB,
            "Bytes queued for a client that does not read before it is dropped.", 64 * KIB,
            None, "bytes",
            at_limit="a client that stops reading is dropped once this much waits for it; "
            "nobody else waits"),
    Setting("output_budget", "--output-budget", "SECURECHAT_OUTPUT_BUDGET", int, 256 * MIB,
            "Bytes queued for all clients together (0: no budget).", 0, None, "bytes",
            at_limit="over it, the clients with the biggest queues (those not reading) are "
            "dropped, biggest first, as at `--max-queue`, until the total fits; they lose room "
            "traffic only (a DM waits in the store until acknowledged). The default suits a "
            "1 GB machine"),
    Setting("max_message", "--max-message", "SECURECHAT_MAX_MESSAGE", int, protocol.TEXT_MAX,
            "Characters in one room message.", 1, protocol.TEXT_MAX, "characters",
            at_limit="a longer room message is refused"),
    Setting("presence_limit", "--presence-limit", "SECURECHAT_PRESENCE_LIMIT", int, 1000,
            "Rooms with more members than this tell only the user of a join or part "
            "(0: always all).", 0, None, "members",
            at_limit="a bigger room tells only the user of their own join or part, not everyone "
            "(0: always everyone); `/who` still lists it"),
)  # fmt: skip

# Where to connect and as whom: the same options for the terminal client and the GUI.
CHAT: tuple[Setting, ...] = (
    Setting("user", "--user", "SECURECHAT_USER_NAME", str, None,
            "User name (remembered in the key file after the first login)."),
    Setting("host", "--host", "SECURECHAT_SERVER_HOST", str, DEFAULT_HOST, "Server host name."),
    Setting("port", "--port", "SECURECHAT_SERVER_PORT", int, DEFAULT_PORT, "Server port.", 1,
            65535),
    Setting("ca", "--ca", "SECURECHAT_CA", Path, DEFAULT_CA,
            "CA certificate that signed the server's."),
    Setting("no_history", "--no-history", "SECURECHAT_NO_HISTORY", bool, False,
            "Keep no local history (by default an encrypted one lives beside the key file)."),
)  # fmt: skip

_SERVER_BY_NAME = {s.name: s for s in SERVER}


def server_default(name: str) -> Any:
    """ServerConfig's default for a field, in the field's unit."""
    return _SERVER_BY_NAME[name].field_default


def check_server_fields(values: Mapping[str, Any]) -> None:
    """Raise ConfigError for the first value the `securechat server` flags would refuse."""
    for setting in SERVER:
        if setting.name in values:
            setting.check(values[setting.name])


def markdown_table() -> str:
    """README's table of server settings."""
    lines = [
        "| flag | variable | default | range | what it does, or what happens at the limit |",
        "|---|---|---|---|---|",
    ]
    for s in SERVER:
        text = s.at_limit or s.help
        lines.append(
            f"| `{s.flag}` | `{s.env}` | {_shown_default(s)} | {_shown_range(s)} | {text} |"
        )
    return "\n".join(lines) + "\n"


def _human(number: float, unit: str) -> str:
    if unit == "bytes" and number >= KIB:
        for size, name in ((MIB, "MiB"), (KIB, "KiB")):
            if number % size == 0:
                return f"{_num(number / size)} {name}"
    if unit in ("%", "/s"):
        return f"{_num(number)}{unit}"
    return f"{_num(number)} {unit}".rstrip()


def _shown_default(s: Setting) -> str:
    if s.default is None:
        return s.default_text
    if s.kind is bool:
        return "off"
    if s.kind in (int, float):
        return _human(s.default, s.unit)
    return f"`{s.default}`"


def _shown_range(s: Setting) -> str:
    if s.choices:
        return ", ".join(f"`{c}`" for c in s.choices)
    low, high = s.minimum, s.maximum
    if low is not None and high is not None:
        # "1 KiB to 16 MiB", but "0 to 65535" and "0.1 to 600 s"
        shown_low = _human(low, s.unit) if s.unit == "bytes" else _num(low)
        return f"{shown_low} to {_human(high, s.unit)}"
    if low is not None:
        return f"at least {_human(low, s.unit)}"
    return ""


if __name__ == "__main__":
    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m securechat.settings --markdown")
    sys.stdout.write(markdown_table())
