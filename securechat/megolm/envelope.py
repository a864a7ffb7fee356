"""The encrypted room message the server relays and stores: metadata it needs, and ciphertext.

    room          the room it routes to
    sender_device the sending device's id (the server stamps the sender's user name itself)
    session_id    the Megolm session, so readers find the key
    ciphertext    the Megolm message bytes (base64 on the wire)

The server can alter any of these; readers check them against the session's owner and the
record inside (see inbound).
"""

from __future__ import annotations

from dataclasses import dataclass

from securechat.megolm.record import MAX_PADDED

# A Megolm message is the padded record plus a version byte, index, 16-byte MAC, 64-byte signature.
MAX_CIPHERTEXT = MAX_PADDED + 128


@dataclass(frozen=True)
class RoomCiphertext:
    room: str
    sender_device: str
    session_id: str
    ciphertext: bytes
