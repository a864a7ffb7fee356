"""What the window shows, without Tk: conversations, unread counts, members and key trust, and
each room's mode (a lock, or "not end-to-end encrypted") with its members' trust marks.

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
    RoomMember,
    RoomState,
    RoomUnreadable,
    RoomWarning,
    ServerError,
)
from securechat.client.text import clean, clean_line, stamp
from securechat.protocol import LOBBY, valid_room
from securechat.terminal import commands, hints
from securechat.terminal.hints import LOCK, member_mark, mode_label

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
    late: bool = False  # an encrypted room message whose key came after it

    @property
    def clock(self) -> str:
        return stamp(self.ts) if self.ts else ""


@dataclass
class Trust:
    """A DM peer's key as the client sees it."""

    state: str  # new, pinned, verified, changed
    fingerprint: str
    warning: str = ""  # for a changed key: both fingerprints and what to do


@dataclass(frozen=True)
class MemberRow:
    """One row of the member list: `text` as shown, `kind` for its colour (verified, pinned,
    new, changed, ghost, or "" in a plain room)."""

    user: str
    text: str
    kind: str = ""


@dataclass
class Conversation:
    name: str  # "#room" or "@peer"
    lines: list[Line] = field(default_factory=list)
    unread: int = 0
    members: set[str] = field(default_factory=set)
    trust: Trust | None = None  # DMs only
    # Rooms only, as the client's RoomState says: "encrypted", "plain" or None (not known yet);
    # whether keys go to verified members only; each member's trust mark (and the ghosts).
    mode: str | None = None
    strict: bool = False
    marks: dict[str, RoomMember] = field(default_factory=dict)

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
        elif self.mode == "encrypted":
            mark = f" {LOCK}"
        elif self.mode == "plain":
            mark = " (not end-to-end encrypted)"
        return f"{self.name}{mark}" + (f" ({self.unread})" if self.unread else "")

    @property
    def where(self) -> str:
        """The conversation as the status line names it: a room with its mode, as the terminal's
        status bar does."""
        return self.name if self.is_dm else f"{self.name} ({mode_label(self.mode)})"

    @property
    def header(self) -> tuple[str, str]:
        """A room's header line and its kind (encrypted, plain, unknown): the mode, how keys
        are shared, and a warning while the server lists members this client never saw join."""
        if self.mode == "encrypted":
            sharing = "verified members only (strict)" if self.strict else "pinned members"
            ghosts = sorted(m.user for m in self.marks.values() if m.ghost)
            warn = ""
            if ghosts:
                names = ", ".join(clean_line(g) for g in ghosts)
                warn = f"; never seen joining, given no keys: {names}"
            return f"{self.name}: {mode_label(self.mode)}; keys go to {sharing}{warn}", "encrypted"
        if self.mode == "plain":
            return f"{self.name}: not end-to-end encrypted: the server can read it", "plain"
        return f"{self.name}: {mode_label(None)}", "unknown"

    def member_rows(self) -> list[MemberRow]:
        """The member list: in an encrypted room each member with their trust mark (verified,
        pinned, new, changed, or a ghost: listed by the server without a join we showed)."""
        ghosts = {m.user for m in self.marks.values() if m.ghost}
        rows = []
        for user in sorted(self.members | ghosts):
            mark = self.marks.get(user) if self.mode == "encrypted" else None
            if mark is None:
                rows.append(MemberRow(user, clean_line(user)))
            else:
                kind = "ghost" if mark.ghost else mark.mark
                rows.append(MemberRow(user, member_mark(mark), kind))
        return rows

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
        self.conversations[LOBBY].mode = "plain"  # by the protocol's rule, announced or not
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
            line = Line(kind, clean(event.text), sender, event.ts, mention, event.late)
            self.add(event.room, line)
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
        elif isinstance(event, RoomState | RoomUnreadable | RoomWarning):
            self._room_event(event)
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

    def _room_event(self, event: RoomState | RoomUnreadable | RoomWarning) -> None:
        """A room's mode and members, a marker in place of a message this device cannot read, or
        a refusal: each in its own room, as a system or warning line, never as chat text."""
        if valid_room(event.room):  # a key refused before its room was known, say
            if isinstance(event, RoomWarning):
                self.note(event.detail, kind="system" if event.kind == "keys" else "warning")
            return
        if isinstance(event, RoomState):
            conv = self.open(event.room)
            conv.mode, conv.strict = event.mode, event.strict
            conv.marks = {m.user: m for m in event.members}
        elif isinstance(event, RoomUnreadable):
            mark = "[history] " if event.history else ""
            self.add(event.room, Line("system", clean(f"{mark}{event.detail}")))
        else:
            kind = "system" if event.kind == "keys" else "warning"
            self.add(event.room, Line(kind, clean(event.detail)))

    def set_members(
        self, room: str, members: list[str], marked: list[RoomMember] | None = None
    ) -> None:
        """The server's member list of `room`; `marked`: the same with trust marks, for an
        encrypted room (a who reply as the client reads it)."""
        conv = self.open(room)
        conv.members = set(members)
        if marked:
            conv.marks = {m.user: m for m in marked}

    def set_trust(self, peer: str, trust: Trust) -> None:
        self.open(f"@{peer}").trust = trust


def create_command(name: str, plain: bool) -> str:
    """The /create line the "New room" dialog sends (end-to-end encrypted unless `plain`), the
    name written as /create takes it; raises CommandError for a name that is not a room's."""
    words = name.split()
    if len(words) != 1:
        raise commands.CommandError("a room name is one word, like #team")
    parsed = commands.parse(f"/create {words[0]}")
    assert isinstance(parsed, commands.Command)  # a /create line with one argument parses
    room = parsed.args[0]
    why = valid_room(room)
    if why:
        raise commands.CommandError(f"{room[:40]}: a room name {why}")
    return f"/create {room}" + (" --plain" if plain else "")
