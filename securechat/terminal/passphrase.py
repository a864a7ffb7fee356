"""Asking for an identity key's passphrase on the command line: SECURECHAT_PASSPHRASE, else a
prompt on the terminal (twice for a new key).

identity.py never prompts; the command line (`securechat client`, `securechat fingerprint`)
asks here and hands it the passphrase. Nothing here prints or logs what was typed.
"""

from __future__ import annotations

import getpass
import hmac
import os
import sys
from collections.abc import Callable
from pathlib import Path

from securechat.errors import IdentityError

PASSPHRASE_ENV = "SECURECHAT_PASSPHRASE"  # noqa: S105 - a variable name, not a secret


def from_env_or_prompt(path: Path, *, new: bool) -> bytes:
    """SECURECHAT_PASSPHRASE if set, else a prompt on the terminal (twice for a new key)."""
    env = os.environ.get(PASSPHRASE_ENV)
    if env:
        return env.encode("utf-8")
    no_terminal = f"no terminal to ask for the passphrase of {path}; set {PASSPHRASE_ENV}"
    if not _have_terminal():
        raise IdentityError(no_terminal)
    try:
        first = getpass.getpass(
            f"New passphrase for {path}: " if new else f"Passphrase for {path}: "
        )
        if new:
            again = getpass.getpass("Repeat the passphrase: ")
            if not hmac.compare_digest(first.encode(), again.encode()):
                raise IdentityError("the two passphrases differ; nothing was created")
    except (EOFError, OSError):
        raise IdentityError(no_terminal) from None
    if not first:
        raise IdentityError("an empty passphrase is not allowed")
    return first.encode("utf-8")


def source(path: Path) -> Callable[[bool], bytes]:
    """For identity.load_or_create: asked with new=True when the key is about to be made."""
    return lambda new: from_env_or_prompt(path, new=new)


def _have_terminal() -> bool:
    # getpass falls back to reading stdin when there is no terminal, which in line mode would
    # swallow the first chat line as a passphrase; refuse instead.
    if os.name != "posix":
        return sys.stdin is not None and sys.stdin.isatty()
    try:
        with open("/dev/tty", "rb"):
            return True
    except OSError:
        return False
