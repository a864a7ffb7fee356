"""Our outbound Megolm session per room: made, used, rotated by the policy, and remembered.

This module decides nothing about who gets keys (membership does) and sends nothing (the
facade hands key shares to the Olm port); it keeps, per room, the vodozemac GroupSession, when it
was made, how many messages it encrypted and which devices already hold it.
"""

from __future__ import annotations

from collections.abc import Iterable, Set
from dataclasses import dataclass, field
from typing import Any

import vodozemac

from securechat.megolm.keys import damaged_state
from securechat.megolm.keyshare import RoomKey
from securechat.megolm.port import DeviceRef
from securechat.megolm.rotation import (
    DEFAULT_POLICY,
    RotationPolicy,
    RotationReason,
    SessionUse,
    rotation_reason,
)


@dataclass
class _Outbound:
    session: vodozemac.GroupSession
    created_at: float
    messages: int = 0
    shared_with: set[DeviceRef] = field(default_factory=set)

    def use(self) -> SessionUse:
        return SessionUse(self.created_at, self.messages, frozenset(self.shared_with))


class OutboundSessions:
    """One owner thread. `me` is this device: the owner of every session here."""

    def __init__(self, me: DeviceRef, policy: RotationPolicy = DEFAULT_POLICY) -> None:
        self.me = me
        self.policy = policy
        self._rooms: dict[str, _Outbound] = {}

    def ready(
        self, room: str, recipients: Set[DeviceRef], now: float
    ) -> tuple[vodozemac.GroupSession, bool, RotationReason | None]:
        """The session to encrypt the next message with: (session, is_new, rotation reason)."""
        held = self._rooms.get(room)
        reason = None if held is None else rotation_reason(held.use(), recipients, now, self.policy)
        if held is None or reason is not None:
            held = _Outbound(vodozemac.GroupSession(), now)
            self._rooms[room] = held
            return held.session, True, reason
        return held.session, False, None

    def unshared(self, room: str, recipients: Iterable[DeviceRef]) -> list[DeviceRef]:
        """The recipients that do not hold the room's current session yet, in a stable order."""
        held = self._rooms[room]
        return sorted(set(recipients) - held.shared_with)

    def room_key(self, room: str) -> RoomKey:
        """The current session as a key share: recipients read from the next message on."""
        session = self._rooms[room].session
        return RoomKey(
            room,
            self.me,
            session.session_id,
            session.session_key.to_base64(),
            session.message_index,
        )

    def mark_shared(self, room: str, device: DeviceRef) -> None:
        self._rooms[room].shared_with.add(device)

    def encrypt(self, room: str, plaintext: bytes) -> tuple[str, bytes]:
        held = self._rooms[room]
        held.messages += 1
        return held.session.session_id, held.session.encrypt(plaintext).to_bytes()

    def discard(self, room: str) -> None:
        """Drop the room's session, so the next message starts a new one."""
        self._rooms.pop(room, None)

    def export(self, pickle_key: bytes) -> list[dict[str, Any]]:
        return [
            {
                "room": room,
                "pickle": held.session.pickle(pickle_key),
                "created": held.created_at,
                "messages": held.messages,
                "shared": sorted([d.user, d.device_id] for d in held.shared_with),
            }
            for room, held in sorted(self._rooms.items())
        ]

    @classmethod
    def load(
        cls, me: DeviceRef, items: Any, pickle_key: bytes, policy: RotationPolicy = DEFAULT_POLICY
    ) -> OutboundSessions:
        sessions = cls(me, policy)
        if not isinstance(items, list):
            raise damaged_state("outbound sessions")
        for item in items:
            try:
                held = _Outbound(
                    vodozemac.GroupSession.from_pickle(item["pickle"], pickle_key),
                    float(item["created"]),
                    int(item["messages"]),
                    {DeviceRef(str(u), str(d)) for u, d in item["shared"]},
                )
                sessions._rooms[str(item["room"])] = held
            except (ValueError, TypeError, KeyError):
                raise damaged_state("an outbound session") from None
        return sessions
