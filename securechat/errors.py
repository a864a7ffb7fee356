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
