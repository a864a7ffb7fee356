"""What the user's lines do: the slash commands of the terminal, line mode and the GUI.

The controller keeps the current room and query, turns parsed commands into Client calls, and
reports everything as typed notices through one `output` callback. Requests that answer later (a
sent message) report failures when the reply comes; nothing is silently lost.

Threads. A controller belongs to one thread, its owner: the first thread that calls one of its
methods. Every method (handle_line, on_event, track, reattached, verify, trust) must then be
called on that thread, and a call from any other thread raises WrongThread instead of racing:
the terminal and line mode funnel input lines and events through one "controller" thread, the
GUI runs it on its background worker. The one exception is the client's I/O thread, which runs
the callbacks of requests answered later: they only count failures (under the lock) and call
`output`, so `output` must be safe to call from any thread. Other threads may read the plain
attributes (current_room, query, failures) and set `quit_requested`, a flag.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from typing import Any, ParamSpec, TypeVar

from securechat.client.api import Client
from securechat.client.chat_session import ChatSession, Held
from securechat.client.events import Closed, DirectMessage, Event, Joined, Message, Parted
from securechat.client.history import LocalHistory, Recalled
from securechat.client.text import clean_line
from securechat.errors import ConnectionClosed, SecureChatError
from securechat.identity import fingerprint
from securechat.protocol import LOBBY
from securechat.terminal import commands, hints, notices
from securechat.terminal.notices import Notice
from securechat.terminal.render import (
    first_sight,
    key_mark,
    member_mark,
    mode_label,
    notice_of,
    render_past,
)
from securechat.trust import KeyChanged, KeyNotNamed, KeyState, PinnedKey, Verification

REPLY_TIMEOUT = 10.0
SEARCH_LIMIT = 50

P = ParamSpec("P")
R = TypeVar("R")


class WrongThread(RuntimeError):
    """A controller method was called on a thread other than the controller's owner (a bug)."""


def _owned(method: Callable[P, R]) -> Callable[P, R]:
    """Check that the call comes from the controller's owner thread (binding it on first use)."""

    @functools.wraps(method)
    def checked(*args: P.args, **kwargs: P.kwargs) -> R:
        self = args[0]
        assert isinstance(self, Controller)
        self._check_owner(method.__name__)
        return method(*args, **kwargs)

    return checked


class Controller:
    def __init__(self, session: ChatSession, output: Callable[[Notice], None]) -> None:
        self.session = session
        self.output = output
        self.current_room: str | None = LOBBY
        self.query: str | None = None
        self.names: set[str] = {session.client.user}  # for tab completion
        self.failures = 0  # requests the server refused or never answered
        self.quit_requested = False
        self._shown: dict[str, Verification] = {}  # the last /verify per user, for /trust
        self._lock = threading.Lock()  # failures, counted on the client's I/O thread too
        self._owner: threading.Thread | None = None

    def _check_owner(self, what: str) -> None:
        me = threading.current_thread()
        with self._lock:
            if self._owner is None:
                self._owner = me
        if self._owner is not me:
            raise WrongThread(
                f"Controller.{what} called on thread {me.name!r}; the controller belongs to "
                f"thread {self._owner.name!r}"
            )

    @property
    def client(self) -> Client:
        return self.session.client

    def _failed(self) -> None:
        with self._lock:
            self.failures += 1

    def _info(self, text: str) -> None:
        self.output(notices.info(text))

    def _warn(self, text: str) -> None:
        self.output(notices.warning(text))

    # -- reconnecting -----------------------------------------------------------------------------

    @_owned
    def reattached(self, held: list[Held]) -> None:
        """The session reconnected (and rejoined our rooms): send what was typed meanwhile."""
        if self.current_room not in self.client.rooms:
            self.current_room = self._fallback_room("")
        for line in held:
            self.handle_line(line.text)

    # -- events -----------------------------------------------------------------------------------

    @_owned
    def on_event(self, event: Event) -> None:
        self.track(event)
        if isinstance(event, Closed) and self.quit_requested:
            return
        self.output(notice_of(event, self.current_room))
        if isinstance(event, DirectMessage) and event.key_state == KeyState.NEW.value:
            self._first_sight(event.sender)

    def _first_sight(self, peer: str) -> None:
        key = self.client.known_keys.pinned(peer)
        if key is not None:
            self.output(first_sight(peer, fingerprint(key)))

    @_owned
    def track(self, event: Event) -> None:
        """Keep names and the current room up to date, showing nothing (a GUI draws events
        itself)."""
        if isinstance(event, Message | DirectMessage):
            self.names.add(event.sender)
        elif isinstance(event, Joined):
            self.names.add(event.user)
        elif (
            isinstance(event, Parted)
            and event.user == self.client.user
            and event.room == self.current_room
        ):
            self.current_room = self._fallback_room(event.room)

    def _fallback_room(self, left: str) -> str | None:
        rooms = sorted(self.client.rooms - {left})
        return LOBBY if LOBBY in rooms else (rooms[0] if rooms else None)

    # -- input ------------------------------------------------------------------------------------

    @_owned
    def handle_line(self, line: str) -> bool:
        """Act on one input line; False once the user asked to quit."""
        if not _is_unicode(line):
            # Undecodable input bytes arrive as lone surrogates, which no frame can carry.
            self._failed()
            self._warn(
                "that line is not valid UTF-8 (check your terminal's or file's encoding); "
                "it was not sent"
            )
            return not self.quit_requested
        try:
            parsed = commands.parse(line)
            if parsed is None:
                return True
            if not self.session.connected and not (
                isinstance(parsed, commands.Command) and parsed.name in ("quit", "help")
            ):
                self.session.hold(line)
                self._info("not connected: this will be sent once we reconnect")
                return True
            if isinstance(parsed, commands.Say):
                self._say(parsed.text)
            else:
                HANDLERS[parsed.name](self, *parsed.args)
        except KeyChanged as exc:
            self._failed()
            self._warn(hints.key_changed(exc.check))
        except (SecureChatError, TimeoutError) as exc:
            self._warn(f"{exc or 'no answer from the server'}")
        return not self.quit_requested

    def _say(self, text: str) -> None:
        if self.query:
            self._cmd_msg(self.query, text)
        elif self.current_room is None:
            self._warn("you are in no room; /join #room first")
        else:
            self._track(self.client.send(self.current_room, text), "message not delivered")

    def _track(
        self,
        future: Future[dict[str, Any]],
        what: str,
        on_ok: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        def done(f: Future[dict[str, Any]]) -> None:
            exc = f.exception()
            if exc is None:
                if on_ok:
                    on_ok(f.result())
                return
            self._failed()
            if not (isinstance(exc, ConnectionClosed) and self.quit_requested):
                self._warn(f"{what}: {exc}")

        future.add_done_callback(done)

    def _wait(self, future: Future[dict[str, Any]]) -> dict[str, Any]:
        return future.result(REPLY_TIMEOUT)

    # -- commands ---------------------------------------------------------------------------------

    def _cmd_history(self, target: str | None = None, count: str | None = None) -> None:
        if target and target.isdigit() and count is None:
            target, count = None, target
        limit = int(count) if count and count.isdigit() else None
        if target and target.startswith("@"):
            self._local_history(target.lower(), limit or 100)
            return
        room = target or self.current_room
        if room is None:
            self._warn("you are in no room; /history #room")
            return
        if not room.startswith("#"):
            room = "#" + room
        reply = self._wait(self.client.room_history(room, min(limit or 100, 1000)))
        events = self.client.history_events(reply)
        for event in events:
            self.output(notice_of(event, self.current_room))
        shown = sum(isinstance(e, Message) for e in events)
        self._info(f"{shown} earlier messages of {room}")

    def _local(self) -> LocalHistory | None:
        history = self.client.history
        if history is None:
            self._warn("local history is off (--no-history)")
        elif history.failure:
            self._warn(f"local history: {history.failure}")
        return history

    def _local_history(self, peer: str, limit: int) -> None:
        history = self._local()
        if history is None:
            return
        entries = history.conversation(peer, min(limit, 10_000))
        for entry in entries:
            self.output(notices.line(render_past(entry, self.client.user)))
        self._info(f"{len(entries)} messages with {peer[1:]} in your local history")
        self._report_refused(entries)

    def _cmd_search(self, words: str) -> None:
        history = self._local()
        if history is None:
            return
        found = history.search(words, SEARCH_LIMIT)
        for entry in found:
            self.output(notices.line(render_past(entry, self.client.user)))
        more = f" (the newest {SEARCH_LIMIT})" if len(found) == SEARCH_LIMIT else ""
        self._info(f'{len(found)} messages found{more} for "{clean_line(words)}"')
        self._report_refused(found)

    def _report_refused(self, recalled: Recalled) -> None:
        if recalled.refused:
            self._warn(
                f"{recalled.refused} entries of your local history failed their integrity"
                " check (damaged, altered, or moved from another conversation) and were not shown"
            )

    def _cmd_join(self, room: str) -> None:
        self._joined(room, self._wait(self.client.join(room)))

    def _cmd_create(self, room: str, flag: str | None = None) -> None:
        if flag not in (None, "--plain"):
            raise commands.CommandError(f"usage: /create {commands.COMMANDS['create'].usage}")
        self._joined(room, self._wait(self.client.create(room, plain=flag == "--plain")))

    def _joined(self, room: str, reply: dict[str, Any]) -> None:
        self.current_room = room
        members = reply.get("members", [])
        self.names.update(members)
        self._info(f"now talking in {room} ({_member_count(reply)} here)")

    def _cmd_part(self, room: str | None = None) -> None:
        room = room or self.current_room
        if room is None:
            self._warn("you are in no room")
            return
        self._wait(self.client.part(room))
        if room == self.current_room:
            self.current_room = self._fallback_room(room)
        where = f"; now talking in {self.current_room}" if self.current_room else ""
        self._info(f"you left {room}{where}")

    def _cmd_rooms(self) -> None:
        rooms = self._wait(self.client.list_rooms()).get("rooms", [])
        listing = ", ".join(
            f"{clean_line(r['name'])} ({r['members']}, "
            f"{mode_label(self.client.accept_mode(r['name'], r.get('mode')))})"
            for r in rooms
        )
        self._info(f"rooms: {listing or 'none'}")

    def _cmd_room(self, setting: str | None = None) -> None:
        room = self.current_room
        if room is None:
            self._warn("you are in no room; /join #room first")
            return
        if setting is None:
            state = self.client.room_state(room)
            self._info(f"{room}: {mode_label(state.mode)}")
            if state.encrypted:
                sharing = "verified members only (strict)" if state.strict else "pinned members"
                self._info(f"room keys go to {sharing}; /room strict or /room normal changes it")
            return
        if setting.lower() not in ("strict", "normal"):
            raise commands.CommandError(f"usage: /room {commands.COMMANDS['room'].usage}")
        state = self.client.set_room_strict(room, setting.lower() == "strict")
        if state.strict:
            self._info(f"{room} is strict: its keys go only to members you verified")
        else:
            self._info(f"{room} is normal: its keys go to every member whose key is pinned")

    def _cmd_who(self, room: str | None = None) -> None:
        room = room or self.current_room
        if room is None:
            self._warn("you are in no room; /who #room")
            return
        reply = self._wait(self.client.who(room))
        members = reply.get("members", [])
        self.names.update(members)
        unlisted = _member_count(reply) - len(members)
        more = f" and {unlisted} more" if unlisted > 0 else ""
        marked = self.client.who_members(reply)
        names = [member_mark(m) for m in marked] if marked else [clean_line(m) for m in members]
        lock = f" ({mode_label(self.client.room_mode(room))})" if marked else ""
        self._info(f"in {room}{lock}: {', '.join(names)}{more}")

    def _cmd_me(self, action: str) -> None:
        if self.current_room is None:
            self._warn("you are in no room; /join #room first")
            return
        self._track(
            self.client.send(self.current_room, action, action=True), "action not delivered"
        )

    def _cmd_msg(self, user: str, text: str) -> None:
        check = self.client.check_key(user)
        future = self.client.send_dm_to(check, text)
        stamp = datetime.now().strftime("%H:%M")
        lines = text.split("\n")
        body = "\\n".join(lines) if len(lines) > 1 else text
        mark = key_mark(check.state.value)

        def sent(reply: dict[str, Any]) -> None:
            queued = " (queued: they are offline)" if reply.get("status") == "queued" else ""
            self.output(notices.line(f"[{stamp}] -> *{user}* {mark} {clean_line(body)}{queued}"))
            if check.state is KeyState.NEW:
                self._first_sight(user)

        self._track(future, f"direct message to {user} not sent", sent)

    def _cmd_query(self, user: str | None = None) -> None:
        self.query = user
        if user:
            self._info(f"plain lines now go to {user} as direct messages; /query to stop")
        else:
            self._info(f"plain lines go to {self.current_room or 'no room'} again")

    def _cmd_whois(self, user: str) -> None:
        check = self.client.check_key(user)
        state = check.state.value
        self._info(f"{user}: key {check.fingerprint} ({state})")
        if check.state is KeyState.CHANGED:
            self._warn(hints.key_changed(check))

    @_owned
    def verify(self, user: str) -> Verification:
        """Look up the safety number(s) for `user` and remember what was shown: trust() marks
        only a key shown here."""
        shown = self.client.safety_number(user)
        self._shown[user] = shown
        return shown

    @_owned
    def trust(self, user: str, named: str | None = None) -> PinnedKey:
        """Mark verified the key that the last verify(user) showed and `named` names (see
        Verification.choose); asks the server nothing."""
        shown = self._shown.get(user)
        if shown is None:
            raise commands.CommandError(
                f"no safety number for {user} was shown yet: /verify {user} shows it; compare "
                f"it with {user}, then /trust {user}"
            )
        entry = self.client.mark_verified(shown, named)
        if self._shown.get(user) is shown:
            del self._shown[user]
        return entry

    def _cmd_verify(self, user: str, step: str | None = None) -> None:
        if step is not None:
            self._emoji_step(user, step.lower())
            return
        shown = self.verify(user)
        if shown.offered_key is None:
            self._info(f"{user}'s key: {shown.pinned_fingerprint} ({shown.pinned_state.value})")
            self._info(f"safety number with {user}: {shown.pinned_number}")
            self._info(f"compare it with {user} outside this chat; if it matches, /trust {user}")
            self._info(
                f"or, while {user} is online, compare emoji with their device: /verify {user} emoji"
            )
            return
        self._warn(f"the server now offers {user} a different key than the one you pinned")
        self._info(
            f"pinned key: {shown.pinned_fingerprint} ({shown.pinned_state.value}); "
            f"safety number: {shown.pinned_number}"
        )
        self._info(f"new key: {shown.offered_fingerprint}; safety number: {shown.offered_number}")
        self._info(
            f"compare with {user} outside this chat, and trust the key whose number matches:"
        )
        self._say_choices(user, shown.choices())

    def _emoji_step(self, user: str, step: str) -> None:
        """The emoji comparison (SAS): its steps arrive as EmojiVerification events."""
        client = self.client
        if step == "emoji":
            client.start_emoji(self.verify(user))
        elif step == "accept":
            client.accept_emoji(user)
        elif step == "match":
            client.confirm_emoji(user)
        elif step in ("differ", "cancel"):
            client.cancel_emoji(user, mismatch=step == "differ")
        else:
            raise commands.CommandError(f"usage: /verify {commands.COMMANDS['verify'].usage}")

    def _say_choices(self, user: str, choices: list[tuple[str, str]]) -> None:
        for label, start in choices:
            self._info(f"  /trust {user} {start}   trusts {label}")

    def _cmd_trust(self, user: str, *named: str) -> None:
        try:
            entry = self.trust(user, " ".join(named) if named else None)
        except KeyNotNamed as exc:
            self._warn(str(exc))
            self._say_choices(user, exc.choices)
            return
        self._info(f"{user}'s key {fingerprint(entry.key)} is now verified")

    def _cmd_devices(self, user: str | None = None) -> None:
        who = user or self.client.user
        listed = self.client.devices(who)
        if not listed:
            self._info(f"{who} has no device signed by their identity key")
        for d in listed:
            if d.revoked:
                state = "revoked"
            else:
                seen = d.last_seen_ms
                when = (
                    datetime.fromtimestamp(seen / 1000).strftime("%Y-%m-%d %H:%M") if seen else "?"
                )
                state = f"key {d.fingerprint}, last seen {when}"
            this = " (this device)" if d.this_device else ""
            self._info(f"{who} device {d.device_id}{this}: {state}")

    def _cmd_revoke(self, device_id: str) -> None:
        device_id = device_id.upper()
        if device_id == self.client.device_id:
            self._warn("that is this device; revoke it from another of your devices")
            return
        reply = self.client.revoke_device(device_id)
        dropped = reply.get("dropped", 0)
        self._info(
            f"device {device_id} revoked: it can no longer log in or get DMs"
            f" ({dropped} waiting for it were dropped)"
        )

    def _cmd_help(self) -> None:
        for line in commands.help_lines():
            self.output(notices.line(line))

    def _cmd_quit(self) -> None:
        self.quit_requested = True


# Every command of commands.COMMANDS, and what runs it (checked at import below).
HANDLERS: dict[str, Callable[..., None]] = {
    "history": Controller._cmd_history,
    "search": Controller._cmd_search,
    "join": Controller._cmd_join,
    "create": Controller._cmd_create,
    "room": Controller._cmd_room,
    "part": Controller._cmd_part,
    "rooms": Controller._cmd_rooms,
    "who": Controller._cmd_who,
    "me": Controller._cmd_me,
    "msg": Controller._cmd_msg,
    "query": Controller._cmd_query,
    "whois": Controller._cmd_whois,
    "verify": Controller._cmd_verify,
    "trust": Controller._cmd_trust,
    "devices": Controller._cmd_devices,
    "revoke": Controller._cmd_revoke,
    "help": Controller._cmd_help,
    "quit": Controller._cmd_quit,
}
if HANDLERS.keys() != commands.COMMANDS.keys():
    raise ImportError(
        f"commands without a handler, or handlers without a command: "
        f"{sorted(HANDLERS.keys() ^ commands.COMMANDS.keys())}"
    )


class OwnerThread:
    """The one thread that owns a controller, for front ends whose input and events arrive on
    threads of their own: call(fn) runs fn there, in order, and returns its result or raises."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="controller")

    def call(self, fn: Callable[[], R]) -> R:
        return self._pool.submit(fn).result()

    def close(self) -> None:
        self._pool.shutdown(wait=False)


def _member_count(reply: dict[str, Any]) -> int:
    """How many are in the room: a big room's reply lists only the names that fit in a frame."""
    count, members = reply.get("count"), reply.get("members", [])
    if isinstance(count, int) and not isinstance(count, bool) and count >= len(members):
        return count
    return len(members)


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
