"""End-to-end encrypted rooms on the client: the Megolm core (RoomCrypto) wired to the timeline,
the Olm DM layer and the room-key file beside the key file.

What the timeline displays decides who gets keys: our join reply's member list (shown as a
RoomState) and each `joined`/`parted` event are handed to the core only after they were emitted,
so a member the server adds without an event stays a ghost. The server's announced room mode
goes through the no-downgrade rule; a refusal is shown, never obeyed. One lock guards the core:
the DM receiving thread (room frames, key messages) and the sending thread (encrypt) share it.
Device lists are fetched on those threads, never on the connection's own thread, whose replies
they wait for; the core then reads them from memory (DevicePort). A room's member lists go many
to a request, so a big room holds up the receiving thread for a few requests, not one a member.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from securechat.client.dm import DirectMessages
from securechat.client.events import (
    DeviceWarning,
    Event,
    FrameDropped,
    Joined,
    Message,
    Parted,
    RoomKeyRecord,
    RoomMember,
    RoomState,
    RoomUnreadable,
    RoomWarning,
)
from securechat.client.late import LateMessages
from securechat.e2e import storage
from securechat.errors import ConnectionClosed, DeviceRecordError, SecureChatError
from securechat.megolm import keyshare
from securechat.megolm.envelope import RoomCiphertext
from securechat.megolm.errors import (
    DowngradeRefused,
    ForgedRoomSender,
    KeyShareRefused,
    ReplayedRoomMessage,
    RoomCryptoError,
    RoomMessageRefused,
    RoomStateError,
    TamperedRoomMessage,
    UntrustedSenderDevice,
)
from securechat.megolm.inbound import CannotDecrypt, Undecryptable, before_join_note
from securechat.megolm.membership import Exclusion
from securechat.megolm.mode import RoomMode
from securechat.megolm.port import DEVICE_ID_RE, DeviceRef
from securechat.megolm.rooms import RoomCrypto
from securechat.protocol import LOBBY, valid_name, valid_room
from securechat.trust import KnownKeys

Request = Callable[..., "Future[dict[str, Any]]"]

KEY_SHARE_TIMEOUT = 10.0  # seconds to wait for the server to take a message's key shares
SESSION_ID_RE = re.compile(r"[A-Za-z0-9+/=_-]{1,128}")
_UNKNOWN_DEVICE = ""  # a member listed at our join: which of their devices is there is not said

# What each refusal is called in a RoomWarning (stable words for UIs and tests).
REFUSAL_KINDS: tuple[tuple[type[RoomMessageRefused], str], ...] = (
    (ReplayedRoomMessage, "replayed"),
    (ForgedRoomSender, "forged_sender"),
    (UntrustedSenderDevice, "untrusted_device"),
    (TamperedRoomMessage, "tampered"),
    (RoomMessageRefused, "tampered"),
)


@dataclass(frozen=True)
class PortDevice:
    """A device record the DM layer checked, as the room core sees it (megolm.port.DeviceInfo)."""

    user: str
    device_id: str
    identity_key: bytes
    revoked: bool


class DevicePort:
    """The room core's OlmPort over DirectMessages: device lists from memory (fetched and
    checked against the pinned key when they arrive), room keys sent to exactly one device."""

    def __init__(self, dms: DirectMessages, known_keys: KnownKeys, warn: Callable[[Event], None]):
        self._dms = dms
        self._known = known_keys
        self._warn = warn
        self.sent: list[Future[dict[str, Any]]] = []  # the key shares of the message under way

    def devices(self, user: str) -> list[PortDevice]:
        found = self._dms.known_list(user)
        if found is None:
            return []
        listed = [PortDevice(user, d.device_id, d.identity_key, False) for d in found.devices]
        # A revocation verified against the same key the records were.
        key = self._dms.identity.verify_key_bytes if user == self._dms.user else None
        key = key or self._known.pinned(user) or b""
        return listed + [PortDevice(user, device_id, key, True) for device_id in found.revoked]

    def send_to_device(self, user: str, device_id: str, payload: bytes) -> None:
        refused = self.send_to_devices([DeviceRef(user, device_id)], payload)
        if refused:
            raise DeviceRecordError(next(iter(refused.values())))

    def send_to_devices(self, devices: Sequence[DeviceRef], payload: bytes) -> dict[DeviceRef, str]:
        """The room key to each device, in as few `dms` requests as fit (their futures join
        `sent`); the devices it could not go to, each with the reason."""
        refused: dict[DeviceRef, str] = {}
        targets = []
        for ref in devices:
            target = self._dms.known_device(ref.user, ref.device_id)
            if target is None:
                refused[ref] = f"{ref.user}'s device {ref.device_id} is not a checked device"
            else:
                targets.append(target)
        sent, unsent = self._dms.send_room_keys(targets, payload.decode("utf-8"))
        refused.update({DeviceRef(t.user, t.device_id): why for t, why in unsent})
        for target, future in sent:
            self.sent.append(future)
            future.add_done_callback(functools.partial(self._lost, target.user, target.device_id))
        return refused

    def _lost(self, user: str, device_id: str, future: Future[dict[str, Any]]) -> None:
        exc = future.exception()
        if exc is not None:
            self._warn(
                DeviceWarning(user, f"a room key for {user}'s device {device_id} was lost: {exc}")
            )


class EncryptedRooms:
    """The encrypted rooms of one logged-in device; thread-safe (one lock over the core)."""

    def __init__(
        self, dms: DirectMessages, known_keys: KnownKeys, emit: Callable[[Event], None]
    ) -> None:
        self._dms = dms
        self.user = dms.user
        self._emit = emit
        self._identity = dms.identity
        self._lock = threading.RLock()
        self.port = DevicePort(dms, known_keys, emit)
        blob, self._strict = _load(self._identity)
        self.crypto = RoomCrypto(
            self._identity, dms.state.device_id, known_keys, self.port, user=self.user, state=blob
        )
        # Per room: the server's member list (None: not known, or cut short), the devices of each
        # member the timeline showed present, the before-join markers not yet summed up, the
        # warnings already shown (each is shown once), and the rooms whose keys we asked for.
        self._listed: dict[str, set[str] | None] = {}
        self._present: dict[str, dict[str, set[str]]] = {}
        self._earlier: dict[str, int] = {}
        self._warned: dict[str, set[str]] = {}
        self._asked: set[str] = set()
        # Members seen joining an encrypted room from a device not in their list as last
        # fetched: their lists are fetched, all in one request, before our next send there.
        self._unchecked: set[str] = set()
        self._late = LateMessages()  # live messages shown as markers, until their key comes

    # -- modes ----------------------------------------------------------------------------------

    def mode(self, room: str) -> RoomMode | None:
        # Without the lock: a status bar asks while a send may hold it waiting for the server;
        # one dict read is atomic, and a mode only ever becomes stricter. #lobby, which the
        # server joins us to with no reply of ours, is plain by the protocol's rule.
        seen = self.crypto.modes.mode(room)
        return RoomMode.PLAIN if seen is None and room == LOBBY else seen

    def observe_mode(self, room: str, announced: Any) -> RoomMode | None:
        """The server said `room` is `announced` ("encrypted"/"plain"): the mode we now hold for
        it. A downgrade is refused and shown (the room stays encrypted)."""
        if announced not in ("encrypted", "plain") or not isinstance(room, str) or valid_room(room):
            return self.mode(room) if isinstance(room, str) else None
        with self._lock:
            before = self.crypto.modes.mode(room)
            try:
                self.crypto.modes.observe(room, RoomMode(announced))
            except DowngradeRefused as exc:
                self._warn_once(room, "downgrade", str(exc))
            if self.crypto.modes.mode(room) is not before:
                self._save()
            return self.crypto.modes.mode(room)

    def check_plaintext(self, message: Message) -> Message | RoomWarning:
        """A plain room message, or a refusal when its room was seen encrypted."""
        with self._lock:
            try:
                self.crypto.modes.check_plaintext(message.room)
            except DowngradeRefused as exc:
                return RoomWarning(
                    message.room,
                    "downgrade",
                    f"a message from {message.sender} arriving in clear was refused: {exc}",
                    message.sender,
                )
        return message

    # -- membership (from the timeline) ---------------------------------------------------------

    def joined_reply(self, reply: dict[str, Any]) -> None:
        """Our join's answer: the room's mode and member list (which the RoomState shows)."""
        room = reply.get("room")
        if not isinstance(room, str) or valid_room(room):
            return
        mode = self.observe_mode(room, reply.get("mode"))
        members = [
            m for m in _list(reply.get("members")) if isinstance(m, str) and not valid_name(m)
        ]
        complete = reply.get("truncated") is not True
        if mode is RoomMode.ENCRYPTED:  # their keys pinned first: the RoomState shows marks
            self._fetch_devices([*members, self.user])
        with self._lock:
            present = self._present.setdefault(room, {})
            membership = self.crypto.membership(room)
            membership.strict = room in self._strict
            for user in members:
                present.setdefault(user, set()).add(_UNKNOWN_DEVICE)
            self._listed[room] = set(members) if complete else None
            # Shown by the RoomState below, emitted under the same lock.
            for user in members:
                membership.shown_joined(user)
            listed = self._listed[room]
            if listed is not None:
                membership.server_members(listed)
            if mode is not None:  # a server that announces no mode predates encrypted rooms
                self._emit(self._state(room))

    def joined(self, event: Joined, device: str, show: Callable[[Event], None]) -> None:
        """Show a `joined` event, then count its user as shown joined. Under the lock, so a
        message sent by someone who saw the event already encrypts to them."""
        room, user = event.room, event.user
        with self._lock:
            show(event)
            if user == self.user:
                self._flush_earlier(room, ask=True)
            elif self.mode(room) is RoomMode.ENCRYPTED:
                self.refresh_devices(user, device)
            self._present.setdefault(room, {}).setdefault(user, set()).add(device)
            listed = self._listed.get(room)
            if listed is not None:
                listed.add(user)
                self.crypto.membership(room).server_members(listed)
            self.crypto.membership(room).shown_joined(user)

    def parted(self, event: Parted, device: str, show: Callable[[Event], None]) -> None:
        """Show a `parted` event: the member is gone once their last device is (so the next
        message starts a new session). Under the lock, as joined()."""
        room, user = event.room, event.user
        with self._lock:
            show(event)
            membership = self.crypto.membership(room)
            if user == self.user:  # we left: what we knew of the room is stale
                for member in self._present.pop(room, {}):
                    membership.shown_left(member)
                self._listed.pop(room, None)
                membership.server_members(())
                return
            devices = self._present.setdefault(room, {}).get(user, set())
            devices.discard(device if device in devices else _UNKNOWN_DEVICE)
            if devices:
                return
            self._present[room].pop(user, None)
            membership.shown_left(user)
            listed = self._listed.get(room)
            if listed is not None:
                listed.discard(user)
                membership.server_members(listed)

    def member_list(self, reply: dict[str, Any]) -> list[RoomMember]:
        """A `who` reply: its mode observed, its list taken as the server's (a name on it that
        the timeline never showed joining is a ghost, warned about); the marked member list."""
        room = reply.get("room")
        if not isinstance(room, str) or valid_room(room):
            return []
        if self.observe_mode(room, reply.get("mode")) is not RoomMode.ENCRYPTED:
            return []
        names = [m for m in _list(reply.get("members")) if isinstance(m, str) and not valid_name(m)]
        with self._lock:
            membership = self.crypto.membership(room)
            if reply.get("truncated") is not True and room in self._present:
                self._listed[room] = set(names)
                membership.server_members(names)
            for warning in membership.warnings():
                self._warn_once(room, "ghost", warning)
            return self.members(room)

    def members(self, room: str) -> list[RoomMember]:
        """The member list with trust marks (verified, pinned, new, changed) and ghosts."""
        with self._lock:
            ghosts = self.crypto.membership(room).ghosts()
            return [
                RoomMember(m.user, m.mark.value, m.gets_keys, m.user in ghosts)
                for m in self.crypto.members(room)
            ]

    def strict(self, room: str) -> bool:
        with self._lock:
            return room in self._strict

    def set_strict(self, room: str, on: bool) -> RoomState:
        """Share `room`'s keys only with verified members (on), or with every pinned one."""
        with self._lock:
            if self.crypto.modes.mode(room) is not RoomMode.ENCRYPTED:
                raise RoomCryptoError(
                    f"{room} is not end-to-end encrypted; strict applies to encrypted rooms only"
                )
            (self._strict.add if on else self._strict.discard)(room)
            self.crypto.membership(room).strict = on
            self._save()
            return self._state(room)

    def rotate_all(self) -> None:
        """After one of our devices was revoked: every room starts a new session."""
        with self._lock:
            for room, mode in self.crypto.modes.export().items():
                if mode == RoomMode.ENCRYPTED.value:
                    self.crypto.rotate(room)
            self._save()

    # -- sending --------------------------------------------------------------------------------

    def send(
        self, room: str, text: str, request: Request, *, action: bool = False
    ) -> Future[dict[str, Any]]:
        """Encrypt `text` for `room` (a /me line when `action`): key shares go out first (as
        one-device DMs), then the `say_encrypted`. Blocks while it fetches device lists and
        prekeys."""
        with self._lock:
            users = self.crypto.membership(room).key_members() | {self.user}
            stale = users & self._unchecked
            self._unchecked -= stale
        self._fetch_devices(
            sorted(u for u in users if u in stale or self._dms.known_list(u) is None)
        )
        with self._lock:
            if self.crypto.modes.mode(room) is not RoomMode.ENCRYPTED:
                raise RoomCryptoError(f"{room} is not end-to-end encrypted")
            self.port.sent.clear()
            out = self.crypto.encrypt(room, text, action=action)
            self._save()
            self._report_plan(room, out.excluded, out.warnings)
            message = out.message
            # The server hands a DM on after a store look-up but relays a room message at once:
            # the message goes once the server took every key share (a lost one is warned about).
            for share in self.port.sent:
                try:
                    share.exception(KEY_SHARE_TIMEOUT)
                except TimeoutError:
                    break
            self.port.sent.clear()
            return request(
                "say_encrypted",
                room=room,
                session_id=message.session_id,
                ciphertext=base64.b64encode(message.ciphertext).decode("ascii"),
            )

    def _report_plan(
        self, room: str, excluded: Iterable[Exclusion], warnings: Iterable[str]
    ) -> None:
        ghosts = set(self.crypto.membership(room).warnings())
        for warning in warnings:
            self._warn_once(room, "ghost" if warning in ghosts else "excluded", warning)
        for out in excluded:
            device = f"'s device {out.device_id}" if out.device_id else ""
            self._warn_once(
                room,
                "excluded",
                f"{out.user}{device} gets no keys for {room}: {out.reason}",
                out.user,
            )

    # -- reading --------------------------------------------------------------------------------

    def message(self, frame: dict[str, Any]) -> list[Event]:
        """A `message_encrypted` frame (live or history-on-join) as the events to show; the
        history-on-join ones sent before we joined are summed up at our `joined` event."""
        return self._read(frame, collect=frame.get("history") is True)

    def _read(self, frame: dict[str, Any], *, collect: bool) -> list[Event]:
        parsed = _parse_frame(frame)
        if isinstance(parsed, FrameDropped):
            return [parsed]
        sender, message, ts, history = parsed
        if self._dms.known_list(sender) is None:
            self._fetch_devices([sender])
        with self._lock:
            return self._decrypt(sender, message, ts, history, collect=collect)

    def history_entry(self, frame: dict[str, Any]) -> list[Event]:
        """One `message_encrypted` entry of a `history` reply; the messages sent before we
        joined are counted, for history_summary() to sum up after the last entry."""
        return self._read({**frame, "history": True}, collect=True)

    def history_summary(self, room: str) -> list[Event]:
        """The line summing up the history entries of `room` sent before we joined."""
        return self._flush_earlier(room, ask=False, emit=False)

    def _decrypt(
        self, sender: str, message: RoomCiphertext, ts: int, history: bool, *, collect: bool
    ) -> list[Event]:
        room = message.room
        try:
            result = self.crypto.decrypt(sender, message, before_join=history, history=history)
        except RoomMessageRefused as exc:
            self._save()
            kind = next(k for cls, k in REFUSAL_KINDS if isinstance(exc, cls))
            return [RoomWarning(room, kind, str(exc), sender)]
        if isinstance(result, CannotDecrypt):
            if result.reason is Undecryptable.NO_KEY and not history:
                self._late.hold(sender, message, ts)
            return self._marker(result, history, collect)
        self._save()
        events: list[Event] = [
            RoomWarning(room, "missing", note, sender) for note in result.notices
        ]
        events.append(
            Message(
                room, result.sender, result.body, ts, result.action, history, True, result.device
            )
        )
        return events

    def _marker(self, marker: CannotDecrypt, history: bool, collect: bool) -> list[Event]:
        room = marker.room
        if collect and marker.reason is Undecryptable.BEFORE_JOIN:
            self._earlier[room] = self._earlier.get(room, 0) + 1
            return []
        events: list[Event] = [
            RoomUnreadable(
                room, marker.sender, _REASONS[marker.reason], marker.notice(), history=history
            )
        ]
        if marker.reason is Undecryptable.NO_KEY:
            events += self._ask_siblings(room)
        return events

    def _flush_earlier(self, room: str, *, ask: bool, emit: bool = True) -> list[Event]:
        """The before-join markers collected for `room` as one line; with `ask`, our other
        devices are asked for the keys (a new device reads what its siblings can)."""
        with self._lock:
            count = self._earlier.pop(room, 0)
            if not count:
                return []
            events: list[Event] = [
                RoomUnreadable(room, "", "before_join", before_join_note(count), count, True)
            ]
            if ask:
                events += self._ask_siblings(room)
        if emit:
            for event in events:
                self._emit(event)
        return events

    def _ask_siblings(self, room: str) -> list[Event]:
        if room in self._asked:
            return []
        self._fetch_devices([self.user])
        asked = self.crypto.request_keys(room)
        if not asked:
            return []
        self._asked.add(room)
        names = ", ".join(d.device_id for d in asked)
        return [
            RoomWarning(room, "keys", f"asked your other devices ({names}) for the keys of {room}")
        ]

    # -- key messages over Olm --------------------------------------------------------------------

    def receive_key(self, record: RoomKeyRecord) -> None:
        """A room-key message from one device (the DM layer authenticated it)."""
        sender = DeviceRef(record.sender, record.sender_device)
        payload = record.body.encode("utf-8")
        try:
            item = keyshare.parse(payload, sender)
        except KeyShareRefused as exc:
            # No room to file it under: the line says what follows and what to do.
            self._emit(
                RoomWarning("", "key_refused", unreadable_key_note(exc, sender), sender.user)
            )
            return
        room = item.room
        with self._lock:
            try:
                notes = self.crypto.receive_to_device(sender, payload)
            except KeyShareRefused as exc:
                self._emit(RoomWarning(room, "key_refused", str(exc), record.sender))
                return
            finally:
                self._save()
            for note in notes:
                self._emit(RoomWarning(room, "keys", note))
            if isinstance(item, keyshare.RoomKey):
                self._open_late(room, item.session_id)
            if isinstance(item, keyshare.RoomKey) and item.forwarded and room in self._asked:
                self._asked.discard(room)
                self._emit(
                    RoomWarning(
                        room,
                        "keys",
                        f"your device {record.sender_device} sent the keys of {room}; "
                        f"/history {room} shows the messages they open",
                    )
                )

    def _open_late(self, room: str, session_id: str) -> None:
        """Show, marked late and in the order they came, the live messages that were markers
        until this session's key came (a refusal among them is shown as one)."""
        held = self._late.take(room, session_id)
        if not held:
            return
        senders = ", ".join(sorted({h.sender for h in held}))
        count = f"{len(held)} message{'s' if len(held) != 1 else ''}"
        self._emit(
            RoomWarning(
                room,
                "keys",
                f"the key for {count} from {senders} in {room} came after them; they follow, "
                "marked late",
            )
        )
        for h in held:
            for event in self._decrypt(h.sender, h.message, h.ts, False, collect=False):
                if isinstance(event, RoomUnreadable):
                    continue  # still unreadable: its marker was shown already
                self._emit(
                    dataclasses.replace(event, late=True) if isinstance(event, Message) else event
                )

    # -- internals ------------------------------------------------------------------------------

    def refresh_devices(self, user: str, device: str = "") -> None:
        """`user`'s `device` was seen joining a room: unless their list as last fetched has it,
        fetch the list again before our next send there, with every other list that needs it.

        Not at once: a list is needed only to encrypt to its devices (a message from them
        fetches its sender's list as it comes), and a room of N filling up one join at a time
        would cost each member a request a join, N² in all. A key the server changed still
        keeps its user from getting keys, warned about at the send that leaves them out."""
        if device and self._dms.known_device(user, device) is not None:
            return
        with self._lock:
            self._unchecked.add(user)

    def _fetch_devices(self, users: Iterable[str]) -> None:
        """Fetch and check device lists, many a request (blocking; never on the connection's
        thread)."""
        wanted = list(users)
        if not wanted:
            return
        try:
            failed: dict[str, Exception] = self._dms.fetch_lists(wanted)
        except ConnectionClosed:
            return  # the Closed event says so
        except (SecureChatError, TimeoutError) as exc:
            failed = dict.fromkeys(wanted, exc)
        for user, why in failed.items():
            self._emit(DeviceWarning(user, f"the devices of {user} could not be checked: {why}"))

    def _state(self, room: str) -> RoomState:
        mode = self.crypto.modes.mode(room) or RoomMode.PLAIN
        members = tuple(self.members(room)) if mode is RoomMode.ENCRYPTED else ()
        return RoomState(room, mode.value, mode.label(), room in self._strict, members)

    def state(self, room: str) -> RoomState:
        with self._lock:
            return self._state(room)

    def _warn_once(self, room: str, kind: str, detail: str, user: str = "") -> None:
        seen = self._warned.setdefault(room, set())
        if detail not in seen:
            seen.add(detail)
            self._emit(RoomWarning(room, kind, detail, user))

    def _save(self) -> None:
        storage.save_rooms(
            self._identity,
            {
                "crypto": base64.b64encode(self.crypto.export_state()).decode("ascii"),
                "strict": sorted(self._strict),
            },
        )


_REASONS = {Undecryptable.BEFORE_JOIN: "before_join", Undecryptable.NO_KEY: "no_key"}


def unreadable_key_note(refusal: KeyShareRefused, sender: DeviceRef) -> str:
    """The line for a key message refused before its room could be read."""
    user = sender.user
    return (
        f"{refusal}. Which room it was for cannot be read, so messages it should open will show "
        f"as unreadable. Ask {user} to update securechat on device {sender.device_id}; if "
        f"{user} did not send it, compare safety numbers: /verify {user}"
    )


def _load(identity: Any) -> tuple[bytes | None, set[str]]:
    saved = storage.load_rooms(identity)
    if saved is None:
        return None, set()
    try:
        blob = base64.b64decode(saved["crypto"], validate=True)
        strict = {str(r) for r in saved["strict"] if not valid_room(str(r))}
    except (KeyError, TypeError, ValueError, binascii.Error):
        raise RoomStateError(
            f"the room key file {storage.rooms_path(identity)} is damaged; move it aside to "
            "start afresh"
        ) from None
    return blob, strict


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _dropped(why: str) -> FrameDropped:
    return FrameDropped(
        "message_encrypted", f"the server sent an encrypted room message {why}; it was dropped"
    )


def _parse_frame(frame: dict[str, Any]) -> tuple[str, RoomCiphertext, int, bool] | FrameDropped:
    """The checked fields of a `message_encrypted` frame, or why it is dropped."""
    room, sender, device = frame.get("room"), frame.get("from"), frame.get("device")
    session_id, data, ts = frame.get("session_id"), frame.get("ciphertext"), frame.get("ts")
    if not isinstance(room, str) or valid_room(room) or room == LOBBY:
        return _dropped("for something that is not an encrypted room")
    if not isinstance(sender, str) or valid_name(sender):
        return _dropped(f"in {room} from something that is not a user name")
    if not isinstance(device, str) or not DEVICE_ID_RE.fullmatch(device):
        return _dropped(f"in {room} from {sender} with a malformed device id")
    if not isinstance(session_id, str) or not SESSION_ID_RE.fullmatch(session_id):
        return _dropped(f"in {room} from {sender} with a malformed session id")
    try:
        ciphertext = base64.b64decode(data if isinstance(data, str) else "", validate=True)
    except (binascii.Error, ValueError):
        ciphertext = b""
    if not ciphertext:
        return _dropped(f"in {room} from {sender} whose ciphertext is not base64")
    stamp = ts if isinstance(ts, int) and not isinstance(ts, bool) else 0
    message = RoomCiphertext(room, device, session_id, ciphertext)
    return sender, message, stamp, frame.get("history") is True
