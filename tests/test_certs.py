"""securechat.certs: the local CA, the server and client certificates, and how they are written."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from securechat import certs
from securechat.errors import CertificateError, ConfigError

from .tools import find, needs

REPO = Path(__file__).resolve().parents[1]
OPENSSL = find("openssl")
needs_openssl = needs("openssl")


def generate(out: Path, **kwargs: object) -> certs.Report:
    options: dict = {"hosts": (), "clients": (), "days": 30, "reuse_ca": False, "force": False}
    options.update(kwargs)
    return certs.generate(out, **options)


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def ext(cert: x509.Certificate, cls: type) -> x509.Extension:
    return cert.extensions.get_extension_for_class(cls)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def openssl_verify(folder: Path, *names: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [OPENSSL, "verify", "-CAfile", "ca.pem", *names],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=30,
    )


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "securechat", *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )


# --- the chain verifies ------------------------------------------------------------------------


@needs_openssl
def test_openssl_verifies_server_and_client_certificates(tmp_path: Path) -> None:
    generate(tmp_path, clients=("alice", "bob.laptop"))
    proc = openssl_verify(tmp_path, "server.pem", "alice.pem", "bob.laptop.pem")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["server.pem: OK", "alice.pem: OK", "bob.laptop.pem: OK"]


@needs_openssl
def test_openssl_rejects_a_server_certificate_from_another_ca(tmp_path: Path) -> None:
    generate(tmp_path / "a")
    generate(tmp_path / "b")
    shutil.copy(tmp_path / "b" / "server.pem", tmp_path / "a" / "other.pem")
    proc = openssl_verify(tmp_path / "a", "other.pem")
    assert proc.returncode != 0
    assert "other.pem: OK" not in proc.stdout


def handshake(folder: Path, server_hostname: str) -> tuple[str | None, bytes]:
    """A real TLS 1.3 handshake over loopback with strict client-side verification.

    Returns the negotiated version and the bytes the server sent; raises the client's error.
    """
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    server_ctx.load_cert_chain(folder / "server.pem", folder / "server.key")
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    client_ctx.load_verify_locations(cafile=folder / "ca.pem")
    client_ctx.verify_flags |= ssl.VERIFY_X509_STRICT

    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    server_errors: list[BaseException] = []

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            conn.settimeout(10)
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"hello")
                tls.recv(1)  # wait for the client to close, so it surely read "hello"
        except (OSError, ssl.SSLError) as exc:
            server_errors.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with socket.create_connection(listener.getsockname(), timeout=10) as raw:
            with client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
                version, data = tls.version(), tls.recv(5)
    finally:
        thread.join(10)
        listener.close()
    assert not thread.is_alive()
    return version, data


@pytest.mark.parametrize("server_hostname", ["localhost", "127.0.0.1"])
def test_strict_tls13_handshake_succeeds(tmp_path: Path, server_hostname: str) -> None:
    generate(tmp_path)
    assert handshake(tmp_path, server_hostname) == ("TLSv1.3", b"hello")


def test_strict_handshake_refuses_a_name_not_on_the_certificate(tmp_path: Path) -> None:
    generate(tmp_path)
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        handshake(tmp_path, "chat.example.org")


def test_strict_handshake_works_for_an_extra_host(tmp_path: Path) -> None:
    generate(tmp_path, hosts=("chat.example.org",))
    assert handshake(tmp_path, "chat.example.org") == ("TLSv1.3", b"hello")


# --- what is in the certificates ---------------------------------------------------------------


def test_ca_certificate_extensions(tmp_path: Path) -> None:
    generate(tmp_path)
    ca = load(tmp_path / "ca.pem")
    assert ca.subject == ca.issuer
    assert ca.subject.rfc4514_string() == "CN=securechat local CA"
    bc = ext(ca, x509.BasicConstraints)
    assert (bc.critical, bc.value.ca, bc.value.path_length) == (True, True, 0)
    ku = ext(ca, x509.KeyUsage)
    assert ku.critical is True
    assert (ku.value.key_cert_sign, ku.value.crl_sign, ku.value.digital_signature) == (
        True,
        True,
        False,
    )
    ski = ext(ca, x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(ca.public_key())
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.public_key().curve.name == "secp256r1"
    assert ca.signature_hash_algorithm.name == "sha256"
    assert (ca.not_valid_after_utc - ca.not_valid_before_utc).days >= 3650
    ca.verify_directly_issued_by(ca)


def test_server_certificate_extensions(tmp_path: Path) -> None:
    generate(tmp_path, hosts=("Chat.Example.org", "10.0.0.5", "localhost", "2001:db8::1"), days=90)
    ca, server = load(tmp_path / "ca.pem"), load(tmp_path / "server.pem")
    server.verify_directly_issued_by(ca)
    sans = ext(server, x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "chat.example.org"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == [
        "127.0.0.1",
        "::1",
        "10.0.0.5",
        "2001:db8::1",
    ]
    assert ext(server, x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.SERVER_AUTH]
    )
    bc = ext(server, x509.BasicConstraints)
    assert (bc.critical, bc.value.ca) == (True, False)
    ku = ext(server, x509.KeyUsage)
    assert (ku.critical, ku.value.digital_signature, ku.value.key_cert_sign) == (True, True, False)
    assert ext(server, x509.SubjectKeyIdentifier).value == (
        x509.SubjectKeyIdentifier.from_public_key(server.public_key())
    )
    aki = ext(server, x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ext(ca, x509.SubjectKeyIdentifier).value.digest
    assert server.public_key().curve.name == "secp256r1"
    assert server.signature_hash_algorithm.name == "sha256"
    assert server.serial_number != ca.serial_number
    lifetime = server.not_valid_after_utc - server.not_valid_before_utc
    # 90 days from now, starting 5 minutes in the past for clock skew.
    assert lifetime.days == 90
    assert lifetime.seconds == 300


def test_client_certificate_extensions(tmp_path: Path) -> None:
    generate(tmp_path, clients=("alice-laptop",))
    ca, client = load(tmp_path / "ca.pem"), load(tmp_path / "alice-laptop.pem")
    client.verify_directly_issued_by(ca)
    assert client.subject.rfc4514_string() == "CN=alice-laptop"
    assert ext(client, x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.CLIENT_AUTH]
    )
    assert ext(client, x509.BasicConstraints).value.ca is False
    assert ext(client, x509.KeyUsage).value.digital_signature is True
    aki = ext(client, x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ext(ca, x509.SubjectKeyIdentifier).value.digest
    assert client.public_key().curve.name == "secp256r1"


def test_private_keys_are_unencrypted_pkcs8_matching_their_certificates(tmp_path: Path) -> None:
    generate(tmp_path, clients=("alice",))
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    for stem in ("ca", "server", "alice"):
        pem = (tmp_path / f"{stem}.key").read_bytes()
        assert pem.startswith(b"-----BEGIN PRIVATE KEY-----\n")
        key = serialization.load_pem_private_key(pem, password=None)
        cert = load(tmp_path / f"{stem}.pem")
        assert key.public_key().public_bytes(*spki) == cert.public_key().public_bytes(*spki)


def test_file_modes_and_no_leftover_temporary_files(tmp_path: Path) -> None:
    out = tmp_path / "deep" / "certs"
    generate(out, clients=("alice",))
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes == {
        "ca.pem": 0o644,
        "ca.key": 0o600,
        "server.pem": 0o644,
        "server.key": 0o600,
        "alice.pem": 0o644,
        "alice.key": 0o600,
    }


def test_fingerprints_match_openssl_format(tmp_path: Path) -> None:
    report = generate(tmp_path)
    ca = load(tmp_path / "ca.pem")
    expected = ca.fingerprint(hashes.SHA256()).hex().upper()
    fp = certs.cert_fingerprint(ca.public_bytes(serialization.Encoding.DER))
    assert fp.replace(":", "") == expected
    assert len(fp) == 32 * 3 - 1
    assert all(len(pair) == 2 for pair in fp.split(":"))
    assert certs.load_cert_fingerprint(tmp_path / "ca.pem") == fp == report.ca_fingerprint
    if OPENSSL:
        out = subprocess.run(
            [OPENSSL, "x509", "-in", "ca.pem", "-noout", "-fingerprint", "-sha256"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        assert out.strip().rpartition("=")[2] == fp


def test_load_cert_fingerprint_of_a_missing_file_is_a_certificate_error(tmp_path: Path) -> None:
    with pytest.raises(CertificateError, match="not found"):
        certs.load_cert_fingerprint(tmp_path / "nope.pem")


def test_summary_lines_name_every_file_the_fingerprint_and_ca_pem(tmp_path: Path) -> None:
    report = generate(tmp_path, clients=("alice",))
    names = ["ca.pem", "ca.key", "server.pem", "server.key", "alice.pem", "alice.key"]
    assert [f.path for f in report.files] == [tmp_path / n for n in names]
    lines = report.summary_lines()
    for name, line in zip(names, lines, strict=False):
        assert line.startswith(f"wrote {tmp_path / name} ")
    assert f"CA fingerprint (SHA-256): {report.ca_fingerprint}" in lines
    assert any(f"Clients need {tmp_path / 'ca.pem'}" in line for line in lines)
    assert len(lines) == len(names) + 2


# --- overwriting, --force and --reuse-ca -------------------------------------------------------


def test_refuses_to_overwrite_without_force_and_changes_nothing(tmp_path: Path) -> None:
    generate(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(CertificateError) as info:
        generate(tmp_path, clients=("alice",))
    message = str(info.value)
    assert "--force" in message
    for name in ("ca.pem", "ca.key", "server.pem", "server.key"):
        assert name in message
    assert "alice" not in message  # alice.pem did not exist
    assert snapshot(tmp_path) == before  # and alice.pem was not written either


def test_one_existing_target_stops_everything(tmp_path: Path) -> None:
    (tmp_path / "alice.key").write_bytes(b"keep me")
    with pytest.raises(CertificateError, match=r"refusing to overwrite alice\.key .*--force"):
        generate(tmp_path, clients=("alice",))
    assert snapshot(tmp_path) == {"alice.key": b"keep me"}


def test_force_replaces_everything(tmp_path: Path) -> None:
    first = generate(tmp_path)
    before = snapshot(tmp_path)
    second = generate(tmp_path, force=True)
    after = snapshot(tmp_path)
    assert set(after) == set(before)
    assert all(after[name] != before[name] for name in before)
    assert second.ca_fingerprint != first.ca_fingerprint
    assert stat.S_IMODE((tmp_path / "server.key").stat().st_mode) == 0o600


def test_reuse_ca_keeps_the_ca_and_issues_a_verifying_server_certificate(tmp_path: Path) -> None:
    first = generate(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(CertificateError, match="--force"):
        generate(tmp_path, reuse_ca=True, hosts=("chat.example.org",))
    assert snapshot(tmp_path) == before

    second = generate(
        tmp_path, reuse_ca=True, force=True, hosts=("chat.example.org",), clients=("bob",)
    )
    after = snapshot(tmp_path)
    assert second.ca_fingerprint == first.ca_fingerprint
    assert second.ca_reused is True
    assert after["ca.pem"] == before["ca.pem"]
    assert after["ca.key"] == before["ca.key"]
    assert after["server.pem"] != before["server.pem"]
    assert [f.path.name for f in second.files] == ["server.pem", "server.key", "bob.pem", "bob.key"]
    ca = load(tmp_path / "ca.pem")
    load(tmp_path / "server.pem").verify_directly_issued_by(ca)
    load(tmp_path / "bob.pem").verify_directly_issued_by(ca)
    assert handshake(tmp_path, "chat.example.org") == ("TLSv1.3", b"hello")
    if OPENSSL:
        assert openssl_verify(tmp_path, "server.pem", "bob.pem").returncode == 0


def test_reuse_ca_without_a_ca_names_the_missing_files(tmp_path: Path) -> None:
    with pytest.raises(CertificateError) as info:
        generate(tmp_path / "empty", reuse_ca=True)
    message = str(info.value)
    assert str(tmp_path / "empty" / "ca.pem") in message
    assert str(tmp_path / "empty" / "ca.key") in message
    assert "without --reuse-ca" in message
    assert not (tmp_path / "empty").exists()


def test_reuse_ca_refuses_a_key_that_does_not_match(tmp_path: Path) -> None:
    generate(tmp_path / "a")
    generate(tmp_path / "b")
    shutil.copy(tmp_path / "b" / "ca.key", tmp_path / "a" / "ca.key")
    before = snapshot(tmp_path / "a")
    with pytest.raises(CertificateError, match=r"ca\.key does not belong to .*ca\.pem"):
        generate(tmp_path / "a", reuse_ca=True, force=True)
    assert snapshot(tmp_path / "a") == before


def test_reuse_ca_refuses_an_unreadable_ca(tmp_path: Path) -> None:
    generate(tmp_path)
    (tmp_path / "ca.pem").write_text("not a certificate")
    with pytest.raises(CertificateError, match=r"ca\.pem is not a PEM certificate"):
        generate(tmp_path, reuse_ca=True, force=True)


# --- bad names ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [
        "",
        "bad host",
        "http://chat.example.org",
        "chat.example.org:12345",
        "a..b",
        "-x.org",
        "10.0.0.300",
        "under_score.org",
        "a/b",
        "ünï.org",
        "x" * 64 + ".org",
    ],
)
def test_invalid_host_is_a_config_error_and_writes_nothing(tmp_path: Path, host: str) -> None:
    with pytest.raises(ConfigError, match="--host"):
        generate(tmp_path / "out", hosts=(host,))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "name", ["../x", "a/b", "", ".hidden", "..", "ca", "Server", "x" * 65, "a b", "ali\x00ce"]
)
def test_invalid_client_name_is_a_config_error_and_writes_nothing(
    tmp_path: Path, name: str
) -> None:
    with pytest.raises(ConfigError, match="--client"):
        generate(tmp_path / "out", clients=(name,))
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "x.pem").exists()


def test_duplicate_client_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="more than once"):
        generate(tmp_path, clients=("alice", "Alice"))


# --- the command line and the admin script -----------------------------------------------------


def test_cli_prints_the_ca_fingerprint_and_refuses_a_second_run(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    proc = run_cli("gen-certs", "--out", str(out), "--client", "alice")
    assert proc.returncode == 0, proc.stderr
    fingerprint = certs.cert_fingerprint(
        load(out / "ca.pem").public_bytes(serialization.Encoding.DER)
    )
    assert f"CA fingerprint (SHA-256): {fingerprint}" in proc.stdout.splitlines()
    assert sorted(p.name for p in out.iterdir()) == [
        "alice.key",
        "alice.pem",
        "ca.key",
        "ca.pem",
        "server.key",
        "server.pem",
    ]

    before = snapshot(out)
    again = run_cli("gen-certs", "--out", str(out), "--client", "alice")
    assert again.returncode == 1
    assert again.stderr.startswith("securechat: error: refusing to overwrite ")
    assert "--force" in again.stderr
    assert "Traceback" not in again.stderr
    assert again.stdout == ""
    assert snapshot(out) == before

    # --if-missing (the README's first command) leaves a complete set alone and says so ...
    idle = run_cli("gen-certs", "--out", str(out), "--client", "alice", "--if-missing")
    assert idle.returncode == 0, idle.stderr
    assert idle.stdout.splitlines() == [
        f"{out} already holds ca.pem, server.pem, server.key, alice.pem; nothing to do",
        f"CA fingerprint (SHA-256): {fingerprint}",
    ]
    assert snapshot(out) == before
    # ... and does not go with --force.
    both = run_cli("gen-certs", "--out", str(out), "--if-missing", "--force")
    assert both.returncode == 2
    assert "--if-missing and --force contradict each other" in both.stderr


def test_if_missing_makes_certificates_where_there_are_none(tmp_path: Path) -> None:
    out = tmp_path / "fresh"
    proc = run_cli("gen-certs", "--out", str(out), "--if-missing")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "ca.key",
        "ca.pem",
        "server.key",
        "server.pem",
    ]


def test_cli_rejects_a_bad_host_with_one_line(tmp_path: Path) -> None:
    proc = run_cli("gen-certs", "--out", str(tmp_path / "c"), "--host", "a..b")
    assert proc.returncode == 1
    assert proc.stderr.startswith("securechat: error: --host 'a..b' ")
    assert len(proc.stderr.splitlines()) == 1


def test_admin_script_makes_a_verifying_chain(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "gen-certs.sh"), "--out", str(out), "--client", "alice"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    ca = load(out / "ca.pem")
    load(out / "server.pem").verify_directly_issued_by(ca)
    load(out / "alice.pem").verify_directly_issued_by(ca)
    assert f"CA fingerprint (SHA-256): {certs.load_cert_fingerprint(out / 'ca.pem')}" in proc.stdout
    if OPENSSL:
        assert "server.pem: OK" in proc.stdout.splitlines()
        assert "alice.pem: OK" in proc.stdout.splitlines()


def test_admin_script_stops_when_gen_certs_fails(tmp_path: Path) -> None:
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "gen-certs.sh"), "--out", str(tmp_path), "--reuse-ca"],
        cwd=tmp_path,
        env={**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "securechat: error: --reuse-ca: " in proc.stderr
    assert "OK" not in proc.stdout
