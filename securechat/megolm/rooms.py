"""The room-crypto facade the client drives: modes, memberships, sending, reading, key traffic.

It holds no socket. The client wiring feeds it what the timeline displayed (joins, leaves, the
member list), the server's room mode, encrypted room messages and Olm to-device payloads; it
returns what to send and what to show. Key shares go out through the OlmPort before encrypt()
returns (all of one message's in one send_to_devices call, so the port can batch them), so the
wiring must send queued to-device messages before the room message itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from securechat.errors import SecureChatError
from securechat.identity import Identity
from securechat.megolm import keyshare, record
from securechat.megolm.envelope import RoomCiphertext
from securechat.megolm.errors import KeyShareRefused, RoomCryptoError
from securechat.megolm.forwarding import own_devices, sibling_problem
from securechat.megolm.inbound import CannotDecrypt, DecryptedRoomMessage, InboundStore
from securechat.megolm.keys import StateBox, damaged_state
from securechat.megolm.membership import Exclusion, MemberView, RoomMembership, Trust
from securechat.megolm.mode import RoomModes
from securechat.megolm.outbound import OutboundSessions
from securechat.megolm.port import DeviceRef, OlmPort
from securechat.megolm.rotation import DEFAULT_POLICY, RotationPolicy, RotationReason
from securechat.sealing import new_message_id
from securechat.trust import KnownKeys


@dataclass(frozen=True)
class OutgoingRoomMessage:
    message: RoomCiphertext  # hand to the server after the key shares
    record: record.RoomRecord  # what we sent, for our own timeline
    rotated: RotationReason | None  # why a new session was started, if one was
    shared_to: tuple[DeviceRef, ...]  # devices sent the key with this message
    excluded: tuple[Exclusion, ...]  # members and devices left out, and why
    warnings: tuple[str, ...]  # ghosts, foreign-signed devices, undeliverable shares


class RoomCrypto:
    """All encrypted rooms of one device. One owner thread (the client's session thread)."""

    def __init__(
        self,
        identity: Identity,
        device_id: str,
        known: KnownKeys,
        port: OlmPort,
        *,
        user: str | None = None,
        policy: RotationPolicy = DEFAULT_POLICY,
        clock: Callable[[], float] = time.time,
        state: bytes | None = None,
    ) -> None:
        name = user or identity.user
        if not name:
            raise RoomCryptoError("an identity without a user name cannot hold room keys")
        self.me = DeviceRef(name, device_id)
        self.trust = Trust(self.me, identity.verify_key_bytes, known, port)
        self._port = port
        self._clock = clock
        self._box = StateBox(identity)
        self._memberships: dict[str, RoomMembership] = {}
        if state is None:
            self.modes = RoomModes()
            self._outbound = OutboundSessions(self.me, policy)
            self._inbound = InboundStore()
        else:
            saved = self._box.open(state)
            try:
                modes, outbound, inbound = saved["modes"], saved["outbound"], saved["inbound"]
            except KeyError:
                raise damaged_state("a table is missing") from None
            key = self._box.pickle_key
            self.modes = RoomModes.load(modes)
            self._outbound = OutboundSessions.load(self.me, outbound, key, policy)
            self._inbound = InboundStore.load(inbound, key)

    # -- membership -----------------------------------------------------------------------------

    def membership(self, room: str) -> RoomMembership:
        """The room's membership: tell it what the timeline displayed and the server's list."""
        if room not in self._memberships:
            self._memberships[room] = RoomMembership(room)
        return self._memberships[room]

    def members(self, room: str) -> list[MemberView]:
        """The member list to display, each marked verified, pinned, new or changed."""
        return self.trust.members(self.membership(room), self._clock)

    # -- sending --------------------------------------------------------------------------------

    def encrypt(
        self, room: str, body: str, *, message_id: str | None = None, action: bool = False
    ) -> OutgoingRoomMessage:
        """Share the room key where needed, then encrypt `body` for `room` (a /me line when
        `action`)."""
        rec = record.RoomRecord(
            room=room,
            sender=self.me.user,
            device=self.me.device_id,
            message_id=message_id or new_message_id(),
            ts=int(self._clock() * 1000),
            body=body,
            action=action,
        )
        plaintext = record.encode(rec)  # refuse a bad message before any key goes out
        plan = self.trust.plan(self.membership(room))
        session, is_new, reason = self._outbound.ready(room, plan.devices, self._clock())
        if is_new:
            self._inbound.add_own(room, self.me, session)
        payload = keyshare.encode(self._outbound.room_key(room))
        shared, failed = [], []
        unshared = list(self._outbound.unshared(room, plan.devices))
        refused = self._port.send_to_devices(unshared, payload) if unshared else {}
        for device in unshared:
            if device in refused:
                failed.append(
                    f"the room key for {room} could not go to {device}: {refused[device]}"
                )
                continue
            self._outbound.mark_shared(room, device)
            shared.append(device)
        session_id, ciphertext = self._outbound.encrypt(room, plaintext)
        return OutgoingRoomMessage(
            message=RoomCiphertext(room, self.me.device_id, session_id, ciphertext),
            record=rec,
            rotated=reason,
            shared_to=tuple(shared),
            excluded=plan.excluded,
            warnings=plan.warnings + tuple(failed),
        )

    def rotate(self, room: str) -> None:
        """Start a new session with the next message (e.g. after /revoke of one of our devices)."""
        self._outbound.discard(room)

    # -- reading --------------------------------------------------------------------------------

    def decrypt(
        self,
        stamped_sender: str,
        message: RoomCiphertext,
        *,
        before_join: bool = False,
        history: bool = False,
    ) -> DecryptedRoomMessage | CannotDecrypt:
        """A checked room message or a marker; a RoomMessageRefused leaf when it is refused.
        `history`: delivered as room history, where a message seen before may come again."""
        return self._inbound.decrypt(
            stamped_sender,
            message,
            before_join=before_join,
            device_problem=lambda d: self.trust.device_problem(d.user, d.device_id),
            history=history,
        )

    # -- to-device key traffic ------------------------------------------------------------------

    def receive_to_device(self, sender: DeviceRef, payload: bytes) -> tuple[str, ...]:
        """An Olm payload from `sender` (the Olm layer authenticated it): store or answer it.

        Returns notices to show; raises KeyShareRefused when the payload is refused.
        """
        item = keyshare.parse(payload, sender)
        if isinstance(item, keyshare.KeyRequest):
            return self._answer_request(sender, item.room)
        where = f"a room key for {item.room} from {sender} was refused"
        if item.forwarded:
            why = sibling_problem(self.trust, sender)
            if why:
                raise KeyShareRefused(f"{where}: {why}")
        else:
            if item.owner != sender:
                raise KeyShareRefused(f"{where}: it names {item.owner} as its sender")
            why = self.trust.device_problem(sender.user, sender.device_id)
            if why:
                raise KeyShareRefused(f"{where}: {why}")
        self._inbound.add(item)
        return ()

    def request_keys(self, room: str) -> tuple[DeviceRef, ...]:
        """Ask our other devices for `room`'s keys (a new device, or a message we cannot read)."""
        payload = keyshare.encode(keyshare.KeyRequest(room))
        asked = []
        for device in own_devices(self.trust):
            try:
                self._port.send_to_device(device.user, device.device_id, payload)
            except SecureChatError:
                continue  # another sibling may answer
            asked.append(device)
        return tuple(asked)

    def _answer_request(self, sender: DeviceRef, room: str) -> tuple[str, ...]:
        why = sibling_problem(self.trust, sender)
        if why:
            raise KeyShareRefused(
                f"a request for the keys of {room} from {sender} was refused: {why}"
            )
        keys = self._inbound.export_room(room)
        for key in keys:
            self._port.send_to_device(sender.user, sender.device_id, keyshare.encode(key))
        return (f"sent {len(keys)} room keys for {room} to your device {sender.device_id}",)

    # -- state ----------------------------------------------------------------------------------

    def export_state(self) -> bytes:
        """Everything to keep across restarts, sealed under keys only this identity derives."""
        key = self._box.pickle_key
        return self._box.seal(
            {
                "modes": self.modes.export(),
                "outbound": self._outbound.export(key),
                "inbound": self._inbound.export(key),
            }
        )
