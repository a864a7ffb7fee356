"""Identity key files: sealing at rest, permissions, damage, and the fingerprint command."""

from __future__ import annotations

import base64
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
MODERATE = identity.KDF_MODERATE


def make(tmp_path: Path, **kwargs) -> identity.Identity:
    return identity.create(tmp_path / "keys" / "alice.key", PW, kdf=FAST, **kwargs)


def load(path: Path, passphrase: bytes = PW) -> identity.Identity:
    """Load a key made with the light test limits (load refuses them unless told)."""
    return identity.load(path, passphrase, min_kdf=FAST)


def test_round_trip_gives_the_same_key_and_signatures_verify(tmp_path: Path) -> None:
    made = make(tmp_path)
    loaded = load(made.path, PW)
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
        "signature",
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
        load(made.path, b"wrong")
    assert str(info.value) == f"wrong passphrase for identity key {made.path}"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_key_readable_by_others_is_refused_like_openssh(tmp_path: Path, mode: int) -> None:
    made = make(tmp_path)
    os.chmod(made.path, mode)
    with pytest.raises(IdentityError) as info:
        load(made.path, PW)
    assert str(info.value) == (
        f"permissions {mode:04o} for '{made.path}' are too open; the key must be readable by "
        f"you only (chmod 600 {made.path})"
    )


def test_missing_key_file(tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match="does not exist"):
        load(tmp_path / "nope.key", PW)


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
        load(made.path, PW)


def test_not_json_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    path.write_bytes(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    path.chmod(0o600)
    with pytest.raises(IdentityError, match="not a securechat identity key"):
        load(path, PW)


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
    assert load(made.path, PW).user == "alice"
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
    made = identity.create(tmp_path / "alice.key", PW)
    ok = run_cli("fingerprint", "--key", str(made.path), passphrase=PW.decode())
    assert (ok.returncode, ok.stdout) == (0, made.fingerprint + "\n")
    bad = run_cli("fingerprint", "--key", str(made.path), passphrase="nope")
    assert bad.returncode == 1
    assert bad.stderr == f"securechat: error: wrong passphrase for identity key {made.path}\n"


def test_the_cli_refuses_a_key_with_weak_kdf_limits(tmp_path: Path) -> None:
    weak = make(tmp_path)
    out = run_cli("fingerprint", "--key", str(weak.path), passphrase=PW.decode())
    assert (out.returncode, out.stdout) == (1, "")
    assert out.stderr == (
        f"securechat: error: identity key {weak.path} has Argon2id limits below the minimum "
        f"(opslimit 1, memlimit 8192; at least 3 and 268435456); refusing to use it\n"
    )


# -- hostile key files: what SECURITY.md promises about the file at rest --------------------------


@pytest.mark.parametrize(
    "change",
    [
        {"opslimit": nacl.pwhash.argon2id.OPSLIMIT_MODERATE - 1},
        {"memlimit": nacl.pwhash.argon2id.MEMLIMIT_MODERATE // 2},
    ],
)
def test_kdf_limits_lowered_below_the_promise_are_refused(tmp_path: Path, change) -> None:
    made = identity.create(tmp_path / "alice.key", PW)
    rewrite(made.path, **change)
    ops = change.get("opslimit", MODERATE[0])
    mem = change.get("memlimit", MODERATE[1])
    with pytest.raises(IdentityError) as info:
        identity.load(made.path, PW)
    assert str(info.value) == (
        f"identity key {made.path} has Argon2id limits below the minimum (opslimit {ops}, "
        f"memlimit {mem}; at least 3 and 268435456); refusing to use it"
    )


def test_a_key_made_with_the_test_limits_is_refused_by_default(tmp_path: Path) -> None:
    made = make(tmp_path)
    with pytest.raises(IdentityError, match="has Argon2id limits below the minimum"):
        identity.load(made.path, PW)
    with pytest.raises(IdentityError, match="has Argon2id limits below the minimum"):
        identity.load_or_create(made.path, lambda _new: PW)


TAMPERED = (
    "was changed by something other than securechat (its signature does not match its user "
    "name and settings); refusing to use it"
)


@pytest.mark.parametrize(
    "change",
    [
        {"user": "mallory"},
        {"user": None},
        {"extra": "field"},
        {"opslimit": FAST[0] + 1},  # within the floor; still not what was signed
    ],
)
def test_a_changed_user_name_or_setting_is_detected(tmp_path: Path, change) -> None:
    made = make(tmp_path, user="alice")
    rewrite(made.path, **change)
    with pytest.raises(IdentityError) as info:
        load(made.path)
    if "opslimit" in change:  # the seed no longer opens: a different key comes out of Argon2id
        assert str(info.value) == f"wrong passphrase for identity key {made.path}"
    else:
        assert str(info.value) == f"identity key {made.path} {TAMPERED}"


def test_a_signature_that_is_missing_or_from_another_key_is_refused(tmp_path: Path) -> None:
    made = make(tmp_path, user="alice")
    record = json.loads(made.path.read_bytes())
    other = identity.create(tmp_path / "other.key", PW, user="alice", kdf=FAST)
    rewrite(made.path, signature=json.loads(other.path.read_bytes())["signature"])
    with pytest.raises(IdentityError, match=re.escape(TAMPERED)):
        load(made.path)
    del record["signature"]
    made.path.write_text(json.dumps(record))
    with pytest.raises(IdentityError, match=re.escape("is damaged (bad signature)")):
        load(made.path)


def as_version_1(path: Path) -> None:
    """Rewrite a key file as securechat wrote it before key files were signed."""
    record = json.loads(path.read_bytes())
    del record["signature"]
    record["version"] = 1
    path.write_text(json.dumps(record))


def test_a_version_1_file_loads_and_its_name_counts_only_once_confirmed(tmp_path: Path) -> None:
    made = make(tmp_path, user="alice")
    as_version_1(made.path)
    old = load(made.path)
    assert old.verify_key_bytes == made.verify_key_bytes
    # Nothing vouches for the name in it (a signed file stripped to version 1 looks the same).
    assert (old.user, identity.peek_user(made.path)) == (None, None)
    assert identity.legacy_user(made.path) == "alice"
    from securechat.client.chat_session import resolve_user
    from securechat.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        resolve_user(made.path, None)
    assert str(info.value) == (
        f"{made.path} comes from an older securechat and nothing vouches for the user name in "
        "it ('alice'); pass --user NAME once to confirm yours"
    )
    # The front ends call remember_user after the first login with --user: signed from then on.
    identity.remember_user(old, "alice")
    record = json.loads(made.path.read_bytes())
    assert (record["version"], len(base64.b64decode(record["signature"]))) == (2, 64)
    assert load(made.path).user == "alice"
    assert (identity.peek_user(made.path), identity.legacy_user(made.path)) == ("alice", None)
    rewrite(made.path, user="mallory")
    with pytest.raises(IdentityError, match=re.escape(TAMPERED)):
        load(made.path)


def test_a_version_1_file_with_weak_limits_is_refused_too(tmp_path: Path) -> None:
    made = make(tmp_path)
    as_version_1(made.path)
    with pytest.raises(IdentityError, match="has Argon2id limits below the minimum"):
        identity.load(made.path, PW)


def test_a_symlink_to_a_key_file_is_refused(tmp_path: Path) -> None:
    made = make(tmp_path, user="alice")
    link = tmp_path / "link.key"
    link.symlink_to(made.path)
    message = (
        f"identity key {link} is a symbolic link; refusing to follow it (give the path of the "
        "key file itself)"
    )
    for attempt in (
        lambda: load(link),
        lambda: identity.load_or_create(link, lambda _new: PW, kdf=FAST),
        lambda: identity.peek_user(link),
    ):
        with pytest.raises(IdentityError) as info:
            attempt()
        assert str(info.value) == message
    dangling = tmp_path / "dangling.key"
    dangling.symlink_to(tmp_path / "nowhere.key")
    with pytest.raises(IdentityError) as info:  # not created through the link either
        identity.load_or_create(dangling, lambda _new: PW, kdf=FAST)
    assert str(info.value) == message.replace(str(link), str(dangling))
    assert not (tmp_path / "nowhere.key").exists()


def test_a_key_file_that_is_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "folder.key"
    folder.mkdir(mode=0o700)
    with pytest.raises(IdentityError) as info:
        load(folder)
    assert str(info.value) == f"identity key {folder} is not a regular file"


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_a_key_file_owned_by_someone_else_is_refused(tmp_path: Path) -> None:
    made = make(tmp_path, user="alice")
    os.chown(made.path, 4321, -1)
    with pytest.raises(IdentityError) as info:
        load(made.path)
    assert str(info.value) == (
        f"identity key {made.path} belongs to user id 4321, not to you (user id 0); refusing "
        "to use it"
    )
