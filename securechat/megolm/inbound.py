"""Inbound Megolm sessions per (room, session id), and the checks before a room message shows.

A session belongs to the device that shared it over Olm (or, when forwarded by our own device,
to the owner that device named). A message is shown only when all of these hold, in this order:
  1. we hold its session; if not, it is a "cannot decrypt" marker, never text (sent before we
     joined, or its key has not reached this device);
  2. the sender the server stamped, and the device beside the ciphertext, are the session's owner;
  3. its Megolm index was not seen before for that session (a replay is refused, across restarts);
  4. the owner device is still signed by its user's pinned identity and not revoked;
  5. vodozemac decrypts it and checks the session's Ed25519 signature;
  6. the record inside names the same room, sender and device.
A jump in the index means messages that never arrived: "2 messages from bob in #team are missing".
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import vodozemac

from securechat.megolm import record
from securechat.megolm.envelope import MAX_CIPHERTEXT, RoomCiphertext
from securechat.megolm.errors import (
    ForgedRoomSender,
    KeyShareRefused,
    ReplayedRoomMessage,
    TamperedRoomMessage,
    UntrustedSenderDevice,
)
from securechat.megolm.keys import damaged_state
from securechat.megolm.keyshare import RoomKey
from securechat.megolm.port import DeviceRef

# Indices this far below the highest seen are refused: too old to tell from a replay. Honest
# senders rotate every 100 messages, so this only bounds a hostile sender's memory cost.
REPLAY_WINDOW = 1024


class Undecryptable(enum.Enum):
    BEFORE_JOIN = "sent before you joined"
    NO_KEY = "no key for it on this device yet"


@dataclass(frozen=True)
class DecryptedRoomMessage:
    room: str
    sender: str
    device: str
    message_id: str
    ts: int
    body: str
    session_id: str
    index: int
    notices: tuple[str, ...] = ()  # e.g. messages found missing before this one
    action: bool = False  # a /me line


@dataclass(frozen=True)
class CannotDecrypt:
    """A marker the timeline shows in place of a message; it is never shown as text."""

    room: str
    sender: str
    reason: Undecryptable
    session_id: str

    def notice(self) -> str:
        if self.reason is Undecryptable.BEFORE_JOIN:
            return f"an earlier message from {self.sender} was sent before you joined {self.room}"
        return (
            f"cannot decrypt a message from {self.sender} in {self.room}: this device has no "
            "key for it yet (it may still come from the sender or from your other devices)"
        )


def before_join_note(count: int) -> str:
    """The line shown once above the history a newcomer cannot read."""
    if count == 1:
        return "1 earlier message was sent before you joined"
    return f"{count} earlier messages were sent before you joined"


def missing_note(count: int, sender: str, room: str) -> str:
    if count == 1:
        return f"1 message from {sender} in {room} is missing"
    return f"{count} messages from {sender} in {room} are missing"


@dataclass
class _Inbound:
    owner: DeviceRef
    session: vodozemac.InboundGroupSession
    first_index: int
    highest: int  # the highest index accepted, or first_index - 1
    seen: set[int] = field(default_factory=set)

    def is_replay(self, index: int) -> bool:
        """Seen already, or too far behind the highest index to tell (so refused as a replay)."""
        return index in self.seen or index <= self.highest - REPLAY_WINDOW

    def accept(self, index: int) -> int:
        """Remember index as received; return how many indexes it skipped past the highest."""
        skipped = max(index - self.highest - 1, 0)
        self.seen.add(index)
        if index > self.highest:
            self.highest = index
            if len(self.seen) > REPLAY_WINDOW:
                self.seen = {i for i in self.seen if i > self.highest - REPLAY_WINDOW}
        return skipped


def _check_stamp(owner: DeviceRef, stamped_sender: str, message: RoomCiphertext) -> None:
    """The sender and device the server stamped must be the session's owner."""
    if stamped_sender != owner.user or message.sender_device != owner.device_id:
        raise ForgedRoomSender(
            f"a message in {message.room} stamped as from {stamped_sender} was encrypted by "
            f"{owner.user}'s device {owner.device_id}; it was dropped. The server altered "
            "its sender"
        )


def _parse(message: RoomCiphertext, where: str) -> vodozemac.MegolmMessage:
    if len(message.ciphertext) > MAX_CIPHERTEXT:
        raise TamperedRoomMessage(f"an encrypted message {where} was dropped: it is too large")
    try:
        return vodozemac.MegolmMessage.from_bytes(message.ciphertext)
    except ValueError:
        raise TamperedRoomMessage(
            f"an encrypted message {where} was dropped: it is not a Megolm message"
        ) from None


class InboundStore:
    """Inbound sessions of every room this device reads. One owner thread."""

    def __init__(self) -> None:
        self._sessions: dict[tuple[str, str], _Inbound] = {}

    # -- keys in --------------------------------------------------------------------------------

    def add(self, key: RoomKey) -> bool:
        """Store a room key whose sender was already checked; False if nothing new was learnt."""

        def bad(why: str) -> KeyShareRefused:
            return KeyShareRefused(f"a room key for {key.room} from {key.owner} was refused: {why}")

        try:
            if key.forwarded:
                exported = vodozemac.ExportedSessionKey(key.session_key)
                session = vodozemac.InboundGroupSession.import_session(exported)
            else:
                session = vodozemac.InboundGroupSession(vodozemac.SessionKey(key.session_key))
        except ValueError:
            raise bad("the session key does not decode") from None
        if session.session_id != key.session_id:
            raise bad("the session key does not match its session id")
        if session.first_known_index != key.first_index:
            raise bad("the session key does not start at the index it claims")
        return self._put(key.room, key.owner, session)

    def add_own(self, room: str, owner: DeviceRef, outbound: vodozemac.GroupSession) -> None:
        """Our own new outbound session, so this device reads its own messages back."""
        self._put(room, owner, vodozemac.InboundGroupSession(outbound.session_key))

    def _put(self, room: str, owner: DeviceRef, session: vodozemac.InboundGroupSession) -> bool:
        index = session.first_known_index
        held = self._sessions.get((room, session.session_id))
        if held is None:
            self._sessions[(room, session.session_id)] = _Inbound(owner, session, index, index - 1)
            return True
        if held.owner != owner:
            # The first owner keeps it: a member who received bob's key must not re-share it as
            # their own to have bob's messages shown under their name.
            raise KeyShareRefused(
                f"a room key for {room} from {owner} was refused: it claims a session that "
                f"belongs to {held.owner}"
            )
        if index >= held.first_index:
            return False
        held.session, held.first_index = session, index
        return True

    # -- messages in ----------------------------------------------------------------------------

    def decrypt(
        self,
        stamped_sender: str,
        message: RoomCiphertext,
        *,
        before_join: bool,
        device_problem: Callable[[DeviceRef], str | None],
        history: bool = False,
    ) -> DecryptedRoomMessage | CannotDecrypt:
        """The checked message, a CannotDecrypt marker, or a RoomMessageRefused leaf.

        `before_join` says the server delivered it as room history from before our join; it
        only picks the marker's wording. `device_problem` is the trust check of rule 4.
        `history`: the server delivered it as room history (on a join, or asked for), so an
        index seen before is that same message shown again, not a replay: Megolm signs each
        index's message, so the server cannot pass another one off under it. Such a copy changes
        no replay record and reports no gap.
        """
        room = message.room
        where = f"from {stamped_sender} in {room}"
        megolm = _parse(message, where)
        held = self._sessions.get((room, message.session_id))
        late = Undecryptable.BEFORE_JOIN if before_join else Undecryptable.NO_KEY
        if held is None:
            return CannotDecrypt(room, stamped_sender, late, message.session_id)
        owner = held.owner
        _check_stamp(owner, stamped_sender, message)
        index = megolm.message_index()
        if index < held.first_index:
            return CannotDecrypt(
                room, stamped_sender, Undecryptable.BEFORE_JOIN, held.session.session_id
            )
        again = history and held.is_replay(index)
        if held.is_replay(index) and not again:
            raise ReplayedRoomMessage(
                f"a message {where} was a copy of one already received; it was dropped. The "
                "server is replaying room messages"
            )
        why = device_problem(owner)
        if why:
            raise UntrustedSenderDevice(f"a message {where} was dropped: {why}")
        try:
            plain = held.session.decrypt(megolm)
        except ValueError:
            raise TamperedRoomMessage(
                f"an encrypted message {where} was dropped: its signature or ciphertext does "
                "not verify"
            ) from None
        inner = record.decode(plain.plaintext, where)
        if (inner.room, inner.sender, inner.device) != (room, owner.user, owner.device_id):
            raise ForgedRoomSender(
                f"a message {where} names another room, sender or device inside; it was dropped"
            )
        skipped = 0 if again else held.accept(index)
        notices = (missing_note(skipped, owner.user, room),) if skipped and not history else ()
        return DecryptedRoomMessage(
            room=room,
            sender=inner.sender,
            device=inner.device,
            message_id=inner.message_id,
            ts=inner.ts,
            body=inner.body,
            session_id=message.session_id,
            index=index,
            notices=notices,
            action=inner.action,
        )

    # -- keys out -------------------------------------------------------------------------------

    def export_room(self, room: str) -> list[RoomKey]:
        """Every session of `room`, exported at the first index held, for our own new device."""
        keys = []
        for (key_room, session_id), held in sorted(self._sessions.items()):
            if key_room != room:
                continue
            exported = held.session.export_at(held.first_index)
            if exported is None:  # cannot happen for an index we hold; skip rather than guess
                continue
            keys.append(
                RoomKey(room, held.owner, session_id, exported.to_base64(), held.first_index, True)
            )
        return keys

    def holds(self, room: str, session_id: str) -> bool:
        return (room, session_id) in self._sessions

    # -- state ----------------------------------------------------------------------------------

    def export(self, pickle_key: bytes) -> list[dict[str, Any]]:
        return [
            {
                "room": room,
                "user": held.owner.user,
                "device": held.owner.device_id,
                "pickle": held.session.pickle(pickle_key),
                "first": held.first_index,
                "highest": held.highest,
                "seen": sorted(held.seen),
            }
            for (room, _), held in sorted(self._sessions.items())
        ]

    @classmethod
    def load(cls, items: Any, pickle_key: bytes) -> InboundStore:
        store = cls()
        if not isinstance(items, list):
            raise damaged_state("inbound sessions")
        for item in items:
            try:
                session = vodozemac.InboundGroupSession.from_pickle(item["pickle"], pickle_key)
                held = _Inbound(
                    DeviceRef(str(item["user"]), str(item["device"])),
                    session,
                    int(item["first"]),
                    int(item["highest"]),
                    {int(i) for i in item["seen"]},
                )
                room = str(item["room"])
            except (ValueError, TypeError, KeyError):
                raise damaged_state("an inbound session") from None
            store._sessions[(room, session.session_id)] = held
        return store
