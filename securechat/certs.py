"""The local certificate authority behind `securechat gen-certs`.

Makes (or reuses) a small ECDSA P-256 CA, issues the server certificate and optional client
certificates from it, and writes them atomically with private keys readable by their owner only.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from securechat import files as files_io
from securechat.errors import CertificateError, ConfigError

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"

CA_CN = "securechat local CA"
SERVER_CN = "securechat server"
CA_DAYS = 3650
DEFAULT_NAMES = ("localhost", "127.0.0.1", "::1")
# Certificates start a little in the past so that a peer whose clock lags still accepts them.
CLOCK_SKEW = dt.timedelta(minutes=5)

CERT_MODE = 0o644
KEY_MODE = 0o600

_CLIENT_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_RESERVED_CLIENT_NAMES = frozenset({"ca", "server"})
_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


@dataclass(frozen=True)
class WrittenFile:
    """One file generate() wrote, and what it is (for the summary)."""

    path: Path
    description: str


@dataclass(frozen=True)
class Report:
    """What generate() did: the files it wrote and the fingerprint of the CA in use."""

    out_dir: Path
    files: tuple[WrittenFile, ...]
    ca_fingerprint: str
    ca_reused: bool

    def summary_lines(self) -> list[str]:
        width = max((len(str(f.path)) for f in self.files), default=0)
        lines = [f"wrote {f.path!s:<{width}}  {f.description}" for f in self.files]
        ca_pem = self.out_dir / CA_CERT
        if self.ca_reused:
            lines.append(f"kept the existing CA in {ca_pem} and {self.out_dir / CA_KEY}")
        lines.append(f"CA fingerprint (SHA-256): {self.ca_fingerprint}")
        lines.append(
            f"Clients need {ca_pem} (securechat client --ca {ca_pem}); check this fingerprint "
            f"when you hand it over. Keep the .key files secret."
        )
        return lines


def cert_fingerprint(der: bytes) -> str:
    """SHA-256 of a DER certificate as uppercase hex pairs joined by ':' (as openssl prints it)."""
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def load_cert_fingerprint(pem_path: Path) -> str:
    """cert_fingerprint() of the first certificate in a PEM file."""
    cert = _load_cert(pem_path)
    return cert_fingerprint(cert.public_bytes(serialization.Encoding.DER))


def complete_set(out_dir: Path, clients: Sequence[str] = ()) -> list[str] | None:
    """The files a server (and these clients) need, if out_dir already holds them all."""
    wanted = [CA_CERT, SERVER_CERT, SERVER_KEY, *(f"{c}.pem" for c in _client_names(clients))]
    return wanted if all((out_dir / name).is_file() for name in wanted) else None


def generate(
    out_dir: Path,
    *,
    hosts: Sequence[str] = (),
    clients: Sequence[str] = (),
    days: int = 825,
    reuse_ca: bool = False,
    force: bool = False,
) -> Report:
    """Make (or, with reuse_ca, load) the CA in out_dir and issue the server and client certs.

    Raises ConfigError for an unusable host or client name and CertificateError when a file would
    be overwritten without force, the CA to reuse is missing or broken, or out_dir is unwritable.
    Nothing is written unless everything can be.
    """
    out_dir = Path(out_dir)
    server_names = _server_names(hosts)
    client_names = _client_names(clients)
    if days < 1:
        raise ConfigError(f"--days must be at least 1, not {days}")
    _refuse_overwrite(out_dir, client_names, reuse_ca=reuse_ca, force=force)

    now = dt.datetime.now(dt.timezone.utc)
    not_before = now - CLOCK_SKEW
    pending: list[_Pending] = []
    if reuse_ca:
        ca_cert, ca_key = _load_ca(out_dir, now)
    else:
        new_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert, ca_key = _make_ca(new_key, not_before, now + dt.timedelta(days=CA_DAYS)), new_key
        pending.append((CA_CERT, _cert_pem(ca_cert), CERT_MODE, "CA certificate (give to clients)"))
        pending.append((CA_KEY, _key_pem(new_key), KEY_MODE, "CA private key (secret)"))
    # A leaf cannot outlive its CA: a chain with an expired CA no longer verifies.
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    issuer = _Issuer(ca_cert, ca_key, not_before, not_after)
    pending += issuer.server_files(server_names)
    for name in client_names:
        pending += issuer.client_files(name)

    _write_all(out_dir, [(name, data, mode) for name, data, mode, _ in pending])
    return Report(
        out_dir=out_dir,
        files=tuple(WrittenFile(out_dir / name, desc) for name, _, _, desc in pending),
        ca_fingerprint=cert_fingerprint(ca_cert.public_bytes(serialization.Encoding.DER)),
        ca_reused=reuse_ca,
    )


def _refuse_overwrite(
    out_dir: Path, client_names: Sequence[str], *, reuse_ca: bool, force: bool
) -> None:
    """Check every target before writing, so that a refusal leaves the folder exactly as it was."""
    targets = [SERVER_CERT, SERVER_KEY]
    for name in client_names:
        targets += [f"{name}.pem", f"{name}.key"]
    if not reuse_ca:
        targets = [CA_CERT, CA_KEY, *targets]
    existing = [name for name in targets if os.path.lexists(out_dir / name)]
    if existing and not force:
        hint = "" if reuse_ca else "; to renew only the server certificate use --reuse-ca --force"
        raise CertificateError(
            f"refusing to overwrite {', '.join(existing)} in {out_dir}: pass --force to "
            f"replace {'it' if len(existing) == 1 else 'them'}{hint}"
        )


# A file to write: its name in out_dir, contents, mode, and what it is (for the summary).
_Pending = tuple[str, bytes, int, str]


@dataclass(frozen=True)
class _Issuer:
    """The CA and validity window that every leaf of one generate() run shares."""

    ca_cert: x509.Certificate
    ca_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    not_before: dt.datetime
    not_after: dt.datetime

    @property
    def until(self) -> str:
        return f"valid until {self.not_after:%Y-%m-%d}"

    def server_files(self, server_names: Sequence[str]) -> list[_Pending]:
        key, cert = self._issue(
            SERVER_CN, ExtendedKeyUsageOID.SERVER_AUTH, [_general_name(n) for n in server_names]
        )
        names = ", ".join(server_names)
        return [
            (
                SERVER_CERT,
                _cert_pem(cert),
                CERT_MODE,
                f"server certificate for {names}, {self.until}",
            ),
            (SERVER_KEY, _key_pem(key), KEY_MODE, "server private key (secret)"),
        ]

    def client_files(self, name: str) -> list[_Pending]:
        key, cert = self._issue(name, ExtendedKeyUsageOID.CLIENT_AUTH, None)
        return [
            (
                f"{name}.pem",
                _cert_pem(cert),
                CERT_MODE,
                f"client certificate for {name}, {self.until}",
            ),
            (f"{name}.key", _key_pem(key), KEY_MODE, f"client private key for {name} (secret)"),
        ]

    def _issue(
        self, common_name: str, usage: x509.ObjectIdentifier, sans: list[x509.GeneralName] | None
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _make_leaf(
            self.ca_cert,
            self.ca_key,
            key,
            common_name=common_name,
            usage=usage,
            sans=sans,
            not_before=self.not_before,
            not_after=self.not_after,
        )
        return key, cert


# --- names -----------------------------------------------------------------------------------


def _server_names(hosts: Sequence[str]) -> list[str]:
    """The server's SAN values: the loopback defaults plus each valid --host, without repeats."""
    names: list[str] = []
    for raw in (*DEFAULT_NAMES, *hosts):
        name = _normalize_host(raw)
        if name not in names:
            names.append(name)
    return names


def _normalize_host(raw: str) -> str:
    """A host name or IP address in canonical form, or ConfigError saying what is wrong."""
    host = raw.strip()
    if not host:
        raise ConfigError("--host needs a DNS name or an IP address, not an empty value")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        if getattr(address, "scope_id", None):
            raise ConfigError(f"--host {raw!r}: a certificate cannot name a scoped IPv6 address")
        return str(address)
    if "://" in host or "/" in host or ":" in host:
        raise ConfigError(
            f"--host {raw!r} is not a host name or IP address; give the bare name without "
            "scheme, port or path (e.g. --host chat.example.org)"
        )
    if not host.isascii():
        raise ConfigError(
            f"--host {raw!r}: give an internationalized name in its ASCII (xn--) form"
        )
    dns = host.lower().removesuffix(".")
    labels = dns.split(".")
    # One leading "*" label is a wildcard; OpenSSL only matches it as the whole leftmost label.
    check = labels[1:] if labels[0] == "*" and len(labels) > 2 else labels
    # An all-numeric last label is a mistyped IP address, never a real top-level domain.
    if labels[-1].isdigit():
        raise ConfigError(f"--host {raw!r} is not a valid IPv4 or IPv6 address")
    if len(dns) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in check):
        raise ConfigError(
            f"--host {raw!r} is not a valid DNS name or IP address (DNS labels are letters, "
            "digits and inner hyphens, up to 63 characters)"
        )
    return dns


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _client_names(clients: Sequence[str]) -> list[str]:
    """Validated client names; each becomes a file name in out_dir, so none may leave it."""
    names: list[str] = []
    seen: set[str] = set()
    for name in clients:
        if not _CLIENT_NAME.fullmatch(name) or name.startswith("."):
            raise ConfigError(
                f"--client {name!r} is not a valid name: use 1-64 letters, digits, '.', '_' "
                "or '-', not starting with '.'"
            )
        # Compared case-insensitively: on macOS and Windows Alice.pem and alice.pem collide.
        folded = name.lower()
        if folded in _RESERVED_CLIENT_NAMES:
            raise ConfigError(f"--client {name!r} is reserved (it would clash with {folded}.pem)")
        if folded in seen:
            raise ConfigError(f"--client {name!r} is given more than once")
        seen.add(folded)
        names.append(name)
    return names


# --- certificates ----------------------------------------------------------------------------


def _make_ca(
    key: ec.EllipticCurvePrivateKey, not_before: dt.datetime, not_after: dt.datetime
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_CN)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        # pathlen 0: this CA signs leaf certificates only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )


def _make_leaf(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    key: ec.EllipticCurvePrivateKey,
    *,
    common_name: str,
    usage: x509.ObjectIdentifier,
    sans: list[x509.GeneralName] | None,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        # Strict verification (VERIFY_X509_STRICT) requires the AKI to link a leaf to its CA.
        .add_extension(_authority_key_id(ca_cert, ca_key), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def _authority_key_id(
    ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
) -> x509.AuthorityKeyIdentifier:
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        # A reused CA made elsewhere may lack an SKI; derive the same value from its key (the
        # one in the certificate: _load_ca checked that they match).
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_cert(path: Path) -> x509.Certificate:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CertificateError(f"certificate {path} not found") from None
    except OSError as exc:
        raise CertificateError(f"cannot read certificate {path}: {exc.strerror}") from None
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise CertificateError(f"{path} is not a PEM certificate") from None


def _load_ca(
    out_dir: Path, now: dt.datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey]:
    """The CA to reuse, checked: present, readable, a CA, unexpired, and matching its key."""
    cert_path, key_path = out_dir / CA_CERT, out_dir / CA_KEY
    fresh = f"run `securechat gen-certs --out {out_dir}` without --reuse-ca to make a new CA"
    missing = [str(p) for p in (cert_path, key_path) if not p.is_file()]
    if missing:
        raise CertificateError(f"--reuse-ca: {' and '.join(missing)} not found; {fresh}")
    cert = _load_cert(cert_path)
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except OSError as exc:
        raise CertificateError(f"cannot read CA key {key_path}: {exc.strerror}") from None
    except TypeError:
        raise CertificateError(
            f"CA key {key_path} is encrypted; store it unencrypted (PKCS#8 PEM, mode 0600)"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise CertificateError(f"{key_path} is not a PEM private key") from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise CertificateError(f"CA key {key_path} is not an EC or RSA key; {fresh}")

    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise CertificateError(f"CA key {key_path} does not belong to {cert_path}")
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise CertificateError(f"{cert_path} is not a CA certificate; {fresh}")
    if cert.not_valid_after_utc <= now:
        raise CertificateError(
            f"the CA in {cert_path} expired on {cert.not_valid_after_utc:%Y-%m-%d}; {fresh} "
            "(every client then needs the new ca.pem)"
        )
    return cert, key


# --- files -----------------------------------------------------------------------------------


def _write_all(out_dir: Path, files: list[tuple[str, bytes, int]]) -> None:
    """Write every file to a temporary sibling first and rename them into place only when all
    were written, so a full disk or a crash mid-way never leaves a half-written file."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CertificateError(f"cannot create {out_dir}: {exc.strerror or exc}") from None
    temps: list[tuple[Path, Path]] = []
    try:
        for name, data, mode in files:
            temps.append((files_io.write_temp(out_dir, name, data, mode), out_dir / name))
        for temp, final in temps:
            os.replace(temp, final)
    except OSError as exc:
        raise CertificateError(f"cannot write to {out_dir}: {exc.strerror or exc}") from None
    finally:
        for temp, _ in temps:
            try:
                temp.unlink()
            except FileNotFoundError:
                pass
    files_io.fsync_dir(out_dir)
