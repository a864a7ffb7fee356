"""The one session both front ends run on: a real server stopped and started again under it, the
redial with backoff, the rooms rejoined, the lines held while offline, and the ways it ends. Also
the controller's one-owner-thread rule."""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from securechat.client import Client
from securechat.client.chat_session import (
    ChatSession,
    ConnectionLost,
    GaveUp,
    Held,
    Reconnected,
    Retrying,
)
from securechat.client.events import Closed, Joined, Message, RoomState
from securechat.server.app import Server
from securechat.terminal.controller import Controller, WrongThread

from .conftest import plain_room_kept, start_server

WAIT = 30.0


class Watched:
    """A session's events, read on a thread of their own as a front end's event thread does."""

    def __init__(self, session: ChatSession) -> None:
        self.session = session
        self.seen: queue.Queue[object] = queue.Queue()
        self.done = threading.Event()
        threading.Thread(target=self._pump, name="events", daemon=True).start()

    def _pump(self) -> None:
        try:
            for event in self.session.events():
                self.seen.put(event)
        finally:
            self.done.set()

    def next_of(self, kind: type, *, skipping: tuple[type, ...] = ()) -> object:
        """The next event of type `kind`; the events before it must be of the `skipping` types
        (or client events the server sends anyway: joins, parts, messages, a room's state)."""
        while True:
            event = self.seen.get(timeout=WAIT)
            if isinstance(event, kind):
                return event
            allowed = (*skipping, Joined, Message, RoomState)
            assert isinstance(event, allowed), f"{event!r} before any {kind.__name__}"


@pytest.fixture
def restartable(certs_dir: Path, tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """start(port=0) starts a server on the same data folder (and port) as the last one."""
    started: list[Server] = []

    def start(port: int = 0) -> Server:
        srv = start_server(certs_dir, tmp_path / "data", port=port)
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


def dialler(
    certs_dir: Path, make_identity: Callable, port: int, key: str = "alice"
) -> Callable[[], Client]:
    return lambda: Client.connect(
        "127.0.0.1", port, make_identity(key), "alice", certs_dir / "ca.pem"
    )


def quick() -> Iterator[float]:
    return itertools.repeat(0.05)


def test_a_dropped_connection_is_redialled_and_the_held_lines_come_back_after_it(
    restartable, certs_dir, make_identity
) -> None:
    srv = restartable()
    port = srv.address[1]
    # Plain, and kept so by its history across the restart: the held lines go out as say.
    plain_room_kept(srv.address, certs_dir, make_identity("keeper"), "#dev")
    dial = dialler(certs_dir, make_identity, port)
    session = ChatSession(dial(), dial, delays=quick)
    first = session.client
    first.join("#dev").result(WAIT)
    watched = Watched(session)
    srv.stop()
    lost = watched.next_of(ConnectionLost)
    assert lost == ConnectionLost("server shutting down")
    assert not session.connected
    session.hold("typed while the server was down", "#dev")
    session.hold("and a second line")
    # The server is down: the attempts fail, each after its own delay, and are counted.
    attempts = [watched.next_of(Retrying).attempt for _ in range(3)]
    assert attempts == [1, 2, 3]
    restartable(port=port)
    back = watched.next_of(Reconnected, skipping=(Retrying,))
    assert back == Reconnected(())  # every room rejoined
    assert session.client is not first and "#dev" in session.client.rooms
    assert not session.connected  # until the front end takes the held lines
    assert session.resume() == [
        Held("typed while the server was down", "#dev"),
        Held("and a second line"),
    ]
    assert session.connected and session.held == []
    session.client.send("#dev", "after").result(WAIT)
    session.close(idle_timeout=WAIT)
    assert isinstance(watched.next_of(Closed), Closed)  # the session's last event
    assert watched.done.wait(WAIT)


def test_a_login_refused_on_redial_gives_up_at_once(restartable, certs_dir, make_identity) -> None:
    srv = restartable()
    port = srv.address[1]
    alice = dialler(certs_dir, make_identity, port)()
    impostor = dialler(certs_dir, make_identity, port, key="mallory")
    session = ChatSession(alice, impostor, delays=quick)
    watched = Watched(session)
    srv.stop()
    watched.next_of(ConnectionLost)
    restartable(port=port)
    gave_up = watched.next_of(GaveUp, skipping=(Retrying,))
    assert gave_up.login_refused is True
    assert 'the name "alice" belongs to another identity key' in gave_up.reason
    assert watched.done.wait(WAIT)  # and the session is over
    session.close()


def test_stop_ends_a_backoff_wait_and_the_session(restartable, certs_dir, make_identity) -> None:
    srv = restartable()
    dial = dialler(certs_dir, make_identity, srv.address[1])
    session = ChatSession(dial(), dial, delays=lambda: itertools.repeat(3600.0))
    watched = Watched(session)
    srv.stop()
    watched.next_of(ConnectionLost)
    assert watched.next_of(Retrying) == Retrying(1, 3600.0, "server shutting down")
    session.stop()
    assert watched.done.wait(WAIT)
    assert watched.seen.empty()  # no GaveUp, no Closed: the user is leaving
    session.close()


def test_without_a_dialler_a_drop_ends_the_session_with_closed(server, connect) -> None:
    session = ChatSession(connect("alice"))
    watched = Watched(session)
    server.stop()
    assert watched.next_of(Closed) == Closed("server shutting down")
    assert watched.done.wait(WAIT)
    assert session.connected  # nothing to hold for: lines typed now fail as they are sent
    session.close()


def test_the_controller_refuses_a_second_thread(connect) -> None:
    alice = connect("alice")
    shown: list[object] = []
    controller = Controller(ChatSession(alice), shown.append)
    assert controller.handle_line("/query bob") is True  # this thread owns it now
    caught: list[BaseException] = []

    def elsewhere() -> None:
        try:
            controller.handle_line("hello")
        except WrongThread as exc:
            caught.append(exc)

    other = threading.Thread(target=elsewhere, name="intruder")
    other.start()
    other.join(WAIT)
    me = threading.current_thread().name
    assert [str(e) for e in caught] == [
        f"Controller.handle_line called on thread 'intruder'; the controller belongs to thread "
        f"{me!r}"
    ]
    assert len(shown) == 1  # the intruder's line did nothing
