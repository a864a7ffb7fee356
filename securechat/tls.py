"""TLS: the server and client SSL contexts, and one TLS connection driven over memory buffers.

Theory of operation (docs/ARCHITECTURE.md): OpenSSL forbids using one SSL object from two
threads at once and Python's ssl module adds no lock. So a TLSStream has exactly one owner
thread, which feeds it the bytes read from the socket and sends the bytes it produces. Any other
thread that wants to send hands plaintext to the owner and wakes it; it never touches the stream
or the socket. TLSStream does no I/O itself, so the owner decides when to read, write and
coalesce.
"""

from __future__ import annotations

import hashlib
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from securechat.errors import CertificateError, ConnectionClosed

READ_CHUNK = 64 * 1024
# Plaintext encrypted at a time. A memory BIO keeps the capacity of the most it ever held for as
# long as it lives, so one big write would pin that much memory to the connection for good.
WRITE_CHUNK = 64 * 1024


def server_context(
    certs_dir: Path, *, require_client_cert: bool = False
) -> tuple[ssl.SSLContext, bytes]:
    """TLS 1.3-only server context from certs_dir/server.pem and server.key.

    Returns the context and the SHA-256 of the server certificate (DER), which logins sign.
    """
    cert, key, ca = certs_dir / "server.pem", certs_dir / "server.key", certs_dir / "ca.pem"
    missing = [str(p) for p in (cert, key) if not p.is_file()]
    if require_client_cert and not ca.is_file():
        missing.append(str(ca))
    if missing:
        raise CertificateError(
            f"missing {', '.join(missing)}; run `securechat gen-certs --out {certs_dir}` "
            "to make a local CA and server certificate"
        )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    # No session tickets: each one costs a write per handshake and we do not resume sessions.
    ctx.num_tickets = 0
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    _limit_key_exchange(ctx)
    try:
        ctx.load_cert_chain(cert, key)
        if require_client_cert:
            # As strict as the client is with us: only our CA, strict X.509 rules. OpenSSL also
            # checks dates and, when present, key usages; client_certificate_problem the rest.
            ctx.load_verify_locations(cafile=ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    except (OSError, ssl.SSLError) as exc:
        raise CertificateError(
            f"cannot load the server certificate from {certs_dir} ({exc}); "
            "run `securechat gen-certs` to make one"
        ) from None
    try:
        pem = cert.read_text("ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise CertificateError(f"cannot read {cert}: {exc}") from None
    return ctx, cert_sha256(ssl.PEM_cert_to_DER_cert(pem))


def client_certificate_problem(der: bytes | None) -> str | None:
    """Why a client certificate that passed OpenSSL's checks is still refused, or None.

    OpenSSL refuses a client certificate whose key usage or extended key usage excludes client
    authentication, but lets one through that has no extended key usage at all, and does not
    look at whether it is a CA's. We ask for what our generator gives every client certificate:
    not a CA, digital signatures allowed, and clientAuth named.
    """
    if der is None:
        return "no certificate"
    try:
        cert = x509.load_der_x509_certificate(der)
        extensions = {ext.oid: ext.value for ext in cert.extensions}
    except ValueError:
        return "it cannot be parsed"
    constraints = extensions.get(x509.BasicConstraints.oid)
    if not isinstance(constraints, x509.BasicConstraints) or constraints.ca:
        return "it is a CA certificate, not a client certificate"
    usage = extensions.get(x509.KeyUsage.oid)
    if not isinstance(usage, x509.KeyUsage) or not usage.digital_signature:
        return "its key usage does not allow digital signatures"
    extended = extensions.get(x509.ExtendedKeyUsage.oid)
    if not isinstance(extended, x509.ExtendedKeyUsage):
        return "it has no extended key usage; a client certificate must allow clientAuth"
    if ExtendedKeyUsageOID.CLIENT_AUTH not in extended:
        return "its extended key usage does not allow clientAuth"
    return None


def _limit_key_exchange(ctx: ssl.SSLContext) -> None:
    """Offer X25519 only, so the server meets Mozilla's "modern" profile (X25519, P-256, P-384).

    OpenSSL 3's default also accepts X448 and P-521, which that profile refuses. The ssl module of
    Python 3.11 can set one group, not a list; X25519 is the one every TLS 1.3 client we know of
    sends a key share for first, so handshakes stay at one round trip. An OpenSSL older than 3.0
    cannot set X25519 this way; P-256 (mandatory in RFC 8446) is the fallback there.
    """
    try:
        ctx.set_ecdh_curve("X25519")
    except (ValueError, ssl.SSLError):
        ctx.set_ecdh_curve("prime256v1")


def client_context(
    ca_file: Path, cert_file: Path | None = None, key_file: Path | None = None
) -> ssl.SSLContext:
    """TLS 1.3-only client context that trusts only our CA and checks the host name."""
    if not ca_file.is_file():
        raise CertificateError(
            f"CA certificate {ca_file} not found; pass --ca with the server's ca.pem "
            "(made by `securechat gen-certs`)"
        )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname by default
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    try:
        ctx.load_verify_locations(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise CertificateError(f"cannot load CA certificate {ca_file}: {exc}") from None
    if (cert_file is None) != (key_file is None):
        raise CertificateError("--cert and --cert-key go together")
    if cert_file is not None and key_file is not None:
        try:
            ctx.load_cert_chain(cert_file, key_file)
        except (OSError, ssl.SSLError) as exc:
            raise CertificateError(
                f"cannot load client certificate {cert_file} / {key_file}: {exc}"
            ) from None
    return ctx


def cert_sha256(der: bytes) -> bytes:
    return hashlib.sha256(der).digest()


class TLSStream:
    """One TLS connection over memory BIOs, used by its owner thread only."""

    __slots__ = ("_drained", "_in", "_out", "handshake_done", "obj")

    def __init__(
        self, ctx: ssl.SSLContext, *, server_side: bool, server_hostname: str | None = None
    ) -> None:
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._drained: list[bytes] = []  # records of a big write, read out of _out as it went
        self.obj = ctx.wrap_bio(
            self._in, self._out, server_side=server_side, server_hostname=server_hostname
        )
        self.handshake_done = False

    def do_handshake(self) -> bool:
        """Advance the handshake; True once it is complete. Raises ssl.SSLError on failure."""
        try:
            self.obj.do_handshake()
        except ssl.SSLWantReadError:
            return False
        self.handshake_done = True
        return True

    def feed(self, data: bytes) -> None:
        """Bytes read from the socket; b"" means the peer closed TCP."""
        if data:
            self._in.write(data)
        else:
            self._in.write_eof()

    def read(self) -> bytes:
        """All application data decrypted so far (b"" if none yet).

        Raises ConnectionClosed when the peer closed the TLS session, ssl.SSLError on a bad record
        or an alert (under TLS 1.3 a refused client certificate shows up here).
        """
        chunks: list[bytes] = []
        while True:
            try:
                chunk = self.obj.read(READ_CHUNK)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                if chunks:
                    break
                raise ConnectionClosed("peer closed the TLS session") from None
            except ssl.SSLEOFError:
                if chunks:
                    break
                raise ConnectionClosed("connection closed without TLS close_notify") from None
            if not chunk:
                if chunks:
                    break
                raise ConnectionClosed("peer closed the connection")
            chunks.append(chunk)
        return b"".join(chunks)

    def write(self, data: bytes) -> None:
        """Encrypt plaintext; the records wait in data_to_send()."""
        if len(data) <= WRITE_CHUNK:
            self.obj.write(data)
            return
        view = memoryview(data)
        for start in range(0, len(view), WRITE_CHUNK):
            self.obj.write(view[start : start + WRITE_CHUNK])
            self._drained.append(self._out.read())

    def encrypt(self, data: bytes) -> bytes:
        """write() then data_to_send(), in one call: the records of `data` and of anything
        queued before it."""
        if len(data) <= WRITE_CHUNK and not self._drained:
            self.obj.write(data)
            return self._out.read()
        self.write(data)
        return self.data_to_send()

    def data_to_send(self) -> bytes:
        if not self._drained:
            return self._out.read()
        self._drained.append(self._out.read())
        out = b"".join(self._drained)
        self._drained.clear()
        return out

    def close(self) -> None:
        """Queue a close_notify (best effort)."""
        try:
            self.obj.unwrap()
        except (ssl.SSLError, ValueError):
            pass

    def peer_cert_der(self) -> bytes | None:
        return self.obj.getpeercert(binary_form=True)

    def peer_cert_sha256(self) -> bytes:
        der = self.peer_cert_der()
        if der is None:
            raise CertificateError("the server presented no certificate")
        return cert_sha256(der)
