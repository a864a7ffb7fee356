"""One chat session for a front end: connect, redial with backoff when the connection drops, and
hold the lines typed while offline. The terminal and the GUI both run on it.

Threads: `events()` runs on the front end's event thread and blocks there (in the Client's event
queue, and in the backoff wait between redials); `hold`, `resume`, `stop` and `close` may be
called from any thread (the held lines are under one lock). It words nothing: it reports what
happened as session events (ConnectionLost, Retrying, Reconnected, GaveUp), and the front end
says it in its own words.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from securechat import identity
from securechat.client.api import Client
from securechat.client.events import Closed, Event
from securechat.client.history import LocalHistory
from securechat.client.reconnect import backoff_delays
from securechat.errors import AuthError, ConfigError, SecureChatError
from securechat.identity import Identity
from securechat.protocol import LOBBY, valid_name

REJOIN_TIMEOUT = 10.0  # seconds to wait for each room's answer after a reconnect


@dataclass(frozen=True)
class ChatOptions:
    """Where to connect and as whom; the command line and the GUI's connect dialog fill it."""

    key_path: Path
    user: str | None
    host: str
    port: int
    ca: Path
    cert: Path | None = None
    cert_key: Path | None = None
    history: bool = True  # keep the encrypted local history beside the key file


def resolve_user(key_path: Path, user: str | None) -> str:
    """The user name given, or the one the key file remembers; checked."""
    name = user or identity.peek_user(key_path)
    if not name and (old := identity.legacy_user(key_path)):
        raise ConfigError(
            f"{key_path} comes from an older securechat and nothing vouches for the user "
            f"name in it ({old!r}); pass --user NAME once to confirm yours"
        )
    if not name:
        raise ConfigError(f"no user name yet for {key_path}; pass --user NAME the first time")
    name = name.lower()
    why = valid_name(name)
    if why:
        raise ConfigError(f"user name {name!r} {why}")
    return name


# -- what the session reports besides the Client's own events --------------------------------------


@dataclass(frozen=True)
class ConnectionLost:
    """The connection dropped and the session is dialling again (instead of a Closed)."""

    reason: str


@dataclass(frozen=True)
class Retrying:
    """The next attempt to reconnect is due in `delay` seconds."""

    attempt: int
    delay: float
    reason: str  # why the connection (or the last attempt) failed


@dataclass(frozen=True)
class Reconnected:
    """Logged in again and back in our rooms, but for `rejoin_failures` ((room, why) pairs). The
    front end calls resume() to get the lines held meanwhile."""

    rejoin_failures: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class GaveUp:
    """No more redials: the server refused the login (`login_refused`), or the attempts ran out."""

    reason: str
    login_refused: bool


SessionEvent = ConnectionLost | Retrying | Reconnected | GaveUp


@dataclass(frozen=True)
class Held:
    """A line typed while offline, and where the front end says it was typed (or None)."""

    text: str
    where: str | None = None


class ChatSession:
    def __init__(
        self,
        client: Client,
        dial: Callable[[], Client] | None = None,
        *,
        history: LocalHistory | None = None,
        delays: Callable[[], Iterable[float]] = backoff_delays,
    ) -> None:
        """`dial` connects and logs in again (None: a dropped connection ends the session);
        `history` is closed with the session."""
        self._client = client
        self._dial = dial
        self._history = history
        self._delays = delays
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._held: list[Held] = []
        self._connected = True
        self._closed = False

    @classmethod
    def connect(cls, opts: ChatOptions, me: Identity, user: str) -> ChatSession:
        """Connect and log in as `user` (see resolve_user) with the unlocked identity `me`, with
        the local history beside its key file unless opts.history is off."""
        history = LocalHistory.beside(me) if opts.history else None

        def dial() -> Client:
            return Client.connect(
                opts.host,
                opts.port,
                me,
                user,
                opts.ca,
                cert=opts.cert,
                cert_key=opts.cert_key,
                history=history,
            )

        try:
            client = dial()
        except BaseException:
            if history is not None:
                history.close()
            raise
        if me.user != user:
            identity.remember_user(me, user)
        return cls(client, dial, history=history)

    @property
    def client(self) -> Client:
        """The current connection (a new one after each reconnect)."""
        return self._client

    @property
    def connected(self) -> bool:
        """False from a dropped connection until resume(): lines typed then are to be held."""
        return self._connected

    @property
    def redials(self) -> bool:
        """Whether a dropped connection is dialled again."""
        return self._dial is not None and not self._stopped.is_set()

    # -- held lines --------------------------------------------------------------------------------

    def hold(self, text: str, where: str | None = None) -> None:
        with self._lock:
            self._held.append(Held(text, where))

    @property
    def held(self) -> list[Held]:
        with self._lock:
            return list(self._held)

    def resume(self) -> list[Held]:
        """After Reconnected: mark the session connected and hand over the held lines, in the
        order they were typed, to be sent now."""
        with self._lock:
            held, self._held = self._held, []
            self._connected = True
        return held

    # -- events ------------------------------------------------------------------------------------

    def events(self) -> Iterator[Event | SessionEvent]:
        """The Client's events, across reconnects. A drop that will be redialled shows as
        ConnectionLost, Retrying... and Reconnected or GaveUp; a Closed ends the session."""
        while True:
            for event in self._client.events():
                if isinstance(event, Closed) and self.redials:
                    break
                yield event
            else:
                return
            self._connected = False
            yield ConnectionLost(event.reason)
            reconnected = yield from self._redial(event.reason)
            if not reconnected:
                return

    def _redial(self, reason: str) -> Generator[SessionEvent, None, bool]:
        assert self._dial is not None
        for attempt, delay in enumerate(self._delays(), start=1):
            yield Retrying(attempt, delay, reason)
            if self._stopped.wait(delay):
                return False
            try:
                new = self._dial()
            except AuthError as exc:
                yield GaveUp(str(exc), login_refused=True)
                return False
            except SecureChatError as exc:
                reason = str(exc)
                continue
            rooms = sorted(self._client.rooms - {LOBBY})
            self._client = new
            yield Reconnected(tuple(self._rejoin(new, rooms)))
            return True
        yield GaveUp(reason, login_refused=False)
        return False

    @staticmethod
    def _rejoin(client: Client, rooms: list[str]) -> Iterator[tuple[str, str]]:
        for room in rooms:
            try:
                client.join(room).result(REJOIN_TIMEOUT)
            except (SecureChatError, TimeoutError) as exc:
                yield room, str(exc)

    # -- the end ----------------------------------------------------------------------------------

    def stop(self) -> None:
        """No more redials (the user is leaving); a backoff wait under way ends at once."""
        self._stopped.set()

    def close(self, idle_timeout: float | None = None) -> None:
        """Stop, optionally wait up to `idle_timeout` for the replies outstanding, disconnect,
        and close the local history. Only the first call does anything."""
        self.stop()
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if idle_timeout is not None:
            self._client.wait_idle(idle_timeout)
        self._client.close()
        if self._history is not None:
            self._history.close()
