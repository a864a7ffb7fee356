"""Identity keys: one Ed25519 signing key per user, sealed at rest with a passphrase.

The key file holds the 32-byte seed inside a SecretBox whose key comes from Argon2id; the KDF
limits live in the file. It never prompts: callers pass the passphrase in (the front ends ask
for it). Nothing here ever logs, prints or puts in an exception a passphrase, a seed or a derived
key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import stat
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import nacl.exceptions
import nacl.pwhash
import nacl.secret
import nacl.signing
import nacl.utils
from nacl.pwhash import argon2id

from securechat.errors import IdentityError
from securechat.files import write_atomically

FORMAT = "securechat-identity"
VERSION = 1
KDF_MODERATE: tuple[int, int] = (argon2id.OPSLIMIT_MODERATE, argon2id.MEMLIMIT_MODERATE)
# Tests and the load generator only: ask for it explicitly, never by default.
KDF_FAST_FOR_TESTS: tuple[int, int] = (argon2id.OPSLIMIT_MIN, argon2id.MEMLIMIT_MIN)
# A hostile key file must not make us allocate without bound.
MEMLIMIT_CEILING = 4 * 1024**3
OPSLIMIT_CEILING = 64


@dataclass(frozen=True, repr=False)
class Identity:
    path: Path | None
    signing_key: nacl.signing.SigningKey
    user: str | None = None

    @property
    def verify_key_bytes(self) -> bytes:
        return bytes(self.signing_key.verify_key)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.verify_key_bytes)

    def sign(self, message: bytes) -> bytes:
        """A detached 64-byte Ed25519 signature."""
        return self.signing_key.sign(message).signature

    def __repr__(self) -> str:
        return f"Identity(path={self.path!s}, user={self.user!r}, fingerprint={self.fingerprint!r})"


FINGERPRINT_GROUPS = 16


def fingerprint(public_key: bytes) -> str:
    """SHA-256 of the public key: 64 lowercase hex digits in 16 groups of 4."""
    digest = hashlib.sha256(public_key).hexdigest()
    return " ".join(digest[i : i + 4] for i in range(0, 4 * FINGERPRINT_GROUPS, 4))


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _derive(passphrase: bytes, salt: bytes, opslimit: int, memlimit: int) -> bytes:
    return argon2id.kdf(
        nacl.secret.SecretBox.KEY_SIZE, passphrase, salt, opslimit=opslimit, memlimit=memlimit
    )


def create(
    path: Path,
    passphrase: bytes,
    *,
    user: str | None = None,
    kdf: tuple[int, int] = KDF_MODERATE,
) -> Identity:
    """Make a new identity and seal it into `path` (mode 0600; parent folders made 0700)."""
    if not passphrase:
        raise IdentityError("an empty passphrase is not allowed")
    if path.exists():
        raise IdentityError(f"identity key {path} already exists; refusing to overwrite it")
    opslimit, memlimit = kdf
    signing_key = nacl.signing.SigningKey.generate()
    salt = nacl.utils.random(argon2id.SALTBYTES)
    box = nacl.secret.SecretBox(_derive(passphrase, salt, opslimit, memlimit))
    record = {
        "format": FORMAT,
        "version": VERSION,
        "kdf": "argon2id",
        "opslimit": opslimit,
        "memlimit": memlimit,
        "salt": _b64(salt),
        "sealed_seed": _b64(box.encrypt(bytes(signing_key))),
        "public_key": _b64(bytes(signing_key.verify_key)),
        "user": user,
    }
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomically(path, json.dumps(record, indent=1).encode() + b"\n")
    except OSError as exc:
        raise IdentityError(f"cannot write identity key {path}: {exc.strerror or exc}") from None
    return Identity(path, signing_key, user)


def _read_record(path: Path) -> dict[str, Any]:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise IdentityError(f"identity key {path} does not exist") from None
    except OSError as exc:
        raise IdentityError(f"cannot read identity key {path}: {exc.strerror or exc}") from None
    mode = stat.S_IMODE(st.st_mode)
    # As OpenSSH: a private key others can read may already be copied; refuse to use it.
    if mode & 0o077:
        raise IdentityError(
            f"permissions {mode:04o} for '{path}' are too open; the key must be readable by "
            f"you only (chmod 600 {path})"
        )
    try:
        record = json.loads(path.read_bytes()[: 64 * 1024])
    except OSError as exc:
        raise IdentityError(f"cannot read identity key {path}: {exc.strerror or exc}") from None
    except ValueError:
        raise IdentityError(f"{path} is not a securechat identity key (not JSON)") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise IdentityError(f"{path} is not a securechat identity key")
    if record.get("version") != VERSION or record.get("kdf") != "argon2id":
        raise IdentityError(f"{path} has an identity key format this securechat cannot read")
    return record


def _field(record: dict[str, Any], name: str, path: Path, size: int | None = None) -> bytes:
    value = record.get(name)
    try:
        raw = base64.b64decode(value if isinstance(value, str) else "", validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if not raw or (size is not None and len(raw) != size):
        raise IdentityError(f"identity key {path} is damaged (bad {name})")
    return raw


def _limits(record: dict[str, Any], path: Path) -> tuple[int, int]:
    ops, mem = record.get("opslimit"), record.get("memlimit")
    if not (isinstance(ops, int) and isinstance(mem, int)) or isinstance(ops, bool):
        raise IdentityError(f"identity key {path} is damaged (bad KDF limits)")
    if not argon2id.OPSLIMIT_MIN <= ops <= OPSLIMIT_CEILING:
        raise IdentityError(f"identity key {path} has an unacceptable KDF opslimit {ops}")
    if not argon2id.MEMLIMIT_MIN <= mem <= MEMLIMIT_CEILING:
        raise IdentityError(f"identity key {path} has an unacceptable KDF memlimit {mem}")
    return ops, mem


def load(path: Path, passphrase: bytes) -> Identity:
    """Open the identity sealed in `path`; IdentityError with a clear reason on any failure."""
    record = _read_record(path)
    opslimit, memlimit = _limits(record, path)
    salt = _field(record, "salt", path, argon2id.SALTBYTES)
    sealed = _field(record, "sealed_seed", path)
    public_key = _field(record, "public_key", path, 32)
    user = record.get("user")
    if user is not None and not isinstance(user, str):
        raise IdentityError(f"identity key {path} is damaged (bad user)")
    try:
        key = _derive(passphrase, salt, opslimit, memlimit)
        seed = nacl.secret.SecretBox(key).decrypt(sealed)
    except nacl.exceptions.CryptoError:
        raise IdentityError(f"wrong passphrase for identity key {path}") from None
    if len(seed) != 32:
        raise IdentityError(f"identity key {path} is damaged (bad seed)")
    signing_key = nacl.signing.SigningKey(seed)
    if not hmac.compare_digest(bytes(signing_key.verify_key), public_key):
        raise IdentityError(f"identity key {path} is damaged (public key does not match)")
    return Identity(path, signing_key, user)


def load_or_create(
    path: Path,
    passphrase_source: Callable[[bool], bytes],
    *,
    kdf: tuple[int, int] = KDF_MODERATE,
) -> tuple[Identity, bool]:
    """Load `path`, or create it on first use; returns (identity, created).

    passphrase_source(new) is asked with new=True when the key does not exist yet, so a prompt
    can ask twice.
    """
    if path.exists():
        return load(path, passphrase_source(False)), False
    return create(path, passphrase_source(True), kdf=kdf), True


def remember_user(ident: Identity, user: str) -> Identity:
    """Record the user name in the key file (the seed stays sealed as it is)."""
    if ident.path is None:
        return replace(ident, user=user)
    record = _read_record(ident.path)
    record["user"] = user
    try:
        write_atomically(ident.path, json.dumps(record, indent=1).encode() + b"\n")
    except OSError as exc:
        raise IdentityError(f"cannot update {ident.path}: {exc.strerror or exc}") from None
    return replace(ident, user=user)


def peek_user(path: Path) -> str | None:
    """The user name remembered in a key file, without the passphrase (None if none)."""
    if not path.exists():
        return None
    user = _read_record(path).get("user")
    return user if isinstance(user, str) else None
