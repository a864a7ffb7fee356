"""Identity key files: sealing at rest, permissions, damage, and the fingerprint command."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nacl.pwhash
import nacl.signing
import pytest

from securechat import identity
from securechat.errors import IdentityError

from .conftest import REPO

PW = b"open sesame"
FAST = identity.KDF_FAST_FOR_TESTS


def make(tmp_path: Path, **kwargs) -> identity.Identity:
    return identity.create(tmp_path / "keys" / "alice.key", PW, kdf=FAST, **kwargs)


def test_round_trip_gives_the_same_key_and_signatures_verify(tmp_path: Path) -> None:
    made = make(tmp_path)
    loaded = identity.load(made.path, PW)
    assert loaded.verify_key_bytes == made.verify_key_bytes
    signature = loaded.sign(b"hello")
    nacl.signing.VerifyKey(made.verify_key_bytes).verify(b"hello", signature)


def test_key_file_is_private_and_parent_folders_are_made(tmp_path: Path) -> None:
    made = make(tmp_path)
    assert made.path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "keys").stat().st_mode & 0o777 == 0o700


def test_file_holds_neither_seed_nor_passphrase(tmp_path: Path) -> None:
    made = make(tmp_path)
    raw = made.path.read_bytes()
    seed = bytes(made.signing_key)
    assert seed not in raw and seed.hex().encode() not in raw
    assert PW not in raw
    record = json.loads(raw)
    assert (record["opslimit"], record["memlimit"]) == FAST
    assert sorted(record) == [
        "format",
        "kdf",
        "memlimit",
        "opslimit",
        "public_key",
        "salt",
        "sealed_seed",
        "user",
        "version",
    ]


def test_default_kdf_limits_are_moderate(tmp_path: Path) -> None:
    made = identity.create(tmp_path / "a.key", PW)
    record = json.loads(made.path.read_bytes())
    assert (record["opslimit"], record["memlimit"]) == (
        nacl.pwhash.argon2id.OPSLIMIT_MODERATE,
        nacl.pwhash.argon2id.MEMLIMIT_MODERATE,
    )


def test_wrong_passphrase_is_a_clear_error(tmp_path: Path) -> None:
    made = make(tmp_path)
    with pytest.raises(IdentityError) as info:
        identity.load(made.path, b"wrong")
    assert str(info.value) == f"wrong passphrase for identity key {made.path}"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_key_readable_by_others_is_refused_like_openssh(tmp_path: Path, mode: int) -> None:
    made = make(tmp_path)
    os.chmod(made.path, mode)
    with pytest.raises(IdentityError) as info:
        identity.load(made.path, PW)
    assert str(info.value) == (
        f"permissions {mode:04o} for '{made.path}' are too open; the key must be readable by "
        f"you only (chmod 600 {made.path})"
    )


def test_missing_key_file(tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match="does not exist"):
        identity.load(tmp_path / "nope.key", PW)


def rewrite(path: Path, **changes) -> None:
    record = json.loads(path.read_bytes())
    record.update(changes)
    path.write_text(json.dumps(record))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sealed_seed": "AAAA"}, "wrong passphrase"),  # cannot tell damage from a wrong key
        ({"public_key": "A" * 43 + "="}, "is damaged (public key does not match)"),
        ({"salt": "!!"}, "is damaged (bad salt)"),
        ({"memlimit": 2**40}, "unacceptable KDF memlimit"),
        ({"opslimit": 0}, "unacceptable KDF opslimit"),
        ({"version": 99}, "format this securechat cannot read"),
        ({"format": "ssh"}, "is not a securechat identity key"),
    ],
)
def test_damaged_or_hostile_files_are_refused(tmp_path: Path, change, message) -> None:
    made = make(tmp_path)
    rewrite(made.path, **change)
    with pytest.raises(IdentityError, match=re.escape(message)):
        identity.load(made.path, PW)


def test_not_json_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    path.write_bytes(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    path.chmod(0o600)
    with pytest.raises(IdentityError, match="not a securechat identity key"):
        identity.load(path, PW)


def test_create_refuses_to_overwrite(tmp_path: Path) -> None:
    made = make(tmp_path)
    with pytest.raises(IdentityError, match="already exists"):
        identity.create(made.path, PW, kdf=FAST)


def test_load_or_create_creates_once_then_loads(tmp_path: Path) -> None:
    asked: list[bool] = []

    def source(new: bool) -> bytes:
        asked.append(new)
        return PW

    path = tmp_path / "k.key"
    first, created = identity.load_or_create(path, source, kdf=FAST)
    second, created_again = identity.load_or_create(path, source, kdf=FAST)
    assert (created, created_again) == (True, False)
    assert asked == [True, False]
    assert first.verify_key_bytes == second.verify_key_bytes


def test_remember_and_peek_user(tmp_path: Path) -> None:
    made = make(tmp_path)
    assert identity.peek_user(made.path) is None
    updated = identity.remember_user(made, "alice")
    assert updated.user == "alice"
    assert identity.peek_user(made.path) == "alice"
    assert identity.load(made.path, PW).user == "alice"
    assert made.path.stat().st_mode & 0o777 == 0o600


def test_fingerprint_format_and_value() -> None:
    key = bytes(nacl.signing.SigningKey(b"\x07" * 32).verify_key)
    digest = hashlib.sha256(key).hexdigest()
    fp = identity.fingerprint(key)
    assert re.fullmatch(r"([0-9a-f]{4} ){15}[0-9a-f]{4}", fp)
    assert fp.replace(" ", "") == digest


def test_repr_shows_no_secret(tmp_path: Path) -> None:
    made = make(tmp_path)
    text = repr(made)
    assert bytes(made.signing_key).hex() not in text
    assert made.fingerprint in text


def run_cli(*args: str, passphrase: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SECURECHAT_PASSPHRASE": passphrase, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "securechat", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_fingerprint_command(tmp_path: Path) -> None:
    made = make(tmp_path)
    ok = run_cli("fingerprint", "--key", str(made.path), passphrase=PW.decode())
    assert (ok.returncode, ok.stdout) == (0, made.fingerprint + "\n")
    bad = run_cli("fingerprint", "--key", str(made.path), passphrase="nope")
    assert bad.returncode == 1
    assert bad.stderr == f"securechat: error: wrong passphrase for identity key {made.path}\n"
