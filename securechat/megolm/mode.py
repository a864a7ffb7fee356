"""Each room's mode, end-to-end encrypted or plain, and the no-downgrade rule.

Rule: once this client has seen a room encrypted, the room stays encrypted for it. A server that
later announces the room as plain, or relays a plaintext message into it, is refused, and
nothing is ever sent there in plaintext. A plain room may become encrypted. The remembered modes
are part of the saved state, so the rule holds across restarts.
"""

from __future__ import annotations

import enum
from typing import Any

from securechat.megolm.errors import DowngradeRefused
from securechat.megolm.keys import damaged_state


class RoomMode(enum.Enum):
    ENCRYPTED = "encrypted"
    PLAIN = "plain"

    def label(self) -> str:
        """What the room list and status bar show."""
        return "end-to-end encrypted" if self is RoomMode.ENCRYPTED else "not end-to-end encrypted"


class RoomModes:
    """The mode this client has seen for each room. Not thread-safe: one owner."""

    def __init__(self) -> None:
        self._seen: dict[str, RoomMode] = {}

    def observe(self, room: str, announced: RoomMode) -> RoomMode:
        """The server announced `room` as `announced`; DowngradeRefused for encrypted -> plain."""
        if announced is RoomMode.PLAIN and self._seen.get(room) is RoomMode.ENCRYPTED:
            raise DowngradeRefused(
                f"the server now says {room} is not end-to-end encrypted, but you saw it "
                "encrypted; nothing will be sent there in plaintext and plaintext from it is "
                "not shown"
            )
        self._seen[room] = announced
        return announced

    def mode(self, room: str) -> RoomMode | None:
        return self._seen.get(room)

    def check_plaintext(self, room: str) -> None:
        """Before sending or showing plaintext in `room`: DowngradeRefused if it is encrypted."""
        if self._seen.get(room) is RoomMode.ENCRYPTED:
            raise DowngradeRefused(
                f"{room} is end-to-end encrypted; a plaintext message there was refused"
            )

    def export(self) -> dict[str, str]:
        return {room: mode.value for room, mode in sorted(self._seen.items())}

    @classmethod
    def load(cls, data: Any) -> RoomModes:
        modes = cls()
        if not isinstance(data, dict):
            raise damaged_state("room modes")
        for room, value in data.items():
            if not isinstance(room, str) or value not in {m.value for m in RoomMode}:
                raise damaged_state("room modes")
            modes._seen[room] = RoomMode(value)
        return modes
