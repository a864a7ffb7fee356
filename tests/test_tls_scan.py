"""The running server, scanned by sslyze against Mozilla's "modern" TLS configuration.

sslyze pins an older `cryptography` than ours, so it lives in its own virtualenv (`.ci/run` makes
`.ci-venv-sslyze`) and runs as a command named by SECURECHAT_SSLYZE. Without it these tests skip,
except under CI, where a missing scanner is a failure.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from securechat.server import Server

from .conftest import start_server

SSLYZE_ENV = "SECURECHAT_SSLYZE"
MODERN_SUITES = {"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"}
OLD_VERSIONS = ("ssl_2_0", "ssl_3_0", "tls_1_0", "tls_1_1", "tls_1_2")
PUBLIC_STORES = {"Android", "Apple", "Java", "Mozilla", "Windows"}


@pytest.fixture(scope="module")
def sslyze() -> str:
    path = os.environ.get(SSLYZE_ENV)
    if not path:
        if os.environ.get("CI"):
            pytest.fail(f"{SSLYZE_ENV} is not set; .ci/run installs sslyze and sets it")
        pytest.skip(
            f"set {SSLYZE_ENV} to an sslyze 6 executable (README, 'TLS scan') to scan the server"
        )
    return path


@pytest.fixture(params=[False, True], ids=["server-auth", "mutual-tls"])
def scanned_server(request, certs_dir: Path, tmp_path: Path) -> Iterator[Server]:
    srv = start_server(certs_dir, tmp_path / "data", require_client_cert=request.param)
    try:
        yield srv
    finally:
        srv.stop()


def scan(sslyze: str, srv: Server, certs_dir: Path, out: Path, *extra: str) -> dict[str, Any]:
    """Run the scan; sslyze exits non-zero when the server is not compliant."""
    host, port = srv.address
    command = [
        sslyze,
        "--mozilla_config=modern",
        "--early_data",  # not among the modern checks; asked for separately
        f"--certinfo_ca_file={certs_dir / 'ca.pem'}",
        f"--json_out={out}",
        *extra,
        f"{host}:{port}",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=100, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert f"{host}:{port}: OK - Compliant." in done.stdout
    [result] = json.loads(out.read_text())["server_scan_results"]
    assert (result["connectivity_status"], result["scan_status"]) == ("COMPLETED", "COMPLETED")
    return result


def ca_fingerprint(certs_dir: Path) -> str:
    der = ssl.PEM_cert_to_DER_cert((certs_dir / "ca.pem").read_text())
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


def client_cert_args(certs_dir: Path, srv: Server) -> tuple[str, ...]:
    if not srv.config.require_client_cert:
        return ()
    return (f"--cert={certs_dir / 'alice-laptop.pem'}", f"--key={certs_dir / 'alice-laptop.key'}")


def refused_for_no_certificate(caplog: pytest.LogCaptureFixture) -> int:
    return sum("PEER_DID_NOT_RETURN_A_CERTIFICATE" in r.getMessage() for r in caplog.records)


def test_server_meets_mozilla_modern(sslyze, scanned_server, certs_dir, tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="securechat.server")
    extra = client_cert_args(certs_dir, scanned_server)
    result = scan(sslyze, scanned_server, certs_dir, tmp_path / "scan.json", *extra)["scan_result"]
    assert refused_for_no_certificate(caplog) == 0  # with --require-client-cert, ours was taken
    errors = {name: a["error_reason"] for name, a in result.items() if a["status"] == "ERROR"}
    assert errors == {}

    # TLS 1.3 only, and only its AEAD suites, with X25519 key exchange.
    for version in OLD_VERSIONS:
        assert not result[f"{version}_cipher_suites"]["result"]["is_tls_version_supported"]
    tls13 = result["tls_1_3_cipher_suites"]["result"]
    assert tls13["is_tls_version_supported"]
    accepted = {s["cipher_suite"]["name"] for s in tls13["accepted_cipher_suites"]}
    assert accepted == MODERN_SUITES
    curves = result["elliptic_curves"]["result"]["supported_curves"]
    assert [c["name"] for c in curves] == ["X25519"]

    # No compression, no early data, no insecure or client-started renegotiation.
    assert result["tls_compression"]["result"] == {"supports_compression": False}
    assert result["tls_1_3_early_data"]["result"] == {"supports_early_data": False}
    reneg = result["session_renegotiation"]["result"]
    assert reneg["supports_secure_renegotiation"]
    assert not reneg["is_vulnerable_to_client_renegotiation_dos"]

    # The chain verifies against our CA, and against no public trust store (a private CA).
    [deployment] = result["certificate_info"]["result"]["certificate_deployments"]
    chain = deployment["verified_certificate_chain"]
    assert [c["subject"]["rfc4514_string"] for c in chain] == [
        "CN=securechat server",
        "CN=securechat local CA",
    ]
    assert chain[-1]["fingerprint_sha256"] == ca_fingerprint(certs_dir)
    trusted = {
        v["trust_store"]["name"]: v["was_validation_successful"]
        for v in deployment["path_validation_results"]
    }
    assert trusted == {"Supplied CA file": True} | dict.fromkeys(PUBLIC_STORES, False)


def test_scan_without_a_client_certificate_sees_it_required(
    sslyze, certs_dir, tmp_path: Path, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="securechat.server")
    srv = start_server(certs_dir, tmp_path / "data", require_client_cert=True)
    try:
        result = scan(sslyze, srv, certs_dir, tmp_path / "scan.json")
    finally:
        srv.stop()
    assert result["connectivity_result"]["client_auth_requirement"] == "REQUIRED"
    # TLS 1.3 checks the client certificate after the server's Finished, so the scan still sees
    # the whole configuration; the server refused its connections for want of one.
    assert refused_for_no_certificate(caplog) > 0


def test_key_exchange_groups_outside_the_modern_profile_are_refused(server: Server, certs_dir):
    """Without sslyze: a client that offers only P-521 (or only X448) gets no handshake."""
    host, port = server.address
    for group in ("secp521r1", "X448"):
        ctx = ssl.create_default_context(cafile=certs_dir / "ca.pem")
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.set_ecdh_curve(group)
        with pytest.raises(ssl.SSLError, match="HANDSHAKE_FAILURE"):
            with ssl_connect(ctx, host, port):
                pass
    ctx = ssl.create_default_context(cafile=certs_dir / "ca.pem")
    ctx.set_ecdh_curve("X25519")
    with ssl_connect(ctx, host, port) as conn:
        assert conn.version() == "TLSv1.3"


def ssl_connect(ctx: ssl.SSLContext, host: str, port: int) -> ssl.SSLSocket:
    sock = socket.create_connection((host, port), timeout=10)
    try:
        return ctx.wrap_socket(sock, server_hostname="localhost")
    except BaseException:
        sock.close()
        raise
