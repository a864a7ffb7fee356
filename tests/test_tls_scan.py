"""The server's TLS configuration as a scanner sees it."""

from __future__ import annotations

import socket
import ssl

import pytest

from securechat.server import Server


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
