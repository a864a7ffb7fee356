"""The Client API: what the terminal UI, the tests and bot writers build on.

    client = Client.connect("127.0.0.1", 12345, identity, user="bot", ca=Path("certs/ca.pem"))
    client.join("#dev").result()
    client.send("#dev", "hello")
    for event in client.events():
        ...

Requests return concurrent.futures.Future objects whose result is the server's reply frame (or
raise RequestError); events arrive on a queue that any thread may read. All socket work happens on
the connection's own thread.
"""

from __future__ import annotations

import base64
import json
import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from securechat.client.connection import (
    KEEPALIVE,
    ClientConnection,
    RequestError,
    open_connection,
)
from securechat.client.dm import DeviceInfo, DeviceState, DirectMessages
from securechat.client.events import (
    Closed,
    DeviceWarning,
    DirectMessage,
    EmojiVerification,
    Event,
    FrameDropped,
    Joined,
    Message,
    Parted,
    RoomKeyRecord,
    RoomMember,
    RoomState,
    SasRecord,
    ServerError,
)
from securechat.client.history import Entry, LocalHistory
from securechat.client.rooms import EncryptedRooms
from securechat.client.verify import EmojiVerifier
from securechat.errors import ConfigError
from securechat.identity import Identity
from securechat.megolm.mode import RoomMode
from securechat.protocol import valid_name, valid_room
from securechat.tls import client_context
from securechat.trust import (
    KeyChanged,
    KeyCheck,
    KnownKeys,
    PinnedKey,
    Verification,
    known_keys_path,
)

__all__ = ["Client", "KeyChanged", "RequestError"]


class Client:
    def __init__(
        self,
        conn: ClientConnection,
        user: str,
        welcome: dict[str, Any],
        identity: Identity,
        known_keys: KnownKeys,
        history: LocalHistory | None = None,
        device: DeviceState | None = None,
    ) -> None:
        self._conn = conn
        self.user = user
        self.identity = identity
        self.known_keys = known_keys
        self.history = history
        self.welcome = welcome
        self.server_cert_sha256 = conn.tls.peer_cert_sha256()
        self.rooms: set[str] = set()  # rooms we are in, kept up to date from our joins and parts
        self._events: queue.Queue[Event] = queue.Queue()
        self._done = threading.Event()
        self._queue_delivered = threading.Event()
        # DMs are opened on a thread of their own: opening one may need the sender's device
        # list, a request whose reply the connection thread itself must read.
        self.dms = (
            DirectMessages(
                device,
                known_keys,
                conn.request,
                self._events.put,
                max_frame=conn.session.max_frame,
            )
            if device is not None
            else None
        )
        self.verifier = EmojiVerifier(self.dms, self._events.put) if self.dms is not None else None
        # Encrypted rooms: their frames are read on the DM thread too, in order behind the key
        # messages that open them, and may need a device list fetched as DMs do.
        self.encrypted_rooms = (
            EncryptedRooms(self.dms, known_keys, self._events.put) if self.dms is not None else None
        )
        self._inbox: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._joins: dict[str, threading.Event] = {}  # set once a join's answer was read
        self._receiver = threading.Thread(target=self._receive_loop, name=f"dm-{user}", daemon=True)

    @classmethod
    def connect(
        cls,
        host: str,
        port: int,
        identity: Identity,
        user: str,
        ca: Path,
        *,
        cert: Path | None = None,
        cert_key: Path | None = None,
        timeout: float = 10.0,
        known_keys: KnownKeys | None = None,
        history: LocalHistory | None = None,
        keepalive: float = KEEPALIVE,
    ) -> Client:
        """Connect over TLS 1.3, verify the server against `ca`, and log in as `user`.

        Other users' keys are pinned in `known_keys` (by default the known-keys file beside the
        identity's key file). With a `history`, every DM and room message seen or sent is
        recorded there, and a DM it already holds is not shown again. Raises ConnectError
        (unreachable, TLS or certificate failure), AuthError (the server refused the login, e.g.
        the name belongs to another key) or CertificateError. A server silent for `keepalive`
        seconds is pinged, and given up on (Closed) if it stays silent.
        """
        if known_keys is None:
            if identity.path is None:
                raise ConfigError("an identity without a key file needs known_keys= given")
            known_keys = KnownKeys(known_keys_path(identity.path))
        if identity.path is None:
            raise ConfigError("direct messages need an identity with a key file (its device)")
        device = DeviceState(identity, user)
        ctx = client_context(ca, cert, cert_key)
        sock, tls, session, welcome, early = open_connection(
            host, port, ctx, identity, user, timeout, device.device_id
        )
        client: Client
        conn = ClientConnection(
            sock,
            tls,
            session,
            on_frame=lambda f: client._on_frame(f),
            on_close=lambda r: client._on_close(r),
            rate=_number(welcome.get("rate")),
            burst=int(_number(welcome.get("burst")) or 0),
            flood_refusals=int(_number(welcome.get("flood_refusals")) or 0) or None,
            keepalive=keepalive,
        )
        client = cls(conn, user, welcome, identity, known_keys, history, device)
        for frame in early:
            client._on_frame(frame)
        conn.start()
        client._receiver.start()
        threading.Thread(target=client._tick, name=f"sas-{user}", daemon=True).start()
        try:
            client._dms().publish()
        except BaseException:
            client.close()
            raise
        return client

    # -- requests ---------------------------------------------------------------------------------

    def join(
        self, room: str, *, create: bool = False, plain: bool = False
    ) -> Future[dict[str, Any]]:
        """Join `room`; a room the server does not know yet is created end-to-end encrypted
        (plain=True with create=True: TLS only). create=True fails if the room exists. The
        reply's mode and member list reach the room keys (a RoomState event shows them)."""
        fields: dict[str, Any] = {"room": room}
        if create:
            fields["create"] = True
        if plain:
            fields["plain"] = True
        future = self._conn.request("join", **fields)
        # A line sent right after the join waits until its answer reached the room keys: the
        # room's mode and members decide whether and to whom it is encrypted.
        read = self._joins[room] = threading.Event()

        def answered(f: Future[dict[str, Any]]) -> None:
            if f.exception() is not None:
                read.set()
            else:  # in order behind the history and joins before it
                self._inbox.put({"type": JOIN_REPLY, "reply": f.result(), "read": read})

        future.add_done_callback(answered)
        return future

    def create(self, room: str, *, plain: bool = False) -> Future[dict[str, Any]]:
        """Create `room` (end-to-end encrypted unless plain) and join it."""
        return self.join(room, create=True, plain=plain)

    def part(self, room: str) -> Future[dict[str, Any]]:
        return self._conn.request("part", room=room)

    def send(self, room: str, text: str, *, action: bool = False) -> Future[dict[str, Any]]:
        """Say `text` in `room` (a /me line when action=True); the reply means it was relayed.

        In a room seen end-to-end encrypted the text is encrypted (RoomWarning events name the
        members who get no keys, and why); it is never sent in plaintext there. Blocks then while
        it fetches device lists and prekeys: never call it on the connection's thread."""
        if (joining := self._joins.get(room)) is not None:
            joining.wait(JOIN_READ_TIMEOUT)
        if self.room_mode(room) == RoomMode.ENCRYPTED.value:
            return self._rooms().send(room, text, self._conn.request, action=action)
        fields: dict[str, Any] = {"room": room, "text": text}
        if action:
            fields["action"] = True
        return self._conn.request("say", **fields)

    def list_rooms(self) -> Future[dict[str, Any]]:
        return self._conn.request("rooms")

    def who(self, room: str) -> Future[dict[str, Any]]:
        return self._conn.request("who", room=room)

    def room_history(self, room: str, limit: int | None = None) -> Future[dict[str, Any]]:
        """The room's kept history (its last `limit` messages); reply["messages"] holds message
        frames marked history, oldest first (see history_events())."""
        fields: dict[str, Any] = {"room": room}
        if limit is not None:
            fields["limit"] = limit
        return self._conn.request("history", **fields)

    def history_events(self, reply: dict[str, Any]) -> list[Event]:
        """The Message events in a room_history() reply, with a FrameDropped (a warning to show)
        in place of each entry that is not a well-formed room message. Encrypted entries are
        decrypted (RoomUnreadable markers and RoomWarning refusals in place of those that
        cannot be shown); those sent before we joined are summed up in one line at the end. Blocks
        while it fetches a sender's devices."""
        events: list[Event] = []
        rooms = self.encrypted_rooms
        read: set[str] = set()
        for f in reply.get("messages", []):
            if rooms is not None and isinstance(f, dict) and f.get("type") == "message_encrypted":
                read.add(str(f.get("room")))
                events += rooms.history_entry(f)
                continue
            event = (
                _event_from_frame({**f, "type": "message", "history": True})
                if isinstance(f, dict)
                else None
            )
            if isinstance(event, Message) and rooms is not None:
                events.append(rooms.check_plaintext(event))
            elif isinstance(event, Message | FrameDropped):
                events.append(event)
            else:
                events.append(
                    FrameDropped(
                        "message",
                        "the server sent a room history entry that is not a message;"
                        " it was dropped",
                    )
                )
        for room in sorted(read):
            events += rooms.history_summary(room) if rooms is not None else []
        return events

    # -- encrypted rooms ----------------------------------------------------------------------

    def _rooms(self) -> EncryptedRooms:
        if self.encrypted_rooms is None:
            raise ConfigError("this client was made without a device; it has no room keys")
        return self.encrypted_rooms

    def room_mode(self, room: str) -> str | None:
        """The mode this client holds for `room`, "encrypted" or "plain" (None: not seen yet).
        Never waits: a status bar may ask at any time."""
        mode = self.encrypted_rooms.mode(room) if self.encrypted_rooms is not None else None
        return mode.value if mode is not None else None

    def accept_mode(self, room: str, announced: Any) -> str | None:
        """The server announced `room`'s mode (in a rooms or who reply): the mode this client
        holds now. A downgrade of a room seen encrypted is refused (a RoomWarning shows it).
        Takes the room lock: never on the connection's thread."""
        mode = self._rooms().observe_mode(room, announced)
        return mode.value if mode is not None else None

    def room_state(self, room: str) -> RoomState:
        """The room's mode, strictness and member list with trust marks, as held now."""
        return self._rooms().state(room)

    def room_members(self, room: str) -> list[RoomMember]:
        """The members this client showed joining `room` (and any ghosts the server lists
        without a join), each marked verified, pinned, new or changed."""
        return self._rooms().members(room)

    def who_members(self, reply: dict[str, Any]) -> list[RoomMember]:
        """A who() reply for an encrypted room: the members with trust marks; a name the server
        lists without a join this client showed is a ghost (it gets no keys; a RoomWarning says
        so). Empty for a plain room. Takes the room lock: never on the connection's thread."""
        return self._rooms().member_list(reply)

    def set_room_strict(self, room: str, on: bool = True) -> RoomState:
        """Share `room`'s keys only with verified members (kept across restarts)."""
        return self._rooms().set_strict(room, on)

    def ping(self) -> Future[dict[str, Any]]:
        return self._conn.request("ping")

    # -- direct messages and keys -----------------------------------------------------------------

    def check_key(self, user: str, timeout: float = 10.0) -> KeyCheck:
        """Ask the server for `user`'s key and compare it with the pinned one (pinning it on
        first sight). Blocks for the server's answer; raises RequestError (no_such_user)."""
        reply = self._conn.request("keys", user=user).result(timeout)
        key = base64.b64decode(str(reply.get("key", "")))
        return self.known_keys.check(user, key)

    def _dms(self) -> DirectMessages:
        if self.dms is None:
            raise ConfigError("this client was made without a device; it cannot send DMs")
        return self.dms

    def send_dm(self, user: str, text: str, timeout: float = 10.0) -> Future[dict[str, Any]]:
        """Encrypt `text` to each of `user`'s devices (and our own other devices) and send it;
        the reply says it was delivered or queued.

        Raises KeyChanged, and sends nothing, when the server offers a key for `user` other than
        the pinned one: the user must compare safety numbers and mark_verified() the new key first.
        Devices not signed by the pinned key are refused (DeviceWarning events say so).
        """
        return self.send_dm_to(self.check_key(user, timeout), text)

    def send_dm_to(self, check: KeyCheck, text: str) -> Future[dict[str, Any]]:
        """send_dm() to a key check_key() returned (so a front end can show its trust state);
        raises KeyChanged for a changed key. Blocks while it fetches device lists and prekeys."""
        user = check.name
        future, message_id, ts = self._dms().send(check, text)
        if self.history is not None:
            # Remembered once the server took it: a DM it refused was never sent.
            history = self.history
            sent = Entry(f"@{user}", self.user, text, ts, False, message_id)
            future.add_done_callback(lambda f: None if f.exception() else history.add(sent))
        return future

    def devices(self, user: str | None = None) -> list[DeviceInfo]:
        """The devices of `user` (default: ours), checked against the pinned identity key; those
        not signed by it are left out, with a DeviceWarning event each. Blocks for the server."""
        return self._dms().device_infos(user or self.user)

    @property
    def device_id(self) -> str:
        return self._dms().state.device_id

    def revoke_device(self, device_id: str) -> dict[str, Any]:
        """Revoke one of our devices (a revocation signed by the identity key): others stop
        encrypting to it and the server stops delivering to it. Blocks for the server."""
        reply = self._dms().revoke(device_id)
        if self.encrypted_rooms is not None:
            self.encrypted_rooms.rotate_all()  # the revoked device holds our room sessions
        return reply

    def safety_number(self, user: str, timeout: float = 10.0) -> Verification:
        """What to compare aloud with `user`: the safety number over the key pinned for them
        (pinned now on first sight) and, when the server offers another key, that key and its
        number too. Hand the result to mark_verified() once a number matched."""
        check = self.check_key(user, timeout)
        return Verification.of(check, self.user, self.identity.verify_key_bytes)

    def mark_verified(self, shown: Verification, named: str | None = None) -> PinnedKey:
        """Mark verified the key of `shown` that `named` names (the start of its fingerprint;
        None: the pinned key, only when no other was offered). Asks the server nothing, so no
        answer it gives after safety_number() can change which key is marked. Raises
        KeyNotNamed, or NotPinned if the pin changed since `shown`."""
        return self.known_keys.mark_shown_verified(shown, shown.choose(named))

    def _verifier(self) -> EmojiVerifier:
        if self.verifier is None:
            raise ConfigError("this client was made without a device; it cannot compare emoji")
        return self.verifier

    def start_emoji(self, shown: Verification, device: str | None = None) -> EmojiVerification:
        """Ask one of `shown.name`'s devices (`device`, else the one seen last) to compare emoji
        over the pinned key that safety_number() showed. The steps arrive as EmojiVerification
        events; a match marks exactly that key verified. Blocks for the server."""
        return self._verifier().start(shown, device)

    def accept_emoji(self, user: str) -> None:
        """Agree to the emoji comparison `user` asked for (an EmojiVerification "requested")."""
        self._verifier().accept(user)

    def confirm_emoji(self, user: str) -> None:
        """The emoji shown for `user` match the ones on their screen."""
        self._verifier().confirm(user)

    def cancel_emoji(self, user: str, *, mismatch: bool = False) -> None:
        """Stop the emoji comparison with `user`; mismatch=True: the emoji differ."""
        self._verifier().cancel(user, mismatch=mismatch)

    def wait_queue(self, timeout: float | None = None) -> bool:
        """Wait until the DMs that waited for us on the server have all arrived (the server
        sends them right after login); False if that did not happen within `timeout`."""
        return self._queue_delivered.wait(timeout) or self._done.is_set()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until every request sent so far has its reply (or the connection closed); False
        if `timeout` seconds pass without the next reply. Replies come in order, and requests
        paced to the server's rate may take a while in all, so the wait is for progress."""
        for future in self._conn.outstanding():
            try:
                future.exception(timeout=timeout)
            except TimeoutError:
                return False
        return True

    # -- events -----------------------------------------------------------------------------------

    def next_event(self, timeout: float | None = None) -> Event | None:
        """The next event, or None if none came within `timeout` seconds."""
        try:
            return self._events.get(timeout=timeout)
        except queue.Empty:
            return None

    def events(self) -> Iterator[Event]:
        """Every event until (and including) Closed."""
        while True:
            event = self._events.get()
            yield event
            if isinstance(event, Closed):
                return

    @property
    def closed(self) -> bool:
        return self._done.is_set()

    def close(self, timeout: float = 5.0) -> None:
        """Say goodbye, let queued frames go out, and wait for the connection thread."""
        self._conn.close()
        if self._conn.is_alive():
            self._conn.join(timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- connection thread ------------------------------------------------------------------------

    def _on_frame(self, frame: dict[str, Any]) -> None:
        if frame["type"] in _IN_ORDER:
            # In order behind the DMs before it: queue_end means they have all been opened, and
            # a room key arrives before the room message it opens.
            self._track_rooms(frame)
            self._inbox.put(frame)
            return
        event = _event_from_frame(frame)
        if event is not None:
            self._emit(event)

    def _room_frame(self, frame: dict[str, Any]) -> None:
        """A room frame, on the DM thread: shown, then handed to the room keys."""
        rooms = self.encrypted_rooms
        if frame["type"] == JOIN_REPLY:
            try:
                if rooms is not None:
                    rooms.joined_reply(frame["reply"])
            finally:
                frame["read"].set()
            return
        if frame["type"] == "message_encrypted":
            for shown in rooms.message(frame) if rooms is not None else ():
                self._emit(shown)
            return
        if self._another_device_of_mine(frame):
            # Our phone joining or leaving a room is not this device doing it; but a new phone
            # is to get our room keys, so our list is fetched again before they are sent.
            if frame["type"] == "joined" and rooms is not None:
                rooms.refresh_devices(self.user, _str(frame, "device"))
            return
        event = _event_from_frame(frame)
        if rooms is None or event is None:
            if event is not None:
                self._emit(event)
        elif isinstance(event, Joined):
            rooms.joined(event, _str(frame, "device"), self._emit)
        elif isinstance(event, Parted):
            rooms.parted(event, _str(frame, "device"), self._emit)
        else:
            self._emit(rooms.check_plaintext(event) if isinstance(event, Message) else event)

    def _track_rooms(self, frame: dict[str, Any]) -> None:
        # Here, before the join's reply resolves its future: who waits for a join (a rejoin
        # after a reconnect) finds the room in `rooms` at once.
        if frame.get("user") != self.user or self._another_device_of_mine(frame):
            return
        room = frame.get("room")
        if frame["type"] == "joined" and isinstance(room, str) and not valid_room(room):
            self.rooms.add(room)
        elif frame["type"] == "parted" and isinstance(room, str):
            self.rooms.discard(room)

    def _another_device_of_mine(self, frame: dict[str, Any]) -> bool:
        device = frame.get("device")
        return (
            frame["type"] in ("joined", "parted")
            and frame.get("user") == self.user
            and self.dms is not None
            and isinstance(device, str)
            and device != self.dms.state.device_id
        )

    def _emit(self, event: Event) -> None:
        if self.history is not None:
            self._remember(event)
        self._events.put(event)

    def _tick(self) -> None:
        # The SAS module has no timer of its own: end comparisons older than 10 minutes.
        while not self._done.wait(5.0):
            if self.verifier is not None:
                self.verifier.check_timeouts()

    def _receive_loop(self) -> None:
        while (frame := self._inbox.get()) is not None:
            try:
                self._receive(frame)
            except Exception as exc:  # a bad frame must not stop every later DM
                what = "a direct message" if frame["type"] == "dm" else "a room event"
                self._events.put(DeviceWarning(self.user, f"{what} was lost: {exc}"))

    def _receive(self, frame: dict[str, Any]) -> None:
        if frame["type"] == "queue_end":
            self._queue_delivered.set()
        elif frame["type"] == "prekey_count" and self.dms is not None:
            count = frame.get("count")
            if isinstance(count, int) and not isinstance(count, bool):
                self.dms.replenish(count, frame.get("fallback") is True)
        elif frame["type"] == "dm" and self.dms is not None:
            event = self.dms.receive(frame)
            if isinstance(frame.get("msg_id"), str) and not self._done.is_set():
                # Acknowledged once opened and saved, shown or refused, so the server deletes it.
                self._conn.send(
                    self._conn.session.encode({"type": "ack", "msg_ids": [frame["msg_id"]]})
                )
            if isinstance(event, SasRecord):
                if self.verifier is not None:  # never chat text, never in the history
                    self.verifier.receive(event, time.time_ns() // 1_000_000)
            elif isinstance(event, RoomKeyRecord):
                if self.encrypted_rooms is not None:  # never chat text, never in the history
                    self.encrypted_rooms.receive_key(event)
            elif event is not None:
                self._emit(event)
        elif frame["type"] not in ("dm", "prekey_count"):
            self._room_frame(frame)

    def _remember(self, event: Event) -> None:
        if isinstance(event, Message):
            entry = Entry(event.room, event.sender, event.text, event.ts, event.action)
        elif isinstance(event, DirectMessage):
            peer = event.sender if event.sender != self.user else event.recipient
            entry = Entry(f"@{peer}", event.sender, event.text, event.ts, False, event.message_id)
        else:
            return
        self.history.add(entry)  # type: ignore[union-attr]  # only called with a history

    def _on_close(self, reason: str) -> None:
        self._done.set()
        self._inbox.put(None)
        if self._receiver.is_alive() and self._receiver is not threading.current_thread():
            self._receiver.join(5.0)  # the DMs that arrived before the close come first
        self._events.put(Closed(reason))


# Frames read on the DM thread, in arrival order: DMs and their queue, and every room frame (a
# room key comes as a DM just before the room message it opens). JOIN_REPLY is our own marker
# for a join's answer, put in that order by the request's callback.
JOIN_REPLY = "_join_reply"
JOIN_READ_TIMEOUT = 10.0  # seconds a send waits for its room's join answer to be read
_IN_ORDER = frozenset(
    {"dm", "queue_end", "prekey_count", "message", "message_encrypted", "joined", "parted"}
)


def _number(value: Any) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and value > 0
    return float(value) if ok else None


def _str(frame: dict[str, Any], key: str) -> str:
    value = frame.get(key)
    return value if isinstance(value, str) else ""


def _int(frame: dict[str, Any], key: str) -> int:
    value = frame.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


# Room-scoped frames, what they are called in a warning, and the field naming their user.
_ROOM_FRAMES = {
    "message": ("a room message", "from"),
    "joined": ("a join", "user"),
    "parted": ("a part", "user"),
}


def _shown(value: Any) -> str:
    # A short quoted form of whatever the server sent; render() escapes what is left.
    if not isinstance(value, str):
        return "no name"
    return json.dumps(value[:40] + ("..." if len(value) > 40 else ""), ensure_ascii=False)


def _room_frame_problem(frame: dict[str, Any]) -> FrameDropped | None:
    """A warning when a room-scoped frame names no valid room or user. Room lines are filed by
    their room name: one naming "@bob" would land in bob's DM conversation with no seal at all."""
    what, user_field = _ROOM_FRAMES[frame["type"]]
    room, user = frame.get("room"), frame.get(user_field)
    if not isinstance(room, str) or valid_room(room):
        problem = f"for {_shown(room)}, which is not a room name"
    elif not isinstance(user, str) or valid_name(user):
        problem = f"in {room} from {_shown(user)}, which is not a user name"
    else:
        return None
    return FrameDropped(
        frame["type"],
        f"the server sent {what} {problem}; it was dropped. Only sealed messages are shown as"
        " direct messages: the server may be trying to pass one off as a DM",
    )


def _event_from_frame(frame: dict[str, Any]) -> Event | None:
    """Map a server frame to an event; frames of types we do not know are ignored, so a newer
    server can add some. A room frame naming no valid room or user becomes FrameDropped."""
    ftype = frame["type"]
    if ftype in _ROOM_FRAMES and (dropped := _room_frame_problem(frame)) is not None:
        return dropped
    if ftype == "message":
        return Message(
            _str(frame, "room"),
            _str(frame, "from"),
            _str(frame, "text"),
            _int(frame, "ts"),
            frame.get("action") is True,
            frame.get("history") is True,
        )
    if ftype == "joined":
        return Joined(_str(frame, "room"), _str(frame, "user"), _int(frame, "ts"))
    if ftype == "parted":
        return Parted(
            _str(frame, "room"), _str(frame, "user"), _str(frame, "reason"), _int(frame, "ts")
        )
    if ftype == "error":
        return ServerError(_str(frame, "code"), _str(frame, "message"))
    return None
