"""The exception leaves of encrypted rooms; each message is the line a front end shows.

No message ever holds a room key, a session key or a decrypted body.
"""

from __future__ import annotations

from securechat.errors import SecureChatError


class RoomCryptoError(SecureChatError):
    """A problem with an end-to-end encrypted room."""


class DowngradeRefused(RoomCryptoError):
    """The room was seen encrypted; plaintext there is refused, whatever the server says."""


class InvalidRoomRecord(RoomCryptoError):
    """We cannot encrypt this: a bad room, name, device, id, time or text on our side."""


class KeyShareRefused(RoomCryptoError):
    """A room key (shared, forwarded or requested) over Olm was refused."""


class RoomMessageRefused(RoomCryptoError):
    """An encrypted room message was refused; it is never shown as text."""


class ReplayedRoomMessage(RoomMessageRefused):
    """A room message whose Megolm index was already seen for that sender's session."""


class ForgedRoomSender(RoomMessageRefused):
    """The sender stamped on a room message, or named inside it, is not the session's owner."""


class TamperedRoomMessage(RoomMessageRefused):
    """The ciphertext does not verify or decrypt, or the record inside is malformed."""


class UntrustedSenderDevice(RoomMessageRefused):
    """The session's device is no longer signed by the sender's pinned identity, or was revoked."""


class RoomStateError(RoomCryptoError):
    """The saved room-key state is damaged or belongs to another identity."""
