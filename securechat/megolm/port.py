"""What the room core needs from the Olm device layer, as an interface (typing.Protocol).

The Olm layer owns device records and pairwise Olm sessions. The room core only asks it two
things: the devices it knows for a user, each with the identity key whose signature over the
device record it checked, and to carry a payload to one device inside an Olm message (or the same
payload to many devices, each in its own Olm message, in as few requests as it can). Inbound,
the Olm layer hands each decrypted to-device payload to RoomCrypto.receive_to_device together
with the authenticated sending device.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

# The form of a device id on the wire; the Olm layer must issue ids in this form.
DEVICE_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True, order=True)
class DeviceRef:
    """One device of one user: the unit that receives room keys."""

    user: str
    device_id: str

    def __str__(self) -> str:
        return f"{self.user}/{self.device_id}"


class DeviceInfo(Protocol):
    """A device record the Olm layer accepted: its signature by `identity_key` is valid.

    Whether `identity_key` is the key we pinned for `user` is the room core's check, not the Olm
    layer's: a server can hand out a device signed by a key of its own.
    """

    @property
    def user(self) -> str: ...

    @property
    def device_id(self) -> str: ...

    @property
    def identity_key(self) -> bytes: ...

    @property
    def revoked(self) -> bool: ...


class OlmPort(Protocol):
    """The Olm device layer, seen from the room core."""

    def devices(self, user: str) -> Sequence[DeviceInfo]:
        """Every device record of `user` with a valid signature (revoked ones flagged).

        Called for every member on every room message sent and once per message read, so it
        must answer from memory: check signatures when records arrive, not here."""
        ...

    def send_to_device(self, user: str, device_id: str, payload: bytes) -> None:
        """Encrypt `payload` in the Olm session with that device (making one if needed) and
        queue it for delivery. Raises a SecureChatError if no session can be made."""
        ...

    def send_to_devices(self, devices: Sequence[DeviceRef], payload: bytes) -> dict[DeviceRef, str]:
        """send_to_device to each of `devices`, batched as the transport allows (a room key to
        every member's devices, one message's worth). Returns the devices no session could be
        made with, each with the reason; the others were queued."""
        ...
