"""What the window shows, without Tk: conversations, unread counts, members and key trust.

The bridge feeds it Client events and the results of background work on the Tk thread; the
window draws from it. Keeping it free of Tk lets tests check every rule without a display.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

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
    ServerError,
)
from securechat.client.text import clean, clean_line, stamp
from securechat.protocol import LOBBY, valid_room
from securechat.terminal import hints

# Which line kinds may stand in which conversations: a room line never in a DM conversation, a
# DM line (a sealed message that opened and passed every check) never in a room.
ROOM_KINDS = frozenset({"message", "action", "own", "history"})
DM_KINDS = frozenset({"dm", "own_dm"})


@dataclass(frozen=True)
class Line:
    """One line of a conversation. `kind`: message, action, own, history (room lines), dm,
    own_dm (sealed DMs received and sent), system, warning."""

    kind: str
    text: str
    sender: str = ""
    ts: int = 0
    mention: bool = False

    @property
    def clock(self) -> str:
        return stamp(self.ts) if self.ts else ""


@dataclass
class Trust:
    """A DM peer's key as the client sees it."""

    state: str  # new, pinned, verified, changed
    fingerprint: str
    warning: str = ""  # for a changed key: both fingerprints and what to do


@dataclass
class Conversation:
    name: str  # "#room" or "@peer"
    lines: list[Line] = field(default_factory=list)
    unread: int = 0
    members: set[str] = field(default_factory=set)
    trust: Trust | None = None  # DMs only

    @property
    def is_dm(self) -> bool:
        return self.name.startswith("@")

    @property
    def peer(self) -> str:
        return self.name[1:] if self.is_dm else ""

    @property
    def label(self) -> str:
        mark = ""
        if self.trust is not None and self.trust.state == "changed":
            mark = " (!)"
        elif self.trust is not None and self.trust.state == "verified":
            mark = " \u2713"
        return f"{self.name}{mark}" + (f" ({self.unread})" if self.unread else "")

    @property
    def blocked(self) -> bool:
        """Sending is stopped until the user checks and accepts the new key."""
        return self.trust is not None and self.trust.state == "changed"


class ChatModel:
    MAX_LINES = 5000  # per conversation; older lines scroll away

    def __init__(self, user: str) -> None:
        self.user = user
        self.conversations: dict[str, Conversation] = {}
        self.current = self.open(LOBBY).name
        self.status = ""
        self.connected = True
        self.emoji: dict[str, EmojiVerification] = {}  # the last emoji comparison step, by peer
        self._mention = re.compile(rf"(?<!\w){re.escape(user)}(?!\w)", re.IGNORECASE)

    # -- conversations ----------------------------------------------------------------------------

    def open(self, name: str) -> Conversation:
        conv = self.conversations.get(name)
        if conv is None:
            conv = self.conversations[name] = Conversation(name)
        return conv

    def select(self, name: str) -> Conversation:
        conv = self.open(name)
        self.current = name
        conv.unread = 0
        return conv

    def close(self, name: str) -> None:
        self.conversations.pop(name, None)
        if self.current == name:
            rest = [c.name for c in self.ordered()]
            self.current = rest[0] if rest else self.open(LOBBY).name  # never nothing to show

    def ordered(self) -> list[Conversation]:
        """Rooms first, then DMs, each by name."""
        return sorted(self.conversations.values(), key=lambda c: (c.is_dm, c.name))

    def add(self, name: str, line: Line) -> None:
        if line.kind in (DM_KINDS if not name.startswith("@") else ROOM_KINDS):
            raise ValueError(f"a {line.kind} line does not belong in {name}")
        conv = self.open(name)
        conv.lines.append(line)
        del conv.lines[: -self.MAX_LINES]
        if name != self.current and line.kind not in ("system", "own", "own_dm"):
            conv.unread += 1

    def note(self, text: str, name: str | None = None, kind: str = "system") -> None:
        """A line of our own (a command's answer, an error) in a conversation."""
        self.add(name or self.current, Line(kind, clean(text)))

    # -- events -----------------------------------------------------------------------------------

    # One flat branch per event type, each a few lines: a table of methods would read worse.
    def on_event(self, event: Event) -> None:  # noqa: C901, PLR0912, PLR0915
        if isinstance(event, Message | Joined | Parted) and valid_room(event.room):
            # The Client drops such frames already; a room line must never open a DM pane.
            self.note(f"a room event for {event.room[:40]!r} was dropped", kind="warning")
        elif isinstance(event, Message):
            if event.history:
                kind = "history"
            elif event.sender == self.user:
                kind = "own"
            else:
                kind = "action" if event.action else "message"
            mention = event.sender != self.user and bool(self._mention.search(event.text))
            sender = clean_line(event.sender)
            self.add(event.room, Line(kind, clean(event.text), sender, event.ts, mention))
        elif isinstance(event, DirectMessage):
            peer = event.sender if event.sender != self.user else event.recipient
            conv = self.open(f"@{peer}")
            if conv.trust is None or conv.trust.state != event.key_state:
                old = conv.trust
                conv.trust = Trust(event.key_state, old.fingerprint if old else "")
            kind = "own_dm" if event.sender == self.user else "dm"
            self.add(conv.name, Line(kind, clean(event.text), event.sender, event.ts))
            if event.notice:
                self.add(conv.name, Line("warning", clean(event.notice)))
        elif isinstance(event, DMRejected):
            name = f"@{event.sender}"
            detail = hints.rejected_detail(event)
            self.add(name, Line("warning", clean(f"a direct message was refused: {detail}")))
            if event.kind == "key_changed":
                conv = self.open(name)
                fingerprint = conv.trust.fingerprint if conv.trust else ""
                conv.trust = Trust("changed", fingerprint, clean(detail))
        elif isinstance(event, Joined):
            conv = self.open(event.room)
            conv.members.add(event.user)
            self.add(event.room, Line("system", f"{clean_line(event.user)} joined", ts=event.ts))
        elif isinstance(event, Parted):
            if event.room not in self.conversations:
                return
            conv = self.conversations[event.room]
            conv.members.discard(event.user)
            why = "" if event.reason == "left" else f" ({clean_line(event.reason)})"
            self.add(event.room, Line("system", f"{clean_line(event.user)} left{why}", ts=event.ts))
            if event.user == self.user:
                conv.members.clear()
        elif isinstance(event, EmojiVerification):
            self._emoji_step(event)
        elif isinstance(event, FrameDropped | DeviceWarning):
            self.note(event.detail, kind="warning")
        elif isinstance(event, ServerError):
            self.note(f"server: {event.message} ({event.code})", kind="warning")
        elif isinstance(event, Closed):
            self.connected = False
            self.status = f"disconnected: {clean_line(event.reason)}"
            self.note(f"disconnected: {event.reason}", kind="warning")

    def _emoji_step(self, event: EmojiVerification) -> None:
        """A step of an emoji comparison: a line in the peer's conversation (the dialog shows
        the buttons); a match marks the conversation's key verified."""
        name = f"@{event.user}"
        self.emoji[event.user] = event
        quiet = event.stage in ("started", "waiting", "verified")
        text = event.detail
        if event.stage == "compare":
            text = f"compare with {event.user}: {event.emoji} (or {event.decimals})"
        self.add(name, Line("system" if quiet else "warning", clean(text)))
        if event.stage == "verified":
            self.open(name).trust = Trust("verified", event.fingerprint)

    def set_members(self, room: str, members: list[str]) -> None:
        self.open(room).members = set(members)

    def set_trust(self, peer: str, trust: Trust) -> None:
        self.open(f"@{peer}").trust = trust
