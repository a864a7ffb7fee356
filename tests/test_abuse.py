"""The abuse suite: hostile or broken clients against the real server. Each attack costs its
sender the connection at most; afterwards the server is up and two other users still chat."""

from __future__ import annotations

import json
import random
import selectors
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from securechat import framing
from securechat.client import Client
from securechat.client.events import Closed, Joined, Message, Parted
from securechat.errors import AuthError

from .cli_helpers import ServerProcess, run_client
from .conftest import wait_for
from .proxy import HoldingProxy
from .raw import RawTLS


def still_chatting(connect: Callable[..., Client], tag: str) -> None:
    """Two fresh users can still log in and talk."""
    one, two = connect(f"{tag}-one"), connect(f"{tag}-two")
    wait_for(one, lambda e: isinstance(e, Joined) and e.user == f"{tag}-two")
    two.send("#lobby", f"{tag}: all well").result(5)
    assert wait_for(one, lambda e: isinstance(e, Message) and e.text == f"{tag}: all well")


def wait_all_closed(socks: list[socket.socket], deadline: float) -> float:
    """Wait until the server has closed every socket; returns when the last one closed."""
    sel = selectors.DefaultSelector()
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    open_left = len(socks)
    last = time.monotonic()
    while open_left:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"{open_left} of {len(socks)} stalled connections still open"
        for key, _ in sel.select(remaining):
            try:
                data = key.fileobj.recv(4096)
            except ConnectionResetError:
                data = b""
            if not data:
                sel.unregister(key.fileobj)
                open_left -= 1
                last = time.monotonic()
    sel.close()
    return last


def ca(certs_dir: Path) -> Path:
    return certs_dir / "ca.pem"


# -- bytes that are not our protocol --------------------------------------------------------------


def test_random_bytes_over_tls(server, connect, certs_dir) -> None:
    junk = random.Random(20261125).randbytes(16 * 1024)
    with RawTLS(server.address, ca(certs_dir)) as raw:
        raw.sock.sendall(junk)
        frames = raw.until_closed()
    # Its first four bytes announce a frame far over the limit: one error, then the close.
    assert frames == [
        {
            "type": "error",
            "code": "frame_too_large",
            "message": f"frame header announces {int.from_bytes(junk[:4], 'big')} bytes; "
            "the limit is 65536",
        }
    ]
    still_chatting(connect, "after-random")


def test_a_4_gib_frame_header(server, connect, certs_dir) -> None:
    with RawTLS(server.address, ca(certs_dir)) as raw:
        raw.sock.sendall(b"\xff\xff\xff\xff" + b"x" * 1000)
        frames = raw.until_closed()
    assert frames == [
        {
            "type": "error",
            "code": "frame_too_large",
            "message": "frame header announces 4294967295 bytes; the limit is 65536",
        }
    ]
    still_chatting(connect, "after-4gib")


def test_an_http_request_on_the_port(server, connect) -> None:
    with socket.create_connection(server.address, timeout=5) as raw:
        raw.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = b""
        while chunk := raw.recv(4096):
            answer += chunk
    assert not answer.startswith(b"HTTP")  # at most a TLS alert record, then the close
    assert answer == b"" or answer[0] == 0x15
    still_chatting(connect, "after-http")


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"\xff\xfe{}", ("bad_utf8", "frame is not valid UTF-8")),
        (b'{"type": "hello", ', ("bad_json", "frame is not valid JSON")),
        (b"[1, 2, 3]", ("bad_frame", "frame must be a JSON object")),
        (b'{"type": 7}', ("bad_frame", 'frame has no string "type"')),
        (b'{"type": "teleport"}', ("unknown_type", 'unknown frame type "teleport"')),
        (b'{"type": "say", "id": 1, "room": "#lobby", "text": "hi"}',
         ("not_allowed", '"say" is not allowed while connected')),
        (b'{"type": "hello", "user": 42, "key": "AAAA", "version": 1}',
         ("bad_field", 'field "user" must be a string')),
        (b'{"type": "ping", "id": "one"}',
         ("bad_field", 'field "id" must be an integer from 0 to 2^53')),
        (b'{"type": "\\ud800"}',
         ("bad_utf8", "frame holds a lone surrogate, which is not valid Unicode")),
    ],
)  # fmt: skip
def test_malformed_frames_before_login(server, connect, certs_dir, payload, error) -> None:
    code, message = error
    with RawTLS(server.address, ca(certs_dir)) as raw:
        for _ in range(5):  # the fifth strike closes the connection
            raw.send_payload(payload)
        frames = raw.until_closed()
    assert [(f.get("code"), f.get("message")) for f in frames] == [(code, message)] * 5
    still_chatting(connect, "after-malformed")


def test_malformed_frames_after_login_cost_only_strikes(
    server, connect, certs_dir, make_identity
) -> None:
    bob = connect("bob")
    with RawTLS(server.address, ca(certs_dir)) as raw:
        raw.login("mallory", make_identity("mallory"))
        raw.send_frame({"type": "say", "id": 1, "room": "#lobby", "text": 5})
        assert raw.frame_of("error") == {
            "type": "error",
            "code": "bad_field",
            "message": 'field "text" must be a string',
            "id": 1,
        }
        raw.send_payload(b'{"type": "say", "id": 2, "room": "#lobby", "text": "\\udc00 hi"}')
        assert raw.frame_of("error")["code"] == "bad_utf8"
        raw.send_frame(
            {
                "type": "dm",
                "id": 3,
                **{"to": "bob", "user": "bob", "device": "A" * 16},
                **{"msg_id": "x", "data": "AA=="},
            }
        )
        assert raw.frame_of("error")["message"] == (
            'field "msg_id" must be 8 to 64 characters of A-Z a-z 0-9 _ -'
        )
        raw.send_frame({"type": "history", "id": 4, "room": "#lobby", "limit": 10**9})
        assert raw.frame_of("error")["message"] == 'field "limit" must be an integer from 1 to 1000'
        raw.send_frame({"type": "say", "id": 5, "room": "#lobby", "text": "still me"})
        assert raw.frame_of("ok")["id"] == 5  # four strikes: still connected
        raw.send_frame({"type": "teleport"})
        frames = raw.until_closed()
    assert frames[-1] == {
        "type": "error",
        "code": "unknown_type",
        "message": 'unknown frame type "teleport"',
    }
    assert wait_for(bob, lambda e: isinstance(e, Message)).text == "still me"
    assert wait_for(bob, lambda e: isinstance(e, Parted)).user == "mallory"
    still_chatting(connect, "after-strikes")


@pytest.mark.server_config(history=50)
def test_a_history_that_does_not_fit_one_frame_is_cut_not_fatal(server, connect) -> None:
    alice = connect("alice")
    for i in range(20):
        alice.send("#lobby", f"{i:02d}" + "x" * 7990).result(5)
    reply = alice.room_history("#lobby", 20).result(5)
    kept = [m["text"][:2] for m in reply["messages"]]
    assert reply["truncated"] is True
    assert 0 < len(kept) < 20 and kept == [f"{i:02d}" for i in range(20 - len(kept), 20)]
    still_chatting(connect, "after-history")


# -- connections that never get going ------------------------------------------------------------


@pytest.mark.server_config(handshake_timeout=20, login_timeout=1)
def test_the_login_timeout_counts_from_the_end_of_the_handshake(server, certs_dir) -> None:
    with RawTLS(server.address, certs_dir / "ca.pem", timeout=30) as raw:
        raw.sock.do_handshake()
        shaken = time.monotonic()
        frames = raw.until_closed(timeout=15)
        waited = time.monotonic() - shaken
    assert frames == [{"type": "bye", "reason": "login timed out"}]
    # Counted from accept, it would add the 20 s handshake allowance.
    assert 0.9 <= waited < 10


@pytest.mark.server_config(handshake_timeout=1.5)
def test_hundreds_of_stalled_connections(server, connect) -> None:
    started = time.monotonic()
    stalled = [socket.create_connection(server.address, timeout=5) for _ in range(300)]
    try:
        alice, bob = connect("alice"), connect("bob")  # log in while all 300 are open
        wait_for(alice, lambda e: isinstance(e, Joined) and e.user == "bob")
        bob.send("#lobby", "through the crowd").result(5)
        assert wait_for(alice, lambda e: isinstance(e, Message)).text == "through the crowd"
        last = wait_all_closed(stalled, time.monotonic() + 15)
        assert last - started >= 1.4  # closed by the handshake timeout, not before
    finally:
        for s in stalled:
            s.close()
    still_chatting(connect, "after-stalled")


@pytest.mark.server_config(max_connections=4)
def test_the_connection_cap_refuses_with_a_reason(server, connect) -> None:
    connect("alice"), connect("bob")
    stalled = [socket.create_connection(server.address, timeout=5) for _ in range(2)]
    with pytest.raises(AuthError) as info:
        connect("carol")
    assert info.value.code == "server_full"
    assert str(info.value).endswith(
        "refused the login: the server is full (4 connections); try again later"
    )
    for s in stalled:
        s.close()
    deadline = time.monotonic() + 10
    while True:  # the server notices the two closes on its own time: retry until it has
        try:
            carol = connect("carol")
            break
        except AuthError as exc:
            assert exc.code == "server_full" and time.monotonic() < deadline
    carol.ping().result(5)


@pytest.mark.server_config(max_per_address=2)
def test_the_per_address_cap(server, connect, certs_dir) -> None:
    stalled = [socket.create_connection(server.address, timeout=5) for _ in range(2)]
    try:
        with pytest.raises(AuthError) as info:
            connect("alice")
        assert info.value.code == "too_many_connections"
        assert str(info.value).endswith(
            "refused the login: too many connections from your address (at most 2)"
        )
        with RawTLS(server.address, ca(certs_dir), source="127.0.0.2") as other:
            other.send_frame({"type": "ping", "id": 1})
            assert other.frame() == {"type": "pong", "id": 1}  # another address is let in
    finally:
        for s in stalled:
            s.close()


# -- users who take more than their share ---------------------------------------------------------


@pytest.mark.server_config(max_queue=256 * 1024, rate=1e6, burst=100_000)
def test_a_client_that_never_reads_is_dropped_and_nobody_waits(
    server, connect, certs_dir, make_identity
) -> None:
    alice, bob = connect("alice"), connect("bob")
    sloth = RawTLS(server.address, ca(certs_dir), rcvbuf=4096)
    sloth.login("sloth", make_identity("sloth"))  # ...and from now on reads nothing
    wait_for(bob, lambda e: isinstance(e, Joined) and e.user == "sloth")
    slowest = 0.0
    dropped = None
    try:
        for i in range(2000):
            sent = time.monotonic()
            alice.send("#lobby", f"{i} " + "y" * 4000).result(5)
            event = wait_for(bob, lambda e: isinstance(e, Message | Parted))
            if isinstance(event, Parted):
                dropped = event
                event = wait_for(bob, lambda e: isinstance(e, Message))
            assert event.text.startswith(f"{i} ")  # in order, none lost
            slowest = max(slowest, time.monotonic() - sent)
            if dropped is not None:
                break
    finally:
        sloth.close()
    assert dropped is not None, "the client that never reads was never dropped"
    assert (dropped.user, dropped.reason) == ("sloth", "outbound queue full: client not reading")
    # Loopback round trips take milliseconds; a second would mean alice and bob waited on sloth.
    assert slowest < 1.0, slowest
    still_chatting(connect, "after-sloth")


@pytest.mark.server_config(rate=1.0, burst=10, flood_refusals=5)
def test_a_flood_is_refused_then_dropped(server, connect) -> None:
    bob = connect("bob")
    mallory = connect("mallory")
    mallory._conn._pacer = None  # a hostile client ignores the rate the server announced
    futures = [mallory.send("#lobby", f"flood {i}") for i in range(40)]
    outcomes = []
    for f in futures:
        exc = f.exception(10)
        outcomes.append("ok" if exc is None else getattr(exc, "code", type(exc).__name__))
    assert outcomes[:10] == ["ok"] * 10  # the burst
    # Four refusals; the fifth in a row is a flood, and the connection ends.
    assert outcomes[10:] == ["rate_limited"] * 4 + ["ConnectionClosed"] * 26
    assert str(futures[10].exception()) == (
        "slow down: the limit is 1 requests a second, in bursts of at most 10; "
        "this one was not sent"
    )
    closed = wait_for(mallory, lambda e: isinstance(e, Closed))
    assert closed.reason == "message flood: too many messages after being told to slow down"
    parted = wait_for(bob, lambda e: isinstance(e, Parted) and e.user == "mallory")
    assert parted.reason == "message flood: too many messages after being told to slow down"
    still_chatting(connect, "after-flood")


@pytest.mark.server_config(rate=1.0, burst=2, flood_refusals=2)
def test_a_flooder_still_sending_hears_why_it_was_dropped(
    server, connect, certs_dir, make_identity
) -> None:
    # A client that sends far more than the server reads before dropping it, and reads nothing
    # until it is done: closed at once, the server's socket would reset the connection, and the
    # reset would throw away the replies and the goodbye the client had not read yet.
    closed = threading.Event()  # a lingering socket of the server's closed
    for loop in server.loops:
        end_linger = loop.end_linger
        loop.end_linger = lambda g, end=end_linger: (end(g), closed.set())  # type: ignore[method-assign]
    with RawTLS(server.address, ca(certs_dir), rcvbuf=2048) as raw:
        raw.login("mallory", make_identity("mallory"))
        text = "x" * 3000
        for request_id in range(1, 201):
            raw.send_frame({"type": "say", "id": request_id, "room": "#lobby", "text": text})
        heard = []
        while not heard or heard[-1][0] != "bye":
            frame = raw.frame()
            if frame["type"] in ("ok", "error", "bye"):
                heard.append((frame["type"], frame.get("id"), frame.get("code")))
        assert heard == [
            ("ok", 1, None),
            ("ok", 2, None),
            ("error", 3, "rate_limited"),
            ("bye", None, None),
        ]
        assert frame["reason"] == "message flood: too many messages after being told to slow down"
        # The client keeps its socket open: the server's closes after a moment all the same.
        assert closed.wait(10), "the dropped client's socket was never closed"
        assert [loop.lingering for loop in server.loops] == [0] * len(server.loops)
    still_chatting(connect, "after-flood")


@pytest.mark.server_config(rate=20.0, burst=2, flood_refusals=4)
def test_after_a_refusal_the_server_holds_every_request_until_resume(
    server, certs_dir, make_identity
) -> None:
    with RawTLS(server.address, ca(certs_dir)) as raw:

        def reply() -> dict:
            while "id" not in (frame := raw.frame()):
                pass  # our own messages and joins, as events
            return frame

        def say(request_id: int, **extra: object) -> dict:
            raw.send_frame(
                {"type": "say", "id": request_id, "room": "#lobby", "text": "m", **extra}
            )
            return reply()

        assert raw.login("mallory", make_identity("mallory"))["flood_refusals"] == 4
        assert [say(1)["type"], say(2)["type"]] == ["ok", "ok"]  # the burst
        refused = say(3)
        assert (refused["code"], refused["message"]) == (
            "rate_limited",
            "slow down: the limit is 20 requests a second, in bursts of at most 2; "
            "this one was not sent",
        )
        assert 0 < refused["retry_after"] <= 0.05
        until = time.monotonic() + refused["retry_after"]
        while time.monotonic() <= until:  # the wait the server asked for; pings spend nothing
            raw.send_frame({"type": "ping", "id": 0})
            assert reply()["type"] == "pong"
        held = say(4)  # a token is there now, but we have not said we saw the refusal
        assert (held["code"], held["retry_after"]) == ("rate_limited", 0.0)
        assert say(5, resume=1)["message"] == 'field "resume" must be true or false'
        assert say(6, resume=True)["type"] == "ok"
        assert say(7)["code"] == "rate_limited"  # a refusal of its own: no token left
        assert [say(8)["code"], say(9)["code"]] == ["rate_limited"] * 2  # held, and counted
        raw.send_frame({"type": "say", "id": 10, "room": "#lobby", "text": "m"})  # the fourth
        assert raw.until_closed()[-1] == {
            "type": "bye",
            "reason": "message flood: too many messages after being told to slow down",
        }


@pytest.mark.server_config(rate=20.0, burst=5)
def test_a_client_paces_itself_to_the_announced_rate_and_loses_nothing(server, connect) -> None:
    alice, bob = connect("alice"), connect("bob")
    assert (alice.welcome["rate"], alice.welcome["burst"]) == (20.0, 5)
    wait_for(alice, lambda e: isinstance(e, Joined) and e.user == "bob")
    futures = [alice.send("#lobby", f"paced {i}") for i in range(30)]
    assert all(f.result(10)["type"] == "ok" for f in futures)  # slowed down, never refused
    got = [wait_for(bob, lambda e: isinstance(e, Message)).text for _ in range(30)]
    assert got == [f"paced {i}" for i in range(30)]


@pytest.mark.server_config(rate=20.0, burst=5)
def test_requests_refused_after_a_held_back_burst_are_sent_again_in_order_and_once(
    server, connect, certs_dir, make_identity
) -> None:
    bob = connect("bob")
    proxy = HoldingProxy(server.address)
    alice = Client.connect(*proxy.address, make_identity("alice"), "alice", ca(certs_dir))
    try:
        wait_for(bob, lambda e: isinstance(e, Joined) and e.user == "alice")
        proxy.hold()
        futures = [alice.send("#lobby", f"line {i:02d}") for i in range(30)]
        # One TLS record per request at most: this many bytes hold at least 12 requests, which
        # reach the server at once and find only the 5 of its burst.
        record = len(framing.encode({"type": "say", "id": 10, "room": "#lobby", "text": "line 00"}))
        proxy.wait_held(12 * (record + 22))
        proxy.release()
        assert [f.result(30)["type"] for f in futures] == ["ok"] * 30  # slowed, none refused
        got = [wait_for(bob, lambda e: isinstance(e, Message)).text for _ in range(30)]
        assert got == [f"line {i:02d}" for i in range(30)]  # every one, in order
        alice.send("#lobby", "the end").result(10)
        assert wait_for(bob, lambda e: isinstance(e, Message)).text == "the end"  # none twice
        assert alice._conn._pacer.retries >= 7  # the server did refuse them, all but its burst
    finally:
        alice.close()
        proxy.close()


@pytest.mark.server_config(max_message=20)
def test_message_length_limit(server, connect) -> None:
    alice = connect("alice")
    with pytest.raises(Exception) as info:
        alice.send("#lobby", "x" * 21).result(5)
    assert (info.value.code, str(info.value)) == (
        "too_long",
        "a message may be at most 20 characters here",
    )
    alice.send("#lobby", "x" * 20).result(5)


# -- silence --------------------------------------------------------------------------------------


# The answering client gets half the idle timeout to pong; it shares this process's interpreter
# lock with the server and its own device set-up, so at 1 s a busy CI machine could starve it.
@pytest.mark.server_config(idle_timeout=2.0)
def test_a_silent_client_is_pinged_then_closed(server, connect, certs_dir, make_identity) -> None:
    alive = connect("alive")  # our client answers the server's pings
    with RawTLS(server.address, ca(certs_dir)) as raw:
        raw.login("mute", make_identity("mute"))
        started = time.monotonic()
        assert raw.frame_of("ping", timeout=5) == {"type": "ping"}
        frames = raw.until_closed(timeout=5)
    assert frames[-1] == {"type": "bye", "reason": "idle for 2 seconds"}
    assert time.monotonic() - started >= 1.9
    # One and a half idle timeouts later, the client that answers is still there.
    assert wait_for(alive, lambda e: isinstance(e, Parted) and e.user == "mute")
    assert alive.next_event(timeout=3.0) is None
    assert alive.ping().result(5)["type"] == "pong"


def test_the_client_gives_up_on_a_server_that_stops_answering(
    certs_dir, tmp_path, make_identity
) -> None:
    srv = ServerProcess("--certs", str(certs_dir), "--data", str(tmp_path / "d"), cwd=tmp_path)
    try:
        host, port = srv.address
        client = Client.connect(
            host, port, make_identity("alice"), "alice", ca(certs_dir), keepalive=0.5
        )
        client._conn._keepalive_answer = 0.5
        srv.proc.send_signal(signal.SIGSTOP)  # alive but silent, like a dead link
        closed = wait_for(client, lambda e: isinstance(e, Closed), timeout=10)
        assert closed.reason.startswith("the server stopped answering (nothing heard for ")
        client.close()
    finally:
        srv.proc.send_signal(signal.SIGCONT)
        srv.stop()


# -- the issue's own check, through the CLI and raw sockets alone ---------------------------------


def test_300_stalled_connections_do_not_stop_a_real_client(certs_dir, tmp_path) -> None:
    srv = ServerProcess("--certs", str(certs_dir), "--data", str(tmp_path / "d"), cwd=tmp_path)
    try:
        host, port = srv.address
        started = time.monotonic()
        stalled = [socket.create_connection((host, port), timeout=5) for _ in range(300)]
        keys = tmp_path / "keys"
        assert run_client(keys / "bob.key", port, ca(certs_dir), "", user="bob").returncode == 0
        said = run_client(
            keys / "alice.key", port, ca(certs_dir), "/msg bob past the crowd\nhello all\n",
            user="alice",
        )  # fmt: skip
        assert said.returncode == 0, said.stderr
        got = run_client(keys / "bob.key", port, ca(certs_dir), "")
        assert "*alice* [first seen] past the crowd" in got.stdout
        assert time.monotonic() - started < 40  # all of that while the 300 were open
        last = wait_all_closed(stalled, started + 40)
        assert last - started < 40
        for s in stalled:
            s.close()
        for probe in (random.Random(1).randbytes(4096), b"GET / HTTP/1.0\r\n\r\n"):
            with socket.create_connection((host, port), timeout=5) as raw:
                raw.sendall(probe)
        with RawTLS((host, port), ca(certs_dir)) as raw:
            raw.sock.sendall(b"\xff\xff\xff\xff")
            assert raw.until_closed()[0]["code"] == "frame_too_large"
        again = run_client(keys / "alice.key", port, ca(certs_dir), "still up\n")
        assert again.returncode == 0, again.stderr
        assert srv.proc.poll() is None
    finally:
        assert srv.stop() == 0
    assert not json.dumps(srv.log).count("Traceback")


def test_a_bug_in_one_request_costs_only_that_connection(server, connect, monkeypatch) -> None:
    from securechat.protocol import Rooms
    from securechat.server.hub import Hub

    def broken(self, conn, frame):
        raise RuntimeError("a bug we have not found yet")

    monkeypatch.setitem(Hub.HANDLERS, Rooms, broken)  # stands in for any unexpected error
    victim = connect("victim")
    with pytest.raises(Exception) as info:
        victim.list_rooms().result(5)
    assert type(info.value).__name__ == "ConnectionClosed"
    assert wait_for(victim, lambda e: isinstance(e, Closed))
    still_chatting(connect, "after-bug")


@pytest.mark.server_config(max_frame=8192)
def test_the_client_keeps_to_the_frame_size_the_server_announced(server, connect) -> None:
    alice = connect("alice")
    with pytest.raises(Exception) as info:
        alice.send("#lobby", "é" * 5000)
    assert str(info.value).startswith("frame of 100")
    assert str(info.value).endswith(" bytes exceeds the 8192-byte limit")
    assert alice.ping().result(5)["type"] == "pong"  # refused here, so still connected
