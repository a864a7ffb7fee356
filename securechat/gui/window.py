"""The chat window: conversations on the left, the current one in the middle, members on the
right, key trust above every DM and the room's mode (with its strict switch) above every room,
and an input box below (Enter sends, Shift+Enter adds a line).

Typed text goes to the current room, or sealed to the peer of a DM conversation; slash commands
run through the same Controller as the terminal client. Every call that may wait on the server
runs on the bridge's background thread; this module only touches Tk.
"""

from __future__ import annotations

import threading
import tkinter as tk
from collections.abc import Callable
from functools import partial
from tkinter import ttk
from typing import Any

from securechat.client.api import Client
from securechat.client.chat_session import (
    ChatSession,
    ConnectionLost,
    GaveUp,
    Reconnected,
    Retrying,
    SessionEvent,
)
from securechat.client.events import (
    Closed,
    DirectMessage,
    DMRejected,
    EmojiVerification,
    Event,
    Joined,
    Parted,
    RoomMember,
    RoomState,
)
from securechat.client.text import clean
from securechat.errors import SecureChatError
from securechat.gui.bridge import Bridge
from securechat.gui.model import (
    DM_KINDS,
    ChatModel,
    Conversation,
    Line,
    MemberRow,
    Trust,
    create_command,
)
from securechat.identity import fingerprint
from securechat.protocol import LOBBY, valid_name
from securechat.terminal import commands, hints
from securechat.terminal.controller import Controller
from securechat.terminal.notices import Notice, NoticeKind
from securechat.trust import KeyCheck, KeyNotNamed, KeyState, PinnedKey, Verification

COLOURS = {
    "new": "#1f5fa8",
    "pinned": "#1f5fa8",
    "verified": "#1d7a33",
    "changed": "#b00020",
    "ghost": "#b00020",
    "encrypted": "#1d7a33",
    "plain": "#a35200",
    "unknown": "#555555",
}


def trust_of(check: KeyCheck) -> Trust:
    warning = hints.key_changed(check) if check.state is KeyState.CHANGED else ""
    return Trust(check.state.value, check.fingerprint, warning)


# How the conversation view draws each kind of text.
_TEXT_TAGS: dict[str, dict[str, Any]] = {
    "time": {"foreground": "#777777"},
    "sender": {"font": ("TkDefaultFont", 10, "bold")},
    "own": {"foreground": "#1f5fa8"},
    "system": {"foreground": "#666666"},
    "warning": {"foreground": "#b00020"},
    "history": {"foreground": "#8a8a8a"},
    "mention": {"background": "#fff2a8"},
}


def _picked(listbox: tk.Listbox) -> int | None:
    """The index of the selected row of a single-choice list, or None."""
    # typeshed leaves Listbox.curselection unannotated; Tk returns a tuple of indexes.
    chosen: tuple[int, ...] = listbox.curselection()  # type: ignore[no-untyped-call]
    return chosen[0] if chosen else None


class ChatWindow:
    def __init__(
        self,
        root: tk.Tk,
        bridge: Bridge,
        session: ChatSession,
        where: str,
        on_closed: Callable[[], None] | None = None,
    ) -> None:
        self.root, self.bridge, self.session = root, bridge, session
        self.where, self._on_closed = where, on_closed
        client = session.client
        self.model = ChatModel(client.user)
        # The controller belongs to the bridge's background thread: every call to it goes
        # through bridge.run.
        self.controller = Controller(session, self._command_output)
        self._shown: tuple[str, int] = ("", 0)  # conversation drawn, and how many of its lines
        self._closing = False
        self.verify_dialog: VerifyDialog | None = None
        self.emoji_dialogs: dict[str, EmojiDialog] = {}  # by peer
        self._build()
        bridge.on_drained(self.redraw)
        threading.Thread(target=self._pump_events, name="gui-events", daemon=True).start()
        self.new_room_dialog: NewRoomDialog | None = None
        self._joining: str | None = None  # a room joined by a command, not shown joined yet
        self.refresh_members(LOBBY)
        self.redraw()

    @property
    def client(self) -> Client:
        """The current connection (the session's: a new one after each reconnect)."""
        return self.session.client

    # -- layout -----------------------------------------------------------------------------------

    def _build(self) -> None:
        root = self.root
        root.geometry("960x600")
        root.protocol("WM_DELETE_WINDOW", self.close)
        outer = ttk.Frame(root, padding=4)
        outer.pack(fill="both", expand=True)
        panes = ttk.PanedWindow(outer, orient="horizontal")
        panes.pack(fill="both", expand=True)
        panes.add(self._build_conversations(panes), weight=0)
        panes.add(self._build_chat(panes), weight=1)
        panes.add(self._build_members(panes), weight=0)

        self.status = ttk.Label(root, anchor="w", padding=(6, 2))
        self.status.pack(fill="x", side="bottom")

        # Typing goes to the input box. Tk only records the focus of a widget that is mapped: a
        # focus_set on an unmapped one waits for it to become visible, and keys that arrive
        # before then go to the bare toplevel and are lost. So lay the window out (which maps
        # the widgets) first. The title comes last: a window titled for its user is ready to
        # type into.
        root.update_idletasks()
        self.input.focus_set()
        root.title(f"securechat: {self.client.user} @ {self.where}")

    def _build_conversations(self, panes: ttk.PanedWindow) -> ttk.Frame:
        """The left pane: the list of conversations and the box to start a DM."""
        left = ttk.Frame(panes, width=240)
        ttk.Label(left, text="Conversations").pack(anchor="w")
        self.sidebar = tk.Listbox(left, activestyle="none", exportselection=False, width=30)
        self.sidebar.pack(fill="both", expand=True)
        self.sidebar.bind("<<ListboxSelect>>", self._on_pick)
        ttk.Button(left, text="New room\u2026", command=self.open_new_room).pack(
            fill="x", pady=(4, 0)
        )
        new_dm = ttk.Frame(left)
        new_dm.pack(fill="x", pady=(4, 0))
        self.dm_entry = ttk.Entry(new_dm, width=12)
        self.dm_entry.pack(side="left", fill="x", expand=True)
        self.dm_entry.bind("<Return>", lambda _e: self._open_dm_from_entry())
        ttk.Button(new_dm, text="DM", width=4, command=self._open_dm_from_entry).pack(side="left")
        return left

    def _build_chat(self, panes: ttk.PanedWindow) -> ttk.Frame:
        """The middle pane: the banner (a DM's key trust, a room's mode), the conversation and
        the input box."""
        middle = ttk.Frame(panes)
        self.banner = tk.Frame(middle)
        # The buttons are packed before the text so that they keep their full width; the text
        # wraps to whatever width is left.
        self.verify_button = ttk.Button(self.banner, text="Verify\u2026", command=self.open_verify)
        self.strict = tk.BooleanVar(self.banner, value=False)
        self.strict_button = ttk.Checkbutton(
            self.banner,
            text="Strict: keys to verified members only",
            variable=self.strict,
            command=self._on_strict,
        )
        self.banner_text = tk.Label(self.banner, anchor="w", justify="left", wraplength=560)
        self.banner_text.pack(side="left", fill="x", expand=True, padx=4, pady=2)
        self.banner_text.bind(
            "<Configure>", lambda e: self.banner_text.configure(wraplength=max(e.width - 8, 100))
        )
        view_frame = ttk.Frame(middle)
        view_frame.pack(fill="both", expand=True, side="top")
        self.view = tk.Text(view_frame, wrap="word", state="disabled", height=20)
        scroll = ttk.Scrollbar(view_frame, command=self.view.yview)
        self.view.configure(yscrollcommand=scroll.set)
        scroll.pack(side="right", fill="y")
        self.view.pack(side="left", fill="both", expand=True)
        for tag, options in _TEXT_TAGS.items():
            self.view.tag_configure(tag, **options)
        self.input = tk.Text(middle, height=3, wrap="word", undo=True)
        self.input.pack(fill="x", side="bottom", pady=(4, 0))
        self.input.bind("<Return>", self._on_enter)
        self.input.bind("<Shift-Return>", self._on_shift_enter)
        return middle

    def _build_members(self, panes: ttk.PanedWindow) -> ttk.Frame:
        """The right pane: who is in the room."""
        right = ttk.Frame(panes, width=150)
        self.members_label = ttk.Label(right, text="Members")
        self.members_label.pack(anchor="w")
        self.members = tk.Listbox(right, activestyle="none", exportselection=False)
        self.members.pack(fill="both", expand=True)
        self.members.bind("<Double-Button-1>", self._on_member)
        self._member_users: list[str] = []  # the user of each row
        return right

    # -- drawing ----------------------------------------------------------------------------------

    def redraw(self) -> None:
        model = self.model
        convs = model.ordered()
        labels = [c.label for c in convs]
        if list(self.sidebar.get(0, "end")) != labels:
            self.sidebar.delete(0, "end")
            for label in labels:
                self.sidebar.insert("end", label)
        names = [c.name for c in convs]
        if model.current in names:
            index = names.index(model.current)
            self.sidebar.selection_clear(0, "end")
            self.sidebar.selection_set(index)
        conv = model.conversations[model.current]
        self._draw_lines(conv.name, conv.lines)
        self._draw_members(conv.member_rows() if not conv.is_dm else [])
        self._draw_banner()
        state = "connected" if model.connected else model.status
        self.status.configure(
            text=f"{self.client.user} @ {self.where} \u00b7 {conv.where} \u00b7 {state}"
        )

    def _draw_lines(self, name: str, lines: list[Line]) -> None:
        shown_name, shown = self._shown
        view = self.view
        view.configure(state="normal")
        if shown_name != name or shown > len(lines):
            view.delete("1.0", "end")
            shown = 0
        for line in lines[shown:]:
            self._insert(line)
        self._shown = (name, len(lines))
        view.configure(state="disabled")
        view.see("end")

    def _insert(self, line: Line) -> None:
        view = self.view
        if line.clock:
            view.insert("end", f"[{line.clock}] ", "time")
        if line.kind in ("system", "warning"):
            view.insert(
                "end", f"{'-- ' if line.kind == 'system' else '!! '}{line.text}\n", line.kind
            )
            return
        if line.kind in DM_KINDS:
            # Drawn as the terminal draws a DM (*name*), never as a room line (<name>).
            sender_tags = ("sender", "own") if line.kind == "own_dm" else ("sender",)
            view.insert("end", f"*{line.sender}* ", sender_tags)
            view.insert("end", line.text.replace("\n", "\n    ") + "\n")
            return
        extra = ("mention",) if line.mention else ()
        body_tags = ("history",) if line.kind == "history" else extra
        if line.kind == "history":
            view.insert("end", "[history] ", "history")
        elif line.late:
            view.insert("end", "[late] ", "history")
        if line.kind == "action":
            view.insert("end", f"* {line.sender} ", ("sender", *extra))
        else:
            sender_tags = ("sender", "own") if line.kind == "own" else ("sender", *extra)
            view.insert("end", f"<{line.sender}> ", sender_tags)
        view.insert("end", line.text.replace("\n", "\n    ") + "\n", body_tags)

    def _draw_members(self, rows: list[MemberRow]) -> None:
        if list(self.members.get(0, "end")) != [row.text for row in rows]:
            self.members.delete(0, "end")
            for row in rows:
                self.members.insert("end", row.text)
                if row.kind:
                    self.members.itemconfigure("end", foreground=COLOURS[row.kind])
        self._member_users = [row.user for row in rows]
        self.members_label.configure(text=f"Members ({len(rows)})" if rows else "Members")

    def _draw_banner(self) -> None:
        conv = self.model.conversations[self.model.current]
        self.banner.pack(fill="x", side="top", before=self.view.master)
        if not conv.is_dm:
            self._draw_room_banner(conv)
            return
        self.strict_button.pack_forget()
        self.verify_button.pack(side="right", padx=2, before=self.banner_text)
        trust = conv.trust
        if trust is None:
            text, colour = f"{conv.peer}: checking the key\u2026", "#555555"
        elif trust.state == "changed":
            text, colour = trust.warning, COLOURS["changed"]
        else:
            what = {
                "new": "first seen now, pinned",
                "pinned": "pinned (not verified)",
                "verified": "verified",
            }.get(trust.state, trust.state)
            key = f"{conv.peer}'s key {trust.fingerprint}".rstrip()
            text, colour = f"{key}: {what}", COLOURS[trust.state]
        self.banner_text.configure(text=text, foreground=colour)
        self._set_input(not conv.blocked)

    def _draw_room_banner(self, conv: Conversation) -> None:
        """A room's mode (a lock, or "not end-to-end encrypted") and, in an encrypted room, the
        strict switch."""
        self.verify_button.pack_forget()
        if conv.mode == "encrypted":
            self.strict_button.pack(side="right", padx=2, before=self.banner_text)
            self.strict.set(conv.strict)
        else:
            self.strict_button.pack_forget()
        text, kind = conv.header
        self.banner_text.configure(text=text, foreground=COLOURS[kind])
        self._set_input(True)

    def _set_input(self, enabled: bool) -> None:
        self.input.configure(state="normal" if enabled else "disabled")

    # -- events from the client (its event thread) ------------------------------------------------

    def _pump_events(self) -> None:
        for event in self.session.events():
            self.bridge.post(partial(self._on_event, event))

    def _set_status(self, text: str) -> None:
        self.model.connected = False
        self.model.status = text

    def _reattached(self, failures: tuple[tuple[str, str], ...]) -> None:
        self.model.connected = True
        self.model.status = ""
        self.model.note("reconnected")
        for room, why in failures:
            self.model.note(f"could not rejoin {room}: {why}", kind="warning")
        for held in self.session.resume():
            self.submit(held.text, held.where)

    def _on_event(self, event: Event | SessionEvent) -> None:
        if isinstance(event, ConnectionLost):
            self.model.on_event(Closed(event.reason))  # shown as the Client's own Closed
        elif isinstance(event, Retrying):
            why = event.reason
            self._set_status(f"reconnecting: attempt {event.attempt} in {event.delay:.1f}s ({why})")
        elif isinstance(event, Reconnected):
            self._reattached(event.rejoin_failures)
        elif isinstance(event, GaveUp):
            if event.login_refused:
                self._set_status(f"cannot log in again: {event.reason}")
        else:
            self._on_client_event(event)

    def _on_client_event(self, event: Event) -> None:
        self.bridge.run(lambda: self.controller.track(event))
        self.model.on_event(event)
        if isinstance(event, EmojiVerification):
            self._emoji_dialog(event.user).show(event)
            if event.stage == "verified":
                self.refresh_rooms()  # their mark in every encrypted room
        elif isinstance(event, Joined) and event.user == self.client.user:
            self.refresh_members(event.room)
            if event.room == self._joining:
                self._joining = None
                self.select(event.room)
        elif isinstance(event, Joined | Parted) and event.user != self.client.user:
            self.refresh_room(event.room)  # an arrival or a departure changes who gets keys
        elif isinstance(event, DirectMessage | DMRejected) and not valid_name(event.sender):
            trust = self.model.conversations[f"@{event.sender}"].trust
            if trust is None or not trust.fingerprint:
                self.open_dm(event.sender)  # show the key's fingerprint beside its state

    # -- rooms ------------------------------------------------------------------------------------

    def refresh_members(self, room: str) -> None:
        """Ask the server who is in `room`; in an encrypted room the client marks each member's
        trust and warns of ghosts (it takes the room lock: on the background thread)."""
        client = self.client

        def work() -> tuple[list[str], list[RoomMember]]:
            reply = client.who(room).result(10)
            return list(reply.get("members", [])), client.who_members(reply)

        self.bridge.run(work, lambda got: self.model.set_members(room, *got))

    def refresh_room(self, room: str) -> None:
        """Redraw an encrypted room's trust marks and strictness as the client holds them now."""
        conv = self.model.conversations.get(room)
        if conv is None or conv.mode != "encrypted":
            return  # the client calls a room it never saw "plain": ask only of encrypted ones
        client = self.client

        def show(state: RoomState) -> None:
            if room in self.model.conversations:  # not a room left meanwhile
                self.model.on_event(state)

        self.bridge.run(lambda: client.room_state(room), show)

    def refresh_rooms(self) -> None:
        for name in list(self.model.conversations):
            self.refresh_room(name)

    def _on_strict(self) -> None:
        """The strict switch: runs /room strict (or /room normal) in the current room."""
        conv = self.model.conversations[self.model.current]
        if conv.is_dm:
            return
        room = conv.name
        line = "/room strict" if self.strict.get() else "/room normal"
        self.bridge.run(lambda: self._command(room, line), lambda _ok: self.refresh_room(room))

    def open_new_room(self) -> None:
        self.new_room_dialog = NewRoomDialog(self)

    def create_room(self, dialog: NewRoomDialog, name: str, plain: bool) -> None:
        """The "New room" dialog's Create: what /create #name [--plain] sends."""
        try:
            line = create_command(name, plain)
        except SecureChatError as exc:
            dialog.refused(str(exc))
            return
        dialog.top.destroy()
        self.submit(line)

    # -- input ------------------------------------------------------------------------------------

    def _on_enter(self, _event: object) -> str:
        text = self.input.get("1.0", "end-1c")
        self.input.delete("1.0", "end")
        self.submit(text)
        return "break"

    def _on_shift_enter(self, _event: object) -> str:
        self.input.insert("insert", "\n")
        return "break"

    # One flat branch per command the window answers itself; the rest go to the controller.
    def submit(self, text: str, where: str | None = None) -> None:  # noqa: C901, PLR0912
        """What Enter does with the input box's text (typed in conversation `where`, by default
        the current one)."""
        where = where if where in self.model.conversations else self.model.current
        if not self.model.connected and not self._closing and text.strip() != "/quit":
            if not self.session.redials:
                self.model.note("not connected", kind="warning")
            else:
                self.session.hold(text, where)
                self.model.note("not connected: this will be sent once we reconnect")
            self.redraw()
            return
        try:
            parsed = commands.parse(text)
        except SecureChatError as exc:
            self.model.note(str(exc), kind="warning")
            self.redraw()
            return
        if parsed is None:
            return
        conv = self.model.conversations[where]
        if isinstance(parsed, commands.Say):
            if conv.is_dm:
                self.send_dm(conv.peer, parsed.text)
            else:
                self._send_room(conv.name, parsed.text)
            return
        name, args = parsed.name, parsed.args
        if name == "msg":
            self.open_dm(args[0])
            self.send_dm(args[0], args[1])
        elif name == "query":
            self.select(f"@{args[0]}" if args else LOBBY)
            if args:
                self.open_dm(args[0])
        elif name == "verify" and len(args) == 1:  # with a step, the controller runs it
            self.select(f"@{args[0]}")
            self.open_dm(args[0], then_verify=True)
        elif name == "quit":
            self.close()
        else:
            # Everything else is the terminal client's own command, answered in this conversation.
            room = None if conv.is_dm else conv.name
            self.bridge.run(lambda: self._command(room, text), self._after_command)
            if name == "trust":
                self.open_dm(args[0])  # runs after it (one worker): the banner shows the result
            elif name == "who" and (args or room):
                # The member list follows the answer (a ghost the server added shows there).
                self.refresh_members(args[0] if args else conv.name)

    def _command(self, room: str | None, text: str) -> bool:
        # On the bridge's background thread, which owns the controller.
        self.controller.current_room = room
        return self.controller.handle_line(text)

    def _after_command(self, _ok: object) -> None:
        room = self.controller.current_room
        if room and room != self.model.current:
            if room in self.client.rooms:
                self.select(room)
            else:
                # Joined, but our join is shown on the client's receiving thread, which may
                # still be reading the room's history: select the room when it is.
                self._joining = room
        for name in list(self.model.conversations):
            if not name.startswith("@") and name not in self.client.rooms and name != self._joining:
                self.model.close(name)  # a room we left
        self.redraw()

    def _command_output(self, notice: Notice) -> None:
        # Called from the background thread (or the client's thread, for late replies). A
        # command's answer goes to the room it ran in, or moved to ("now talking in #team" is
        # said in #team); from a DM conversation, to the conversation in view.
        target = self.controller.current_room or self.model.current
        kind = "warning" if notice.kind is NoticeKind.WARNING else "system"
        self.bridge.post(lambda: self.model.note(notice.text, target, kind))

    def _send_room(self, room: str, text: str) -> None:
        future = self.client.send(room, text)

        def done(f: Any) -> None:
            exc = f.exception()
            if exc is not None:
                self.bridge.post(lambda: self.model.note(f"not delivered: {exc}", room, "warning"))

        future.add_done_callback(done)

    def send_dm(self, peer: str, text: str) -> None:
        """Seal `text` for `peer` after checking the key; nothing is sent to a changed key."""
        name = f"@{peer}"

        def work() -> tuple[Trust, Any]:
            check = self.client.check_key(peer)
            if check.state is KeyState.CHANGED:
                return trust_of(check), None
            return trust_of(check), self.client.send_dm_to(check, text)

        def then(result: tuple[Trust, Any]) -> None:
            trust, future = result
            self.model.set_trust(peer, trust)
            if future is None:
                self.model.note(f"not sent: {trust.warning}", name, "warning")
                return

            def done(f: Any) -> None:
                exc = f.exception()
                if exc is not None:
                    self.bridge.post(lambda: self.model.note(f"not sent: {exc}", name, "warning"))
                    return
                reply = f.result()
                queued = " (queued: they are offline)" if reply.get("status") == "queued" else ""
                line = Line(
                    "own_dm", clean(text) + queued, self.client.user, int(reply.get("ts", 0))
                )
                self.bridge.post(lambda: self.model.add(name, line))

            future.add_done_callback(done)

        self.bridge.run(
            work, then, lambda exc: self.model.note(f"not sent: {exc}", name, "warning")
        )

    # -- conversations and trust -------------------------------------------------------------------

    def select(self, name: str) -> None:
        self.model.select(name)
        self.redraw()

    def _on_pick(self, _event: object) -> None:
        picked = _picked(self.sidebar)
        if picked is not None:
            convs = self.model.ordered()
            self.select(convs[picked].name)

    def _on_member(self, _event: object) -> None:
        picked = _picked(self.members)
        if picked is not None and picked < len(self._member_users):
            peer = self._member_users[picked]
            if peer != self.client.user:
                self.select(f"@{peer}")
                self.open_dm(peer)

    def _open_dm_from_entry(self) -> None:
        peer = self.dm_entry.get().strip().lower()
        self.dm_entry.delete(0, "end")
        if peer:
            self.select(f"@{peer}")
            self.open_dm(peer)

    def open_dm(self, peer: str, then_verify: bool = False) -> None:
        """Open (or refresh) the DM conversation with `peer`: look up and show its key state."""
        self.model.open(f"@{peer}")

        def got(check: KeyCheck) -> None:
            self.model.set_trust(peer, trust_of(check))
            if then_verify:
                self.open_verify()

        self.bridge.run(
            lambda: self.client.check_key(peer),
            got,
            lambda exc: self.model.note(str(exc), f"@{peer}", "warning"),
        )

    def open_verify(self) -> None:
        conv = self.model.conversations[self.model.current]
        if not conv.is_dm:
            return
        peer = conv.peer

        def show(shown: Verification) -> None:
            if shown.offered_key is None:
                state = shown.pinned_state.value
                self.model.set_trust(peer, Trust(state, shown.pinned_fingerprint))
            self.verify_dialog = VerifyDialog(self, shown)

        # The controller remembers what the dialog shows: only those keys can be marked.
        self.bridge.run(
            lambda: self.controller.verify(peer),
            show,
            lambda exc: self.model.note(str(exc), conv.name, "warning"),
        )

    def mark_verified(self, dialog: VerifyDialog, named: str | None) -> None:
        """Mark verified the key the dialog showed that `named` names (as /trust does)."""
        peer = dialog.shown.name

        def done(entry: PinnedKey) -> None:
            self.model.set_trust(peer, Trust("verified", fingerprint(entry.key)))
            self.model.note(f"{peer}'s key {fingerprint(entry.key)} is now verified", f"@{peer}")
            dialog.top.destroy()
            self.refresh_rooms()  # their mark in every encrypted room

        def refused(exc: SecureChatError | TimeoutError) -> None:
            choices = exc.choices if isinstance(exc, KeyNotNamed) else []
            typed = "; ".join(f"type {start} for {label}" for label, start in choices)
            dialog.refused(f"{exc}" + (f"\n{typed}" if typed else ""))

        self.bridge.run(lambda: self.controller.trust(peer, named), done, refused)

    def _emoji_dialog(self, peer: str) -> EmojiDialog:
        dialog = self.emoji_dialogs.get(peer)
        if dialog is None or not dialog.top.winfo_exists():
            dialog = self.emoji_dialogs[peer] = EmojiDialog(self, peer)
        return dialog

    def emoji_action(self, peer: str, action: Callable[[Client], object]) -> None:
        """Run one step of the emoji comparison with `peer` (the same Client calls /verify uses);
        its outcome arrives as EmojiVerification events."""
        client = self.client
        self.bridge.run(
            lambda: action(client),
            lambda _r: self.redraw(),
            lambda exc: self.model.note(str(exc), f"@{peer}", "warning"),
        )

    def compare_emoji(self, dialog: VerifyDialog) -> None:
        """The Verify dialog's "Compare emoji": ask one of the peer's devices (it shows the
        emoji dialog once the first step is in)."""
        shown = dialog.shown
        dialog.top.destroy()
        self.emoji_action(shown.name, lambda client: client.start_emoji(shown))

    # -- closing ----------------------------------------------------------------------------------

    def close(self) -> None:
        """Disconnect cleanly, then close the window."""
        if self._closing:
            return
        self._closing = True
        self.session.stop()
        self.controller.quit_requested = True
        held = len(self.session.held)
        if held:
            self.model.note(f"{held} line(s) typed while disconnected were not sent")
        self.bridge.run(self.session.close)
        self.bridge.close()  # waits for the close above (and the local history's)
        self.root.destroy()
        if self._on_closed is not None:
            self._on_closed()


def _error_and_buttons(frame: ttk.Frame, width: int) -> tuple[tk.Label, ttk.Frame]:
    """A dialog's line for why it was refused (empty until then) and the row its buttons go
    in, right to left, below it."""
    error = tk.Label(
        frame, text="", foreground=COLOURS["changed"], wraplength=width, justify="left"
    )
    error.pack(anchor="w")
    buttons = ttk.Frame(frame)
    buttons.pack(fill="x", pady=(10, 0))
    return error, buttons


class NewRoomDialog:
    """A room's name and whether it is plain: Create sends what /create #name [--plain] does
    (end-to-end encrypted unless the box is ticked)."""

    def __init__(self, window: ChatWindow) -> None:
        self.window = window
        top = self.top = tk.Toplevel(window.root)
        top.title("New room")
        top.transient(window.root)
        frame = ttk.Frame(top, padding=12)
        frame.pack(fill="both", expand=True)
        ttk.Label(frame, text="Room name").pack(anchor="w")
        self.name = ttk.Entry(frame, width=30)
        self.name.insert(0, "#")
        self.name.pack(anchor="w", fill="x", pady=(2, 6))
        self.name.bind("<Return>", lambda _e: self.confirm())
        self.plain = tk.BooleanVar(top, value=False)
        self.plain_box = ttk.Checkbutton(
            frame, text="plain (not end-to-end encrypted: the server reads it)", variable=self.plain
        )
        self.plain_box.pack(anchor="w")
        about = "Unticked, the room is end-to-end encrypted: only its members can read it."
        ttk.Label(frame, text=about, wraplength=360, justify="left").pack(anchor="w", pady=(4, 0))
        self.error, buttons = _error_and_buttons(frame, 360)
        ttk.Button(buttons, text="Create", command=self.confirm).pack(side="right")
        ttk.Button(buttons, text="Cancel", command=top.destroy).pack(side="right", padx=4)
        self.name.focus_set()

    def confirm(self) -> None:
        self.error.configure(text="")
        self.window.create_room(self, self.name.get(), self.plain.get())

    def refused(self, why: str) -> None:
        self.error.configure(text=why)


class VerifyDialog:
    """The safety number over the peer's pinned key (and over the key the server offers instead,
    if it differs), and a button to mark verified the key whose number matched. A changed key
    must be named by the start of its fingerprint, as with /trust."""

    def __init__(self, window: ChatWindow, shown: Verification) -> None:
        self.window, self.shown = window, shown
        self.number = shown.pinned_number
        peer = shown.name
        top = self.top = tk.Toplevel(window.root)
        top.title(f"Verify {peer}")
        top.transient(window.root)
        frame = ttk.Frame(top, padding=12)
        frame.pack(fill="both", expand=True)
        self.name_entry: ttk.Entry | None = None
        if shown.offered_key is None:
            self._number(frame, f"Safety number with {peer}", shown.pinned_number)
            about = (
                f"{peer}'s key: {shown.pinned_fingerprint} ({shown.pinned_state.value})\n"
                f"Compare this number with {peer} in person or on a call. If it matches, mark "
                "the key verified."
            )
            ttk.Label(frame, text=about, wraplength=460, justify="left").pack(anchor="w")
        else:
            warning = f"The server now offers {peer} a different key than the one you pinned."
            tk.Label(frame, text=warning, foreground=COLOURS["changed"]).pack(anchor="w")
            pinned = f"Pinned key {shown.pinned_fingerprint} ({shown.pinned_state.value})"
            self._number(frame, pinned, shown.pinned_number)
            self._number(frame, f"New key {shown.offered_fingerprint}", shown.offered_number or "")
            about = (
                f"Compare with {peer} in person or on a call. Then name the key whose number "
                "matched: type the first group of its fingerprint, and mark it verified."
            )
            ttk.Label(frame, text=about, wraplength=460, justify="left").pack(anchor="w")
            self.name_entry = ttk.Entry(frame, width=24)
            self.name_entry.pack(anchor="w", pady=(6, 0))
            self.name_entry.bind("<Return>", lambda _e: self.confirm())
        self.error, buttons = _error_and_buttons(frame, 460)
        ttk.Button(buttons, text="Mark verified", command=self.confirm).pack(side="right")
        if shown.offered_key is None:  # emoji compare the pinned key only
            ttk.Button(
                buttons, text="Compare emoji", command=lambda: window.compare_emoji(self)
            ).pack(side="right", padx=4)
        ttk.Button(buttons, text="Close", command=top.destroy).pack(side="right", padx=4)

    @staticmethod
    def _number(frame: ttk.Frame, title: str, number: str) -> None:
        ttk.Label(frame, text=title).pack(anchor="w")
        tk.Label(frame, text=number, font=("TkFixedFont", 14), justify="left").pack(
            anchor="w", pady=(2, 8)
        )

    def confirm(self, named: str | None = None) -> None:
        """Mark verified the key named here (or typed in the box); only keys shown qualify."""
        if named is None and self.name_entry is not None:
            named = self.name_entry.get().strip() or None
        self.error.configure(text="")
        self.window.mark_verified(self, named)

    def refused(self, why: str) -> None:
        self.error.configure(text=why)


# The buttons of each step of an emoji comparison, left to right, and the Client call of each.
_EMOJI_ACTIONS: dict[str, tuple[tuple[str, Callable[[Client, str], object]], ...]] = {
    "requested": (
        ("Decline", lambda c, peer: c.cancel_emoji(peer)),
        ("Accept", lambda c, peer: c.accept_emoji(peer)),
    ),
    "started": (("Cancel", lambda c, peer: c.cancel_emoji(peer)),),
    "compare": (
        ("They differ", lambda c, peer: c.cancel_emoji(peer, mismatch=True)),
        ("They match", lambda c, peer: c.confirm_emoji(peer)),
    ),
    "waiting": (("Cancel", lambda c, peer: c.cancel_emoji(peer)),),
}


class EmojiDialog:
    """An emoji comparison with one person: what to do now, the 7 emoji (and the numbers) to
    compare, and the buttons for the step: Accept or Decline a request, They match or They
    differ once the emoji are shown. Updated in place by each EmojiVerification event."""

    def __init__(self, window: ChatWindow, peer: str) -> None:
        self.window, self.peer = window, peer
        self.stage = ""
        top = self.top = tk.Toplevel(window.root)
        top.title(f"Compare emoji with {peer}")
        top.transient(window.root)
        frame = ttk.Frame(top, padding=12)
        frame.pack(fill="both", expand=True)
        self.detail = tk.Label(frame, text="", wraplength=460, justify="left")
        self.detail.pack(anchor="w")
        self.emoji = tk.Label(frame, text="", font=("TkDefaultFont", 16), justify="left")
        self.emoji.pack(anchor="w", pady=(8, 0))
        self.decimals = tk.Label(frame, text="", font=("TkFixedFont", 12), justify="left")
        self.decimals.pack(anchor="w", pady=(2, 8))
        self.buttons = ttk.Frame(frame)
        self.buttons.pack(fill="x", pady=(10, 0))
        self._pressable: list[ttk.Button] = []

    def show(self, event: EmojiVerification) -> None:
        self.stage = event.stage
        colour = COLOURS["changed"] if event.stage == "cancelled" else ""
        self.detail.configure(text=clean(event.detail), foreground=colour or "black")
        if event.stage == "compare":
            self.emoji.configure(text="\n".join(clean(e) for e in event.emoji.split("  ")))
            self.decimals.configure(text=clean(event.decimals))
        for button in self._pressable:
            button.destroy()
        actions = _EMOJI_ACTIONS.get(event.stage, ())
        self._pressable = [
            ttk.Button(self.buttons, text=label, command=partial(self.press, action))
            for label, action in actions
        ] or [ttk.Button(self.buttons, text="Close", command=self.top.destroy)]
        for button in reversed(self._pressable):
            button.pack(side="right", padx=4)

    def press(self, action: Callable[[Client, str], object]) -> None:
        peer = self.peer
        self.window.emoji_action(peer, lambda client: action(client, peer))

    def button_labels(self) -> list[str]:
        return [str(b.cget("text")) for b in self._pressable]

    def click(self, label: str) -> None:
        """Press the button labelled `label` (as a user would; tests use it)."""
        for b in self._pressable:
            if str(b.cget("text")) == label:
                b.invoke()
                return
        raise ValueError(f"no button {label!r} in the emoji dialog ({self.button_labels()})")
