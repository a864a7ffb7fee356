"""The command line asks for an identity key's passphrase (identity.py never prompts)."""

from __future__ import annotations

from pathlib import Path

import pytest

from securechat.errors import IdentityError
from securechat.terminal import passphrase


def test_passphrase_comes_from_the_environment(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SECURECHAT_PASSPHRASE", "from env")
    assert passphrase.from_env_or_prompt(tmp_path / "k", new=True) == b"from env"


def test_no_terminal_and_no_environment_is_a_clear_error(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SECURECHAT_PASSPHRASE", raising=False)
    monkeypatch.setattr(passphrase, "_have_terminal", lambda: False)
    with pytest.raises(IdentityError) as info:
        passphrase.from_env_or_prompt(tmp_path / "k", new=False)
    assert str(info.value) == (
        f"no terminal to ask for the passphrase of {tmp_path / 'k'}; set SECURECHAT_PASSPHRASE"
    )


def test_mismatched_new_passphrases_are_refused(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SECURECHAT_PASSPHRASE", raising=False)
    monkeypatch.setattr(passphrase, "_have_terminal", lambda: True)
    answers = iter(["one", "two"])
    monkeypatch.setattr(passphrase.getpass, "getpass", lambda prompt: next(answers))
    with pytest.raises(IdentityError, match="the two passphrases differ"):
        passphrase.from_env_or_prompt(tmp_path / "k", new=True)
