"""The exception family.

Every error a user can cause or meet is a SecureChatError whose message says what happened and
what to do; the CLI prints that one line and exits non-zero, never a traceback.
"""

from __future__ import annotations


class SecureChatError(Exception):
    """Base of every error securechat raises on purpose."""

    exit_code = 1


class ConfigError(SecureChatError):
    """A command-line option, environment variable or file path is unusable."""


class CertificateError(SecureChatError):
    """Certificates are missing, unreadable, or do not verify."""


class IdentityError(SecureChatError):
    """An identity key file is missing, unreadable, too open, or the passphrase is wrong."""


class ConnectError(SecureChatError):
    """The server could not be reached, or the TLS handshake failed."""


class AuthError(SecureChatError):
    """The server refused the login (a taken name, a bad signature, a bad name)."""

    def __init__(self, message: str, code: str = "auth_failed") -> None:
        super().__init__(message)
        self.code = code


class ProtocolError(SecureChatError):
    """A peer sent bytes or frames that break the wire protocol.

    `code` is the stable machine-readable error code sent in an error frame; `fatal` says the
    connection cannot go on (the byte stream can no longer be trusted to be in sync).
    """

    def __init__(self, code: str, message: str, *, fatal: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.fatal = fatal


class StorageError(SecureChatError):
    """The server's data folder cannot be opened or written."""


class ConnectionClosed(SecureChatError):
    """The connection is closed; `reason` says why when the peer told us."""

    def __init__(self, reason: str = "connection closed") -> None:
        super().__init__(reason)
        self.reason = reason


# -- end-to-end direct messages over Olm (securechat/e2e) ------------------------------------------


class E2EError(SecureChatError):
    """A device, session or direct-message problem; nothing it concerns is shown as a message."""


class DeviceStateError(E2EError):
    """A local device, session or conversation file is unreadable, too open, damaged, or belongs
    to another identity key."""


class DeviceRecordError(E2EError):
    """A device record or revocation is malformed, or names another user or device."""


class UnsignedDevice(DeviceRecordError):
    """A device record or revocation is not signed by the identity key pinned for its user."""


class PrekeyError(E2EError):
    """A claimed one-time or fallback key is malformed or not signed by the device it claims."""


class NoSession(E2EError):
    """There is no usable session with a device yet: claim one of its prekeys first."""


class UndecryptableMessage(E2EError):
    """An encrypted message did not decrypt; it is reported, never shown.

    `wedged` says every session with that device failed, so a new one should be started.
    """

    def __init__(self, message: str, *, user: str, device_id: str, wedged: bool = False) -> None:
        super().__init__(message)
        self.user = user
        self.device_id = device_id
        self.wedged = wedged


class InvalidRecord(E2EError):
    """A direct-message record cannot be built, or one that was decrypted is malformed."""


class EnvelopeError(E2EError):
    """An envelope is malformed, of an unsupported version, or addressed to another device."""


class ReplayedRecord(E2EError):
    """A direct message was delivered again (a sequence number already seen): refused."""


class BrokenChain(E2EError):
    """A direct message does not fit the hash chain of the messages before it: refused."""
