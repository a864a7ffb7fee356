"""The real server over real TLS on 127.0.0.1: certificates, TLS policy, login, rooms, shutdown."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from securechat import framing
from securechat.client import Client, RequestError
from securechat.client.events import Closed, Joined, Message, Parted
from securechat.errors import AuthError, ConnectError
from securechat.server import Server
from securechat.tls import client_context

from .conftest import join_plain, start_server, wait_for


def is_msg(text: str):
    return lambda e: isinstance(e, Message) and e.text == text


def recv_until_closed(sock: socket.socket, timeout: float) -> bytes:
    """Read until the peer closes; fail if it does not within timeout."""
    deadline = time.monotonic() + timeout
    got = b""
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, "server did not close the connection in time"
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(4096)
        except ConnectionResetError:
            return got
        if not chunk:
            return got
        got += chunk


# -- certificates and TLS policy ----------------------------------------------------------------


def test_client_verifies_the_server_and_logs_in(connect, server) -> None:
    alice = connect("alice")
    assert alice.user == "alice"
    assert alice.server_cert_sha256 == server.cert_sha256
    joined = wait_for(alice, lambda e: isinstance(e, Joined))
    assert (joined.room, joined.user) == ("#lobby", "alice")


def test_client_with_the_wrong_ca_is_refused_with_a_clear_error(
    server, other_certs_dir, make_identity
) -> None:
    host, port = server.address
    with pytest.raises(ConnectError) as info:
        Client.connect(host, port, make_identity("alice"), "alice", other_certs_dir / "ca.pem")
    assert f"the server at {host}:{port} failed certificate verification" in str(info.value)
    assert "check that --ca is the ca.pem of that server" in str(info.value)


def test_server_refuses_tls12(server, certs_dir) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(certs_dir / "ca.pem")
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection(server.address, timeout=5) as raw:
        with pytest.raises(ssl.SSLError) as info:
            ctx.wrap_socket(raw, server_hostname="localhost")
    assert "PROTOCOL_VERSION" in info.value.reason.upper()


def test_server_speaks_tls13_only_with_an_ecdsa_certificate(server, certs_dir) -> None:
    ctx = client_context(certs_dir / "ca.pem")
    with socket.create_connection(server.address, timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.version() == "TLSv1.3"
            cert = tls.getpeercert()
    assert ("DNS", "localhost") in cert["subjectAltName"]


def test_hostname_not_on_the_certificate_is_refused(server, certs_dir, make_identity) -> None:
    # The server's certificate names localhost, 127.0.0.1 and ::1 only.
    ctx = client_context(certs_dir / "ca.pem")
    with socket.create_connection(server.address, timeout=5) as raw:
        with pytest.raises(ssl.SSLCertVerificationError) as info:
            ctx.wrap_socket(raw, server_hostname="chat.example.org")
    assert "Hostname mismatch" in info.value.verify_message


class TestMutualTLS:
    @pytest.fixture
    def mtls_server(self, certs_dir, tmp_path):
        srv = start_server(certs_dir, tmp_path / "data", require_client_cert=True)
        try:
            yield srv
        finally:
            srv.stop()

    def test_client_without_certificate_is_refused(
        self, mtls_server, certs_dir, make_identity
    ) -> None:
        host, port = mtls_server.address
        # Under TLS 1.3 the client's handshake completes first; the refusal shows on the first
        # read, which the login does.
        with pytest.raises(ConnectError) as info:
            Client.connect(host, port, make_identity("alice"), "alice", certs_dir / "ca.pem")
        assert str(info.value) == (
            f"the server at {host}:{port} requires a client certificate; pass --cert and --cert-key"
        )

    def test_client_with_certificate_from_another_ca_is_refused(
        self, mtls_server, certs_dir, other_certs_dir, make_identity
    ) -> None:
        host, port = mtls_server.address
        with pytest.raises(ConnectError) as info:
            connect_with_cert(
                mtls_server,
                certs_dir,
                make_identity,
                other_certs_dir / "mallory.pem",
                other_certs_dir / "mallory.key",
            )
        assert f"the server at {host}:{port} refused our client certificate" in str(info.value)

    def test_client_with_our_certificate_logs_in_and_chats(
        self, mtls_server, certs_dir, make_identity
    ) -> None:
        with connect_with_cert(
            mtls_server,
            certs_dir,
            make_identity,
            certs_dir / "alice-laptop.pem",
            certs_dir / "alice-laptop.key",
        ) as alice:
            alice.send("#lobby", "over mutual TLS").result(5)
            assert wait_for(alice, is_msg("over mutual TLS")).sender == "alice"

    @pytest.mark.parametrize(
        ("name", "reason"),
        [
            ("server", "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE: it is not a client certificate"),
            ("ca", "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE: it is not a client certificate"),
        ],
    )
    def test_our_server_or_ca_certificate_is_refused_as_a_client_certificate(
        self, mtls_server, certs_dir, make_identity, name, reason
    ) -> None:
        host, port = mtls_server.address
        with pytest.raises(ConnectError) as info:
            connect_with_cert(
                mtls_server,
                certs_dir,
                make_identity,
                certs_dir / f"{name}.pem",
                certs_dir / f"{name}.key",
            )
        assert str(info.value) == (
            f"the server at {host}:{port} refused our client certificate ({reason})"
        )

    @pytest.mark.parametrize(
        ("usage", "ca", "reason"),
        [
            # OpenSSL lets these two through: no extended key usage means "any" to it.
            (
                None,
                False,
                "it has no extended key usage; a client certificate must allow clientAuth",
            ),
            (None, True, "it is a CA certificate, not a client certificate"),
            (
                [ExtendedKeyUsageOID.CODE_SIGNING],
                False,
                "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE: it is not a client certificate",
            ),
        ],
    )
    def test_a_certificate_from_our_ca_without_client_auth_is_refused(
        self, mtls_server, certs_dir, tmp_path, make_identity, usage, ca, reason
    ) -> None:
        cert, key = leaf_signed_by_test_ca(certs_dir, tmp_path, usage=usage, ca=ca)
        host, port = mtls_server.address
        with pytest.raises(ConnectError) as info:
            connect_with_cert(mtls_server, certs_dir, make_identity, cert, key)
        assert str(info.value) == (
            f"the server at {host}:{port} refused our client certificate ({reason})"
        )
        # The same certificate with clientAuth is let in: the refusal was about the usage.
        cert, key = leaf_signed_by_test_ca(
            certs_dir, tmp_path, usage=[ExtendedKeyUsageOID.CLIENT_AUTH]
        )
        connect_with_cert(mtls_server, certs_dir, make_identity, cert, key).close()

    def test_an_expired_client_certificate_is_refused(
        self, mtls_server, certs_dir, tmp_path, make_identity
    ) -> None:
        cert, key = leaf_signed_by_test_ca(
            certs_dir, tmp_path, usage=[ExtendedKeyUsageOID.CLIENT_AUTH], expired=True
        )
        host, port = mtls_server.address
        with pytest.raises(ConnectError) as info:
            connect_with_cert(mtls_server, certs_dir, make_identity, cert, key)
        assert str(info.value) == (
            f"the server at {host}:{port} refused our client certificate "
            "(SSLV3_ALERT_CERTIFICATE_EXPIRED: it has expired or is not valid yet)"
        )


def connect_with_cert(
    server: Server, certs_dir: Path, make_identity: Callable, cert: Path, cert_key: Path
) -> Client:
    """alice logs in over mutual TLS with the given client certificate."""
    host, port = server.address
    ca = certs_dir / "ca.pem"
    return Client.connect(
        host, port, make_identity("alice"), "alice", ca, cert=cert, cert_key=cert_key
    )


def leaf_signed_by_test_ca(
    certs_dir: Path, tmp_path: Path, *, usage: list | None, ca: bool = False, expired: bool = False
) -> tuple[Path, Path]:
    """A client certificate signed by the test CA as our generator signs one, except for its
    extended key usage (None: no such extension) and, if asked, a CA flag or past validity."""
    ca_cert = x509.load_pem_x509_certificate((certs_dir / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((certs_dir / "ca.key").read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    start, end = (
        (now - dt.timedelta(days=30), now - dt.timedelta(days=1))
        if expired
        else (
            now - dt.timedelta(minutes=5),
            now + dt.timedelta(days=1),
        )
    )
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "eve")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    cert_path, key_path = tmp_path / "eve.pem", tmp_path / "eve.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


# -- hostile bytes --------------------------------------------------------------------------------


def test_plaintext_garbage_on_the_port_is_dropped_and_the_server_goes_on(server, connect) -> None:
    alice, bob = connect("alice"), connect("bob")
    wait_for(alice, lambda e: isinstance(e, Joined) and e.user == "bob")
    for probe in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", bytes(range(256)) * 4, b"\0" * 10):
        with socket.create_connection(server.address, timeout=5) as raw:
            raw.sendall(probe)
            recv_until_closed(raw, timeout=10)
    bob.send("#lobby", "still here").result(5)
    assert wait_for(alice, is_msg("still here")).sender == "bob"


def test_garbage_inside_tls_costs_only_its_sender(server, connect, certs_dir) -> None:
    alice, bob = connect("alice"), connect("bob")
    ctx = client_context(certs_dir / "ca.pem")
    with socket.create_connection(server.address, timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(b"\xff\xff\xff\xff" + b"x" * 100)  # a 4 GiB frame header
            data = recv_until_closed(tls, timeout=10)
    decoder = framing.FrameDecoder()
    decoder.feed(data)
    [error] = [framing.parse(p) for p in decoder.payloads()]
    assert error["code"] == "frame_too_large"
    bob.send("#lobby", "unharmed").result(5)
    assert wait_for(alice, is_msg("unharmed")).sender == "bob"


def test_stalled_handshake_is_closed_after_the_timeout(certs_dir, tmp_path, make_identity) -> None:
    srv = start_server(certs_dir, tmp_path / "data", handshake_timeout=0.5)
    try:
        with socket.create_connection(srv.address, timeout=5) as raw:
            started = time.monotonic()
            assert recv_until_closed(raw, timeout=10) == b""
            assert time.monotonic() - started >= 0.4
        host, port = srv.address
        with Client.connect(
            host, port, make_identity("alice"), "alice", certs_dir / "ca.pem"
        ) as alice:
            assert alice.ping().result(5)["type"] == "pong"
    finally:
        srv.stop()


# -- login and names ----------------------------------------------------------------------------


def test_a_name_belongs_to_the_first_key_and_theft_is_refused(connect, server) -> None:
    alice = connect("alice")
    with pytest.raises(AuthError) as info:
        connect("alice", key_name="mallory")
    assert info.value.code == "name_taken"
    assert str(info.value).endswith(
        'refused the login: the name "alice" belongs to another identity key'
    )
    alice.send("#lobby", "only alice").result(5)
    assert wait_for(alice, is_msg("only alice")).sender == "alice"


def test_name_binding_survives_a_server_restart(certs_dir, tmp_path, make_identity) -> None:
    data = tmp_path / "data"
    for _ in range(2):
        srv = start_server(certs_dir, data)
        try:
            host, port = srv.address
            Client.connect(
                host, port, make_identity("alice"), "alice", certs_dir / "ca.pem"
            ).close()
            with pytest.raises(AuthError):
                Client.connect(host, port, make_identity("mallory"), "alice", certs_dir / "ca.pem")
        finally:
            srv.stop()


def test_logging_in_again_replaces_the_old_connection(connect) -> None:
    first = connect("alice")
    second = connect("alice")
    assert wait_for(first, lambda e: isinstance(e, Closed)) == Closed(
        "logged in again from elsewhere"
    )
    second.send("#lobby", "new session").result(5)
    assert wait_for(second, is_msg("new session")).sender == "alice"


# -- rooms --------------------------------------------------------------------------------------


def test_several_clients_chat_in_two_rooms(connect) -> None:
    alice, bob, carol = connect("alice"), connect("bob"), connect("carol")
    wait_for(alice, lambda e: isinstance(e, Joined) and e.user == "carol")
    joined = join_plain(bob, "#dev")
    # (the id follows the requests that published bob's device and prekeys)
    assert joined == {
        "type": "ok",
        "id": joined["id"],
        "room": "#dev",
        "mode": "plain",
        "members": ["bob"],
        "count": 1,
    }
    assert carol.join("#dev").result(5)["members"] == ["bob", "carol"]
    wait_for(bob, lambda e: e == Joined("#dev", "carol", e.ts))

    alice.send("#lobby", "hello lobby").result(5)
    for c in (alice, bob, carol):
        m = wait_for(c, is_msg("hello lobby"))
        assert (m.room, m.sender) == ("#lobby", "alice")

    bob.send("#dev", "hello dev").result(5)
    assert wait_for(carol, is_msg("hello dev")).room == "#dev"
    alice.send("#lobby", "marker").result(5)
    # alice is not in #dev: the next message she sees is her marker, not bob's dev line.
    assert wait_for(alice, lambda e: isinstance(e, Message)).text == "marker"

    with pytest.raises(RequestError) as info:
        alice.send("#dev", "not a member").result(5)
    assert (info.value.code, info.value.message) == ("not_in_room", "you are not in #dev")

    rooms = alice.list_rooms().result(5)["rooms"]
    assert rooms == [
        {"name": "#dev", "members": 2, "mode": "plain"},
        {"name": "#lobby", "members": 3, "mode": "plain"},
    ]
    assert alice.who("#dev").result(5)["members"] == ["bob", "carol"]

    carol.part("#dev").result(5)
    part = wait_for(bob, lambda e: isinstance(e, Parted))
    assert (part.room, part.user, part.reason) == ("#dev", "carol", "left")
    assert "#dev" not in carol.rooms and "#lobby" in carol.rooms


def test_me_action_and_server_stamps(connect) -> None:
    alice, bob = connect("alice"), connect("bob")
    before = int(time.time() * 1000)
    reply = alice.send("#lobby", "waves", action=True).result(5)
    m = wait_for(bob, is_msg("waves"))
    assert m.action and m.sender == "alice"
    assert m.ts == reply["ts"] and before - 1000 <= m.ts <= int(time.time() * 1000) + 1000


def test_server_ignores_a_sender_name_written_by_the_client(
    server, connect, certs_dir, make_identity
) -> None:
    bob = connect("bob")
    # Speak the protocol by hand to slip a forged "from" and "ts" into the frame.
    from securechat.client.connection import open_connection

    host, port = server.address
    sock, tls, _, _, _ = open_connection(
        host, port, client_context(certs_dir / "ca.pem"), make_identity("mallory"), "mallory"
    )
    try:
        tls.write(
            framing.encode(
                {
                    "type": "say",
                    "id": 1,
                    "room": "#lobby",
                    "text": "I am bob",
                    "from": "bob",
                    "ts": 0,
                }
            )
        )
        sock.sendall(tls.data_to_send())
        m = wait_for(bob, is_msg("I am bob"))
        assert m.sender == "mallory" and m.ts > 0
    finally:
        sock.close()


def test_who_for_a_room_that_does_not_exist(connect) -> None:
    with pytest.raises(RequestError) as info:
        connect("alice").who("#nowhere").result(5)
    assert (info.value.code, info.value.message) == ("no_such_room", "there is no room #nowhere")


# -- shutdown -----------------------------------------------------------------------------------


def test_shutdown_tells_every_client(certs_dir, tmp_path, make_identity) -> None:
    srv = start_server(certs_dir, tmp_path / "data")
    host, port = srv.address
    clients = [
        Client.connect(host, port, make_identity(n), n, certs_dir / "ca.pem")
        for n in ("alice", "bob")
    ]
    srv.stop("server shutting down")
    for c in clients:
        assert wait_for(c, lambda e: isinstance(e, Closed)) == Closed("server shutting down")
    with pytest.raises(ConnectError, match="cannot connect"):
        Client.connect(host, port, make_identity("carol"), "carol", certs_dir / "ca.pem")


# -- hazard 1: one owner per TLS socket ----------------------------------------------------------


@pytest.fixture
def concurrent_tls_use(monkeypatch) -> list[str]:
    """Records every time two threads are inside the same TLSStream at once (server or client:
    both run in this process). Hazard 1 says this list must stay empty."""
    from securechat.tls import TLSStream

    locks: dict[int, threading.Lock] = {}
    guard = threading.Lock()
    violations: list[str] = []

    def watch(name: str) -> None:
        original = getattr(TLSStream, name)

        def wrapper(self, *args, **kwargs):
            with guard:
                lock = locks.setdefault(id(self), threading.Lock())
            if not lock.acquire(blocking=False):
                violations.append(f"{name} from {threading.current_thread().name}")
                return original(self, *args, **kwargs)
            try:
                return original(self, *args, **kwargs)
            finally:
                lock.release()

        monkeypatch.setattr(TLSStream, name, wrapper)

    for name in ("do_handshake", "feed", "read", "write", "data_to_send", "close"):
        watch(name)
    return violations


@pytest.mark.server_config(rate=1e6, burst=100_000)  # this is about threads, not the rate limit
def test_many_threads_sending_into_reading_connections_lose_nothing(
    connect, concurrent_tls_use
) -> None:
    """The one-owner rule (docs/ARCHITECTURE.md): threads hammer send() on clients whose sockets
    are being read at the same moment, while the server's loops deliver into connections they
    are reading. With one owner per TLS connection no stream is ever used by two threads at
    once, there is no SSL error, and nothing is lost or reordered."""
    names = ("alice", "bob", "carol", "dave", "erin", "frank")
    clients = {n: connect(n) for n in names}
    for c in clients.values():
        wait_for(c, lambda e: isinstance(e, Joined) and e.user == names[-1])
    threads_per_client, rounds = 4, 250  # 6,000 messages, 36,000 deliveries
    errors: list[BaseException] = []
    start = threading.Barrier(len(names) * threads_per_client)

    def hammer(name: str, t: int) -> None:
        try:
            start.wait(10)
            futures = [clients[name].send("#lobby", f"{name}:{t}:{i}") for i in range(rounds)]
            for f in futures:
                f.result(60)
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=hammer, args=(n, t))
        for n in names
        for t in range(threads_per_client)
    ]
    for t in threads:
        t.start()
    expected = len(names) * threads_per_client * rounds
    for name, c in clients.items():
        last: dict[str, int] = {}
        got = 0
        while got < expected:
            event = c.next_event(timeout=60)
            assert event is not None, f"{name} got only {got} of {expected} messages"
            assert not isinstance(event, Closed), f"{name} lost its connection: {event}"
            if isinstance(event, Message):
                sender, thread, i = event.text.split(":")
                assert sender == event.sender
                key = f"{sender}:{thread}"
                assert int(i) == last.get(key, -1) + 1, "a message was lost or reordered"
                last[key] = int(i)
                got += 1
    for t in threads:
        t.join(30)
    assert errors == []
    assert concurrent_tls_use == []
