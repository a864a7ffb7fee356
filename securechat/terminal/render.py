"""Events as text lines for a terminal, with everything from other people made harmless.

Names, message text and reasons come from other users or the server, so every one of them goes
through securechat.client.text (clean, clean_line) before it reaches a line: nobody can move your
cursor, clear your screen, retitle your terminal, or start a line that looks like one of ours.
"""

from __future__ import annotations

from datetime import datetime

from securechat.client.events import (
    Closed,
    DeviceWarning,
    DirectMessage,
    DMRejected,
    EmojiVerification,
    Event,
    FrameDropped,
    Joined,
    Message,
    Parted,
    RoomState,
    RoomUnreadable,
    RoomWarning,
    ServerError,
)
from securechat.client.history import Entry
from securechat.client.text import clean, clean_line, stamp
from securechat.terminal import hints, notices

# Shared with the GUI (they live in hints); the terminal's modules take them from here too.
from securechat.terminal.hints import LOCK as LOCK
from securechat.terminal.hints import member_mark as member_mark
from securechat.terminal.hints import mode_label as mode_label
from securechat.terminal.notices import Notice

CONTINUATION = "    | "


def _body(text: str) -> str:
    # Continuation lines are indented under a marker, so a message can never begin a line of
    # its own that looks like a status line.
    first, *more = clean(text).split("\n")
    return "\n".join([first, *(CONTINUATION + line for line in more)])


# How far a DM peer's key is trusted, shown on every DM line, in and out.
KEY_MARKS = {"verified": "[verified]", "pinned": "[pinned]", "new": "[first seen]"}


def key_mark(state: str) -> str:
    """The mark for a DM peer's key state ("new", "pinned" or "verified")."""
    return KEY_MARKS[state]


def first_sight(peer: str, key_fingerprint: str) -> Notice:
    """Said once, when a DM pins a peer's key: trust on first use is never silent."""
    return notices.info(
        f"{clean_line(peer)}'s key {key_fingerprint} was seen for the first time and pinned, "
        f"not verified; compare safety numbers with them: /verify {clean_line(peer)}"
    )


def notice_of(event: Event, current_room: str | None = None) -> Notice:
    """One event as a notice (its text may span lines only for a multi-line message)."""
    if isinstance(event, Message):
        where = "" if event.room == current_room else f"{clean_line(event.room)} "
        mark = "[history] " if event.history else "[late] " if event.late else ""
        sender = clean_line(event.sender)
        if event.action:
            return notices.line(f"[{stamp(event.ts)}] {mark}{where}* {sender} {_body(event.text)}")
        return notices.line(f"[{stamp(event.ts)}] {mark}{where}<{sender}> {_body(event.text)}")
    if isinstance(event, DirectMessage):
        mark = key_mark(event.key_state)
        sender = clean_line(event.sender)
        notice = f" [{clean_line(event.notice)}]" if event.notice else ""
        if event.own:
            to = clean_line(event.recipient)
            return notices.line(
                f"[{stamp(event.ts)}] -> *{to}* {_body(event.text)} (sent from your device "
                f"{clean_line(event.device)}){notice}"
            )
        return notices.line(f"[{stamp(event.ts)}] *{sender}* {mark} {_body(event.text)}{notice}")
    if isinstance(event, Joined):
        return notices.info(f"{clean_line(event.user)} joined {clean_line(event.room)}")
    if isinstance(event, Parted):
        reason = "" if event.reason == "left" else f" ({clean_line(event.reason)})"
        return notices.info(f"{clean_line(event.user)} left {clean_line(event.room)}{reason}")
    if isinstance(event, DMRejected | FrameDropped | DeviceWarning | ServerError):
        return _warning_of(event)
    if isinstance(event, EmojiVerification):
        return _emoji_notice(event)
    if isinstance(event, RoomState | RoomUnreadable | RoomWarning):
        return _room_notice(event)
    if isinstance(event, Closed):
        return notices.info(f"disconnected: {clean_line(event.reason)}")
    raise TypeError(f"no rendering for {event!r}")


def _room_notice(event: RoomState | RoomUnreadable | RoomWarning) -> Notice:
    if isinstance(event, RoomState):
        room = clean_line(event.room)
        if not event.encrypted:
            return notices.info(f"{room} is not end-to-end encrypted: the server can read it")
        strict = "; strict: keys go to verified members only" if event.strict else ""
        members = ", ".join(member_mark(m) for m in event.members)
        return notices.info(f"{room} is {LOCK} end-to-end encrypted{strict}; members: {members}")
    if isinstance(event, RoomUnreadable):
        mark = "[history] " if event.history else ""
        return notices.info(f"{mark}{clean_line(event.room)}: {clean_line(event.detail)}")
    # Each detail names its room.
    if event.kind == "keys":
        return notices.info(clean_line(event.detail))
    return notices.warning(clean_line(event.detail))


def _warning_of(event: DMRejected | FrameDropped | DeviceWarning | ServerError) -> Notice:
    if isinstance(event, DMRejected):
        return notices.warning(
            f"a direct message from {clean_line(event.sender)} was refused "
            f"({event.kind}): {_body(hints.rejected_detail(event))}"
        )
    if isinstance(event, ServerError):
        return notices.warning(f"server: {clean_line(event.message)} ({clean_line(event.code)})")
    return notices.warning(clean_line(event.detail))


def _emoji_notice(event: EmojiVerification) -> Notice:
    """A step of an emoji comparison, with the /verify words that answer it."""
    peer = clean_line(event.user)
    detail = clean_line(event.detail)
    if event.stage == "requested":
        return notices.warning(
            f"{detail}: /verify {peer} accept to start, /verify {peer} cancel to refuse"
        )
    if event.stage == "compare":
        return notices.warning(
            f"compare with {peer}: {clean_line(event.emoji)}\n{CONTINUATION}(or the numbers "
            f"{clean_line(event.decimals)}). Same on {peer}'s screen: /verify {peer} match; "
            f"different: /verify {peer} differ"
        )
    if event.stage == "cancelled":
        return notices.warning(detail)
    return notices.info(detail)


def render(event: Event, current_room: str | None = None) -> str:
    """One event as the terminal shows it."""
    return notices.as_text(notice_of(event, current_room))


def render_past(entry: Entry, me: str) -> str:
    """One entry of the local history, dated, with its conversation."""
    when = datetime.fromtimestamp(entry.ts / 1000).strftime("%Y-%m-%d %H:%M")
    where = clean_line(entry.conversation)
    sender = clean_line(entry.sender)
    if entry.conversation.startswith("@"):
        if entry.sender == me:
            return f"[{when}] -> *{where[1:]}* {_body(entry.text)}"
        return f"[{when}] *{sender}* {_body(entry.text)}"
    if entry.action:
        return f"[{when}] {where} * {sender} {_body(entry.text)}"
    return f"[{when}] {where} <{sender}> {_body(entry.text)}"


def one_line(text: str) -> str:
    """For line mode: every event on exactly one line (newlines and backslashes escaped)."""
    return text.replace("\\", "\\\\").replace("\n" + CONTINUATION, "\\n").replace("\n", "\\n")
