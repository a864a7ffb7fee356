"""Bounded under hostile load: the global budget for queued output, the per-address connection
throttle, the cap on new names, and the trusted addresses that skip the last two. Real server,
real TLS; the per-address limits run on an injected clock, so nothing here sleeps."""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import subprocess
import sys
import termios
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace
from typing import TypeVar

import pytest

from securechat import identity
from securechat.client import Client
from securechat.client.events import DirectMessage, Message, Parted
from securechat.errors import AuthError, ConfigError
from securechat.ratelimit import AddressBuckets
from securechat.server import Server, ServerConfig
from securechat.server.addresses import AddressLimit, parse_trusted
from securechat.server.budget import SHED_TO, OutputBudget
from securechat.server.connection import SEND_BUFFER, UNSENT_LIMIT
from securechat.tls import WRITE_CHUNK, TLSStream, client_context, server_context

from .conftest import REPO, wait_for
from .raw import RawTLS

T = TypeVar("T")


class Clock:
    """Monotonic seconds that move only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def run_server(certs_dir: Path, tmp_path: Path, clock: Clock) -> Iterator[Callable[..., Server]]:
    """Start a server with these fields (and the test's clock); stopped at the end."""
    started: list[Server] = []

    def run(**fields: object) -> Server:
        config = ServerConfig(
            host="127.0.0.1", port=0, certs_dir=certs_dir, data_dir=tmp_path / "data"
        )
        for name, value in fields.items():
            setattr(config, name, value)
        started.append(Server(config, clock=clock).start())
        return started[-1]

    try:
        yield run
    finally:
        for srv in started:
            srv.stop()


def handshake(srv: Server, certs_dir: Path, source: str = "127.0.0.1") -> RawTLS:
    """A TLS connection that got through the handshake (RawTLS shakes hands as it connects)."""
    return RawTLS(srv.address, certs_dir / "ca.pem", source=source, timeout=5)


def refused_before_tls(srv: Server, certs_dir: Path, source: str = "127.0.0.1") -> bool:
    """True when the server closes the connection without answering the TLS hello."""
    ctx = client_context(certs_dir / "ca.pem")
    tls = TLSStream(ctx, server_side=False, server_hostname="127.0.0.1")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as raw:
        raw.bind((source, 0))
        raw.settimeout(5)
        try:
            raw.connect(srv.address)
            tls.do_handshake()
            raw.sendall(tls.data_to_send())  # the ClientHello
            answer = raw.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return True
    return not answer


# -- the building blocks, on a clock the test moves ------------------------------------------------


def test_address_buckets_refuse_over_the_burst_then_recover() -> None:
    buckets = AddressBuckets(rate=2.0, burst=3)
    assert [buckets.take("10.0.0.1", 0.0) for _ in range(4)] == [True, True, True, False]
    assert buckets.take("10.0.0.2", 0.0)  # another address has a bucket of its own
    assert buckets.retry_after("10.0.0.1", 0.0) == 0.5
    assert not buckets.take("10.0.0.1", 0.4)
    assert buckets.take("10.0.0.1", 0.5)  # half a second at 2/s: one token
    assert buckets.refused == 2


def test_address_buckets_forget_addresses_that_went_quiet() -> None:
    buckets = AddressBuckets(rate=1.0, burst=1)
    for i in range(AddressBuckets.PRUNE_EVERY - 1):
        buckets.take(f"10.0.{i // 256}.{i % 256}", 0.0)
    assert len(buckets) == AddressBuckets.PRUNE_EVERY - 1
    buckets.take("10.9.9.9", 5.0)  # the sweep: every other bucket has refilled by now
    assert len(buckets) == 1


def test_trusted_addresses_skip_the_limit() -> None:
    limit = AddressLimit(1.0, 1, parse_trusted("10.1.0.0/16, ::1"))
    assert all(limit.allow("10.1.2.3", 0.0) for _ in range(10))
    assert all(limit.allow("::1", 0.0) for _ in range(10))
    assert [limit.allow("10.2.0.1", 0.0) for _ in range(2)] == [True, False]


def test_a_bad_trusted_entry_is_refused_by_name() -> None:
    with pytest.raises(ConfigError) as info:
        ServerConfig(trusted="10.0.0.0/8, localhost")
    assert str(info.value) == (
        "--trusted: 'localhost' is not an IP address or network (like 10.0.0.0/8 or ::1)"
    )


def test_a_big_tls_write_goes_in_chunks_and_arrives_whole(certs_dir: Path) -> None:
    """A connection's outgoing memory BIO keeps the capacity of the most it ever held, so a big
    write is encrypted a chunk at a time (what the output budget counts is then what is held)."""
    server = TLSStream(server_context(certs_dir)[0], server_side=True)
    client = TLSStream(
        client_context(certs_dir / "ca.pem"), server_side=False, server_hostname="localhost"
    )

    def pump(src: TLSStream, dst: TLSStream) -> None:
        out = src.data_to_send()
        if out:
            dst.feed(out)

    while not client.do_handshake():
        pump(client, server)
        server.do_handshake()
        pump(server, client)
    pump(client, server)
    assert server.do_handshake()
    pump(server, client)
    assert client.read() == b""  # only the session tickets so far
    data = bytes(range(256)) * (5 * WRITE_CHUNK // 256 + 3)
    server.write(data)
    records = server.data_to_send()
    assert server._out.pending == 0 and not server._drained
    got = b""
    for start in range(0, len(records), 10_000):  # as a socket would hand it over
        client.feed(records[start : start + 10_000])
        got += client.read()
    assert got == data


# -- the connection throttle ----------------------------------------------------------------------


def test_the_throttle_refuses_before_tls_and_then_recovers(
    run_server: Callable[..., Server], certs_dir: Path, clock: Clock
) -> None:
    srv = run_server(connect_rate=1.0, connect_burst=2, trusted="")
    kept = [handshake(srv, certs_dir) for _ in range(2)]  # the burst
    try:
        assert refused_before_tls(srv, certs_dir)
        assert srv.throttle.refused == 1
        clock.now += 1.0  # one second at 1/s: one more
        kept.append(handshake(srv, certs_dir))
        assert refused_before_tls(srv, certs_dir)
        # Another address has its own allowance; and the server still serves the kept ones.
        kept.append(handshake(srv, certs_dir, source="127.0.0.2"))
        kept[0].send_frame({"type": "ping", "id": 1})
        assert kept[0].frame() == {"type": "pong", "id": 1}
    finally:
        for conn in kept:
            conn.close()


def test_trusted_addresses_are_not_throttled(
    run_server: Callable[..., Server], certs_dir: Path
) -> None:
    srv = run_server(connect_rate=1.0, connect_burst=1, trusted="127.0.0.1")
    kept = [handshake(srv, certs_dir) for _ in range(5)]
    try:
        handshake(srv, certs_dir, source="127.0.0.2").close()
        assert refused_before_tls(srv, certs_dir, source="127.0.0.2")
        assert srv.throttle.refused == 1
    finally:
        for conn in kept:
            conn.close()


# -- the cap on new names -------------------------------------------------------------------------


def test_the_name_cap_refuses_a_fresh_name_and_lets_existing_ones_in(
    run_server: Callable[..., Server],
    certs_dir: Path,
    make_identity: Callable[[str], identity.Identity],
    clock: Clock,
) -> None:
    srv = run_server(new_names=2, trusted="")
    host, port = srv.address
    ca = certs_dir / "ca.pem"

    def log_in(user: str) -> Client:
        return Client.connect(host, port, make_identity(user), user, ca)

    log_in("alice").close()
    log_in("bob").close()
    with pytest.raises(AuthError) as info:
        log_in("carol")
    assert info.value.code == "too_many_names"
    assert str(info.value).endswith(
        "refused the login: too many new names from your address (at most 2 an hour); log in "
        "with a name you already have, or try again in 30 minutes"
    )
    again = log_in("alice")  # a name already bound logs in as always
    try:
        assert again.send("#lobby", "still here").result(5)["type"] == "ok"
    finally:
        again.close()
    clock.now += 1800  # two an hour: one more after half an hour
    log_in("carol").close()


# -- the output budget ----------------------------------------------------------------------------


def sloth(
    srv: Server,
    certs_dir: Path,
    user: str,
    ident: identity.Identity,
    rooms: list[str],
    device: str | None = None,
):
    """A client that logs in (as `device`, if given), joins `rooms`, and from then on reads
    nothing."""
    conn = RawTLS(srv.address, certs_dir / "ca.pem", rcvbuf=4096)
    conn.login(user, ident, device)
    for i, room in enumerate(rooms, 1):
        # Plain rooms (the load is room text the server relays): the first sloth in makes them.
        conn.send_frame({"type": "join", "id": i, "room": room, "create": True, "plain": True})
        if conn.reply_to(i)["type"] == "error":  # room_exists: made already
            conn.send_frame({"type": "join", "id": 100 + i, "room": room})
            assert conn.reply_to(100 + i)["mode"] == "plain"
    return conn


def shed_or_echo(event: object, text: str) -> bool:
    # The lobby also hears big's first, ordinary login leave: only the test's rooms count.
    shed = isinstance(event, Parted) and event.room != "#lobby"
    return shed or (isinstance(event, Message) and event.text == text)


def test_over_the_budget_the_biggest_queue_goes_first(
    run_server: Callable[..., Server],
    certs_dir: Path,
    make_identity: Callable[[str], identity.Identity],
    caplog: pytest.LogCaptureFixture,
) -> None:
    budget = 1024 * 1024
    srv = run_server(output_budget=budget, io_threads=1, rate=1e6, burst=100_000)
    host, port = srv.address
    alice = Client.connect(host, port, make_identity("alice"), "alice", certs_dir / "ca.pem")
    # big publishes its device with a real client first, so that a DM can be sealed to it.
    with Client.connect(host, port, make_identity("big"), "big", certs_dir / "ca.pem") as first:
        device = first.device_id
    big = sloth(srv, certs_dir, "big", make_identity("big"), ["#a", "#b"], device)
    small = sloth(srv, certs_dir, "small", make_identity("small"), ["#b"])
    caplog.set_level(logging.INFO, logger="securechat.server")
    text = "z" * 7000
    try:
        for room in ("#a", "#b"):
            alice.join(room).result(5)
        # A DM goes out to big too; big never reads it, so it never acknowledges it.
        assert alice.send_dm("big", "kept for you").result(5)["status"] == "delivered"
        # Only big is in #a: its queue grows alone, to well over half the budget.
        for i in range(2000):
            alice.send("#a", f"a{i} {text}").result(5)
            if srv.budget.queued > budget * 0.6:
                break
        assert srv.budget.queued > budget * 0.6
        assert srv.budget.shed == 0
        # Both queue what goes to #b, until the total passes the budget: big goes, small stays.
        parted = None
        for i in range(400):
            last = f"b{i} {text}"
            alice.send("#b", last).result(5)
            parted = wait_for(alice, lambda e, last=last: shed_or_echo(e, last))
            if isinstance(parted, Parted):
                break
        assert isinstance(parted, Parted), "nobody was shed"
        assert (parted.user, parted.reason) == ("big", "outbound queue full: client not reading")
        assert srv.budget.shed == 1
        assert srv.budget.queued <= budget
        drops = [r.getMessage() for r in caplog.records if r.getMessage().startswith("dropping")]
        assert len(drops) == 1 and drops[0].startswith("dropping big (127.0.0.1:")
        assert drops[0].endswith("): not reading, the server's output budget full")
        # small was never cut off: reading now, it gets everything, in order, to the last one.
        seen = [small.frame_of("message", timeout=10)["text"] for _ in range(i + 1)]
        assert seen == [f"b{n} {text}" for n in range(i + 1)]
        assert "bytes queued for clients (budget 1048576), 1 shed over budget" in srv.stats_line()
        # Shedding cost big its room traffic only: the DM waited in the store for its return.
        back = Client.connect(host, port, make_identity("big"), "big", certs_dir / "ca.pem")
        try:
            dm = wait_for(back, lambda e: isinstance(e, DirectMessage))
            assert (dm.sender, dm.text) == ("alice", "kept for you")
        finally:
            back.close()
    finally:
        alice.close()
        big.close()
        small.close()


class Queue:
    """A connection of an I/O loop, as the budget sees it: its queue, and being dropped."""

    def __init__(self, loop: SimpleNamespace, size: int) -> None:
        self.loop, self.queued, self.charged, self.user = loop, size, size, ""
        self.ctx = SimpleNamespace(hub=SimpleNamespace(logout_all=lambda conns, reason: None))
        self.dropped = ""
        loop.connections.add(self)
        loop.queued += size

    def drop_not_reading(self, limit: str) -> None:
        self.dropped = limit
        self.loop.connections.discard(self)
        self.loop.queued -= self.charged


def test_over_the_budget_shedding_goes_on_down_to_seven_eighths_of_it() -> None:
    loop = SimpleNamespace(connections=set(), queued=0, shed=0, biggest=0)
    budget = OutputBudget(800, [loop])  # type: ignore[list-item]
    queues = [Queue(loop, 120), Queue(loop, 110), *(Queue(loop, 100) for _ in range(6))]
    assert loop.queued == 830 and budget.over()
    budget.shed_from(loop)  # type: ignore[arg-type]
    # One would have brought the total under the budget (710); shedding goes on to 700 or less.
    assert [q.dropped for q in queues[:2]] == ["the server's output budget"] * 2
    assert [q.dropped for q in queues[2:]] == [""] * 6
    assert (loop.queued, loop.shed, loop.biggest) == (600, 2, 100)
    assert loop.queued <= 800 * SHED_TO


def on_loop(srv: Server, fn: Callable[[], T]) -> T:
    """Run `fn` on the server's only I/O loop (the owner of its connections) and return its
    answer."""
    done: Future[T] = Future()
    srv.loops[0].call_soon(lambda: done.set_result(fn()))
    return done.result(5)


def test_a_full_socket_stops_encryption_and_what_waits_counts_against_max_queue(
    run_server: Callable[..., Server],
    certs_dir: Path,
    make_identity: Callable[[str], identity.Identity],
) -> None:
    max_queue = 2 * 1024 * 1024
    srv = run_server(max_queue=max_queue, output_budget=0, io_threads=1, rate=1e6, burst=100_000)
    host, port = srv.address
    alice = Client.connect(host, port, make_identity("alice"), "alice", certs_dir / "ca.pem")
    stuck = sloth(srv, certs_dir, "stuck", make_identity("stuck"), ["#a"])
    text = "z" * 7000

    def stuck_queue() -> tuple[int, int] | None:
        for conn in srv.loops[0].connections:
            if conn.user == "stuck":
                return len(conn.outbuf), conn.queued
        return None

    try:
        alice.join("#a").result(5)
        encrypted = queued = 0
        for i in range(2000):
            alice.send("#a", f"a{i} {text}").result(5)
            now = on_loop(srv, stuck_queue)
            if now is None:
                break
            encrypted, queued = now
            # Once the socket is full, no more is encrypted for it: what the socket refused
            # of one chunk at most, the rest waiting as the room's shared frames.
            assert encrypted < 2 * WRITE_CHUNK, (i, encrypted, queued)
        parted = wait_for(alice, lambda e: isinstance(e, Parted))
        assert (parted.user, parted.reason) == ("stuck", "outbound queue full: client not reading")
        # It went at --max-queue, though almost none of that was ever encrypted for it.
        assert encrypted < 2 * WRITE_CHUNK < max_queue - 8000 <= queued <= max_queue
        assert on_loop(srv, lambda: srv.budget.queued) == 0
    finally:
        alice.close()
        stuck.close()


@pytest.mark.skipif(not hasattr(socket, "TCP_NOTSENT_LOWAT"), reason="Linux and macOS only")
def test_a_client_that_does_not_read_is_handed_little_before_its_socket_refuses(
    run_server: Callable[..., Server],
    certs_dir: Path,
    make_identity: Callable[[str], identity.Identity],
) -> None:
    srv = run_server(output_budget=0, io_threads=1, rate=1e6, burst=100_000)
    host, port = srv.address
    alice = Client.connect(host, port, make_identity("alice"), "alice", certs_dir / "ca.pem")
    stuck = sloth(srv, certs_dir, "stuck", make_identity("stuck"), ["#a"])

    def kernel_queue() -> int | None:
        """The bytes stuck's socket holds in the kernel, once the socket refuses more."""
        for conn in srv.loops[0].connections:
            if conn.user == "stuck" and conn.outbuf:
                return int.from_bytes(fcntl.ioctl(conn.sock, termios.TIOCOUTQ, b"\0" * 4), "little")
        return None

    try:
        alice.join("#a").result(5)
        held = None
        for i in range(200):
            alice.send("#a", f"a{i} {'z' * 7000}").result(5)
            held = on_loop(srv, kernel_queue)
            if held is not None:
                break
        assert held is not None, "the socket never refused"
        # What waits unsent is capped (nothing is in flight to a closed window): far below the
        # send buffer, which alone let such a socket take about 380 KB here.
        assert held < UNSENT_LIMIT + 2 * WRITE_CHUNK < SEND_BUFFER, held
    finally:
        alice.close()
        stuck.close()


def test_the_cli_refuses_a_bad_trusted_entry_in_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "securechat", "server", "--port", "0", "--trusted", "::1,bogus"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO), "SECURECHAT_TRUSTED": ""},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 1
    assert proc.stderr == (
        "securechat: error: --trusted: 'bogus' is not an IP address or network "
        "(like 10.0.0.0/8 or ::1)\n"
    )
