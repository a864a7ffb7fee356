"""Words the terminal and the GUI both show: warnings that tell the user which command to type
(the library's errors and checks carry the data, and these words name the terminal's slash
commands, which the GUI accepts too), and how a room's mode and its members' trust read.
"""

from __future__ import annotations

from securechat.client.events import DMRejected, RoomMember
from securechat.client.text import clean_line
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


LOCK = "\N{LOCK}"


def mode_label(mode: str | None) -> str:
    """A room's mode as /rooms and the status bar show it: a lock, or the plain words."""
    if mode == "encrypted":
        return f"{LOCK} end-to-end encrypted"
    if mode == "plain":
        return "not end-to-end encrypted"
    return "mode unknown"


def member_mark(member: RoomMember) -> str:
    """One member with their trust mark: verified, pinned, new or changed; a ghost or a member
    who gets no keys says so."""
    name = clean_line(member.user)
    if member.ghost:
        return f"{name} [ghost: never seen joining, gets no keys]"
    keys = "" if member.gets_keys else ", gets no keys"
    return f"{name} [{member.mark}{keys}]"
