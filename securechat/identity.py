"""Identity keys: one Ed25519 signing key per user, sealed at rest with a passphrase.

The key file holds the 32-byte seed inside a SecretBox whose key comes from Argon2id; the KDF
limits live in the file. The identity key signs the whole record, so the user name and limits
stored beside the sealed seed cannot be changed unnoticed. It never prompts: callers pass the
passphrase in (the front ends ask for it). Nothing here ever logs, prints or puts in an exception
a passphrase, a seed or a derived key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import nacl.encoding
import nacl.exceptions
import nacl.hash
import nacl.pwhash
import nacl.secret
import nacl.signing
import nacl.utils
from nacl.pwhash import argon2id

from securechat.canonical import canonical_json
from securechat.errors import IdentityError
from securechat.files import write_atomically

FORMAT = "securechat-identity"
# Version 1 had no signature: its user name is never used (see legacy_user); remember_user
# rewrites such a file as version 2.
VERSION = 2
READABLE_VERSIONS = (1, 2)
RECORD_CONTEXT = b"securechat identity key file v2\n"
KDF_MODERATE: tuple[int, int] = (argon2id.OPSLIMIT_MODERATE, argon2id.MEMLIMIT_MODERATE)
# Tests only: ask for it explicitly, never by default; load() refuses it unless told to accept it.
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

    def subkey(self, purpose: bytes) -> bytes:
        """A 32-byte key for local state, one per `purpose` (1 to 16 bytes).

        BLAKE2b keyed with the secret seed and personalised with the purpose: only the unlocked
        identity derives it, and keys for different purposes are independent.
        """
        if not 1 <= len(purpose) <= 16:
            raise ValueError("a key purpose is 1 to 16 bytes")
        return nacl.hash.blake2b(
            b"",
            digest_size=32,
            key=bytes(self.signing_key),
            person=purpose.ljust(16, b"\0"),
            encoder=nacl.encoding.RawEncoder,
        )

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
    if os.path.lexists(path):
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
    except OSError as exc:
        raise IdentityError(f"cannot write identity key {path}: {exc.strerror or exc}") from None
    _write_signed(path, record, signing_key, "write identity key")
    return Identity(path, signing_key, user)


def _signed_bytes(record: dict[str, Any]) -> bytes:
    """What the signature covers: every field but itself, in one canonical form."""
    fields = {name: value for name, value in record.items() if name != "signature"}
    return RECORD_CONTEXT + canonical_json(fields, ascii_only=True)


def _write_signed(
    path: Path, record: dict[str, Any], signing_key: nacl.signing.SigningKey, doing: str
) -> None:
    record = {**record, "version": VERSION}
    record.pop("signature", None)
    record["signature"] = _b64(signing_key.sign(_signed_bytes(record)).signature)
    try:
        write_atomically(path, json.dumps(record, indent=1).encode() + b"\n")
    except OSError as exc:
        raise IdentityError(f"cannot {doing} {path}: {exc.strerror or exc}") from None


def _read_private(path: Path) -> bytes:
    """The file's bytes, if it is a regular file of ours that nobody else can read."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        raise IdentityError(f"identity key {path} does not exist") from None
    except OSError as exc:
        raise IdentityError(f"cannot read identity key {path}: {exc.strerror or exc}") from None
    # Whoever can point the link elsewhere chooses which key we use: take only the file itself.
    if stat.S_ISLNK(st.st_mode):
        raise IdentityError(
            f"identity key {path} is a symbolic link; refusing to follow it (give the path of "
            "the key file itself)"
        )
    if not stat.S_ISREG(st.st_mode):
        raise IdentityError(f"identity key {path} is not a regular file")
    # O_NONBLOCK: a FIFO swapped in after the lstat must not hang the open.
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0)
    try:
        with os.fdopen(os.open(path, flags), "rb") as f:
            st = os.fstat(f.fileno())  # the file we read, whatever the path names by now
            _check_private(path, st)
            return f.read(64 * 1024)
    except OSError as exc:
        raise IdentityError(f"cannot read identity key {path}: {exc.strerror or exc}") from None


def _check_private(path: Path, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise IdentityError(f"identity key {path} is not a regular file")
    # As OpenSSH: a key someone else owns may be theirs to replace, and one others can read
    # may already be copied; refuse to use either.
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        raise IdentityError(
            f"identity key {path} belongs to user id {st.st_uid}, not to you (user id "
            f"{os.geteuid()}); refusing to use it"
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise IdentityError(
            f"permissions {mode:04o} for '{path}' are too open; the key must be readable by "
            f"you only (chmod 600 {path})"
        )


def _read_record(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(_read_private(path))
    except ValueError:
        raise IdentityError(f"{path} is not a securechat identity key (not JSON)") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise IdentityError(f"{path} is not a securechat identity key")
    version = record.get("version")
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise IdentityError(f"{path} has an identity key format this securechat cannot read")
    if record.get("kdf") != "argon2id":
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


def _limits(record: dict[str, Any], path: Path, least: tuple[int, int]) -> tuple[int, int]:
    ops, mem = record.get("opslimit"), record.get("memlimit")
    if not (isinstance(ops, int) and isinstance(mem, int)) or isinstance(ops, bool):
        raise IdentityError(f"identity key {path} is damaged (bad KDF limits)")
    if not argon2id.OPSLIMIT_MIN <= ops <= OPSLIMIT_CEILING:
        raise IdentityError(f"identity key {path} has an unacceptable KDF opslimit {ops}")
    if not argon2id.MEMLIMIT_MIN <= mem <= MEMLIMIT_CEILING:
        raise IdentityError(f"identity key {path} has an unacceptable KDF memlimit {mem}")
    # Weaker limits make a copied file cheaper to brute-force; whoever lowered them gets nothing.
    if ops < least[0] or mem < least[1]:
        raise IdentityError(
            f"identity key {path} has Argon2id limits below the minimum (opslimit {ops}, "
            f"memlimit {mem}; at least {least[0]} and {least[1]}); refusing to use it"
        )
    return ops, mem


def load(path: Path, passphrase: bytes, *, min_kdf: tuple[int, int] = KDF_MODERATE) -> Identity:
    """Open the identity sealed in `path`; IdentityError with a clear reason on any failure.

    A file whose Argon2id limits are below `min_kdf` is refused before any work is done. A
    version 1 file (no signature) loads without its user name: nothing vouches for it.
    """
    record = _read_record(path)
    opslimit, memlimit = _limits(record, path, min_kdf)
    salt = _field(record, "salt", path, argon2id.SALTBYTES)
    sealed = _field(record, "sealed_seed", path)
    public_key = _field(record, "public_key", path, 32)
    signature = _field(record, "signature", path, 64) if record["version"] >= 2 else None
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
    if signature is None:
        return Identity(path, signing_key, None)
    try:
        signing_key.verify_key.verify(_signed_bytes(record), signature)
    except nacl.exceptions.BadSignatureError:
        raise IdentityError(
            f"identity key {path} was changed by something other than securechat (its "
            "signature does not match its user name and settings); refusing to use it"
        ) from None
    return Identity(path, signing_key, user)


def load_or_create(
    path: Path,
    passphrase_source: Callable[[bool], bytes],
    *,
    kdf: tuple[int, int] = KDF_MODERATE,
) -> tuple[Identity, bool]:
    """Load `path`, or create it on first use; returns (identity, created).

    passphrase_source(new) is asked with new=True when the key does not exist yet, so a prompt
    can ask twice. `kdf` gives a new key its limits and is the least an existing one may have.
    """
    if os.path.lexists(path):
        return load(path, passphrase_source(False), min_kdf=kdf), False
    return create(path, passphrase_source(True), kdf=kdf), True


def remember_user(ident: Identity, user: str) -> Identity:
    """Record the user name in the key file, signed (the seed stays sealed as it is).

    A version 1 file is rewritten as version 2 on the way.
    """
    if ident.path is None:
        return replace(ident, user=user)
    record = _read_record(ident.path)
    if _field(record, "public_key", ident.path, 32) != ident.verify_key_bytes:
        raise IdentityError(f"identity key {ident.path} holds another key than the one in use")
    _write_signed(ident.path, {**record, "user": user}, ident.signing_key, "update")
    return replace(ident, user=user)


def peek_user(path: Path) -> str | None:
    """The user name remembered in a key file, without the passphrase (None if none).

    Unverified until load() checks the file's signature; a version 1 file gives None.
    """
    return _stored_user(path, VERSION)


def legacy_user(path: Path) -> str | None:
    """The unauthenticated user name of a version 1 key file, for a front end to suggest; None
    for any other file."""
    return _stored_user(path, 1)


def _stored_user(path: Path, version: int) -> str | None:
    if not path.exists():
        return None
    record = _read_record(path)
    user = record.get("user")
    return user if isinstance(user, str) and record["version"] == version else None
