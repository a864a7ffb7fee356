"""Warnings that tell the user which command to type: the library's errors and checks carry the
data, and these words name the terminal's slash commands (which the GUI accepts too).
"""

from __future__ import annotations

from securechat.client.events import DMRejected
from securechat.trust import KeyCheck


def key_changed(check: KeyCheck) -> str:
    """The changed-key warning, saying which commands check and accept the new key."""
    name = check.name
    return check.warning(
        f"compare safety numbers with them outside this chat (/verify {name}) and accept the "
        f"new key by naming it (/trust {name} {check.new_key_start})"
    )


def rejected_detail(event: DMRejected) -> str:
    """Why a DM was refused; for a changed key, with the commands that check and accept it."""
    return key_changed(event.check) if event.check is not None else event.detail
