"""The exception family.

Every error a user can cause or meet is a SecureChatError whose message says what happened and
what to do; the CLI prints that one line and exits non-zero, never a traceback.
"""

from __future__ import annotations

import enum


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


class ErrorCode(str, enum.Enum):
    """The stable machine-readable `code` of an error frame: the whole list, in one place.

    Each member carries when it is sent and whether the connection closes after it; the error
    table in docs/PROTOCOL.md is made from these (tests/test_protocol.py checks that it is).
    A member is its wire string (`ErrorCode.NOT_ALLOWED == "not_allowed"`), so a client may
    compare a received code with either.
    """

    when: str
    closes: str

    def __new__(cls, value: str, when: str = "", closes: str = "") -> ErrorCode:
        member = str.__new__(cls, value)
        member._value_ = value
        member.when = when
        member.closes = closes
        return member

    def __str__(self) -> str:
        return str(self.value)

    FRAME_TOO_LARGE = ("frame_too_large", "a frame header above the limit", "yes")
    BAD_FRAME = (
        "bad_frame",
        "zero length, not a JSON object, no string `type`; a `join` with `plain` but not `create`; "
        "a `claim_prekeys` with both or neither of `user` and `users`, or `devices` with `users`",
        "zero length: yes; else no (a strike)",
    )
    BAD_UTF8 = (
        "bad_utf8",
        'the payload is not UTF-8, or a string in it is a lone surrogate escape (`"\\ud800"`),'
        " which has no UTF-8 form",
        "no (a strike)",
    )
    BAD_JSON = ("bad_json", "the payload is not JSON", "no (a strike)")
    UNKNOWN_TYPE = ("unknown_type", "a frame type the server does not know", "no (a strike)")
    NOT_ALLOWED = ("not_allowed", "a frame the current state does not accept", "no (a strike)")
    BAD_FIELD = ("bad_field", "a field is missing or of the wrong type or size", "no (a strike)")
    BAD_NAME = ("bad_name", "a user name breaks the rules above", "no (a strike)")
    BAD_ROOM = ("bad_room", "a room name breaks the rules above", "no (a strike)")
    BAD_VERSION = (
        "bad_version",
        "`hello` asks for a protocol version the server does not speak",
        "no (a strike)",
    )
    BAD_SIGNATURE = ("bad_signature", "the login signature does not verify", "yes")
    NAME_TAKEN = ("name_taken", "the name belongs to another key", "yes")
    TOO_MANY_NAMES = (
        "too_many_names",
        "the name is new and its address has bound `--new-names` new names this hour (instead "
        "of `welcome`)",
        "yes",
    )
    SERVER_ERROR = ("server_error", "the server could not reach its store", "yes")
    NOT_IN_ROOM = (
        "not_in_room",
        "`say`, `say_encrypted`, `part` or `history` for a room you are not in",
        "no",
    )
    QUOTA_EXCEEDED = (
        "quota_exceeded",
        "the recipient's queue of waiting DMs is full, or the sender's share of it "
        "(`--dm-sender-share`); the message says which",
        "no",
    )
    NO_SUCH_USER = ("no_such_user", "`keys` for a name nobody has claimed", "no")
    NO_SUCH_ROOM = ("no_such_room", "`who` for a room that does not exist", "no")
    RATE_LIMITED = (
        "rate_limited",
        "a request over the user's rate, or sent after such a refusal without `resume`; it was "
        "not carried out; `retry_after` says when to send it again (see Rate limit)",
        "no; `--flood-refusals` in a row close it",
    )
    TOO_LONG = ("too_long", "`say` text longer than the server's `max_message`", "no")
    TOO_LARGE = (
        "too_large",
        "a `dm` (or `dms` item) or `say_encrypted` whose envelope or ciphertext, with the sender's "
        "name and device added, would not fit in one frame; a `claim_prekeys` for more devices "
        "than its reply may hold (128, fewer below 53 KiB frames)",
        "no",
    )
    BAD_RECORD = (
        "bad_record",
        "a device record, revocation or prekey that is malformed, for another user or device, or "
        "not signed by the identity key bound to the name",
        "no (a strike)",
    )
    NO_SUCH_DEVICE = (
        "no_such_device",
        "a `dm` (or `dms` item) for a device never published",
        "no",
    )
    DEVICE_REVOKED = (
        "device_revoked",
        "a login, `dm` (or `dms` item) or publication for a revoked device",
        "on login: yes",
    )
    TOO_MANY_DEVICES = ("too_many_devices", "`publish_device` past the per-user cap", "no")
    DEVICE_CONFLICT = (
        "device_conflict",
        "`publish_device` with another record for a device id already published",
        "no",
    )
    PREKEYS_REFUSED = (
        "prekeys_refused",
        "`publish_prekeys` with a key id already held, two fallback keys, or too many keys",
        "no",
    )
    BAD_CERTIFICATE = (
        "bad_certificate",
        "with `--require-client-cert`, the client certificate is not one for a client "
        "(instead of `challenge`)",
        "yes",
    )
    ROOM_EXISTS = ("room_exists", "`join` with `create` for a room the server knows", "no")
    ROOM_ENCRYPTED = (
        "room_encrypted",
        "`say` in an end-to-end encrypted room (send `say_encrypted`)",
        "no",
    )
    ROOM_PLAIN = ("room_plain", "`say_encrypted` in a plain room (send `say`)", "no")
    SERVER_FULL = (
        "server_full",
        "the server is at `--max-connections` (instead of `challenge`)",
        "yes",
    )
    TOO_MANY_CONNECTIONS = (
        "too_many_connections",
        "your address is at `--max-per-address` (instead of `challenge`)",
        "yes",
    )


class ProtocolError(SecureChatError):
    """A peer sent bytes or frames that break the wire protocol.

    `code` is the stable machine-readable error code sent in an error frame: an ErrorCode for
    every error we raise, a plain string only for a code a peer sent that this version does not
    know. `fatal` says the connection cannot go on (the byte stream can no longer be trusted to
    be in sync).
    """

    def __init__(self, code: ErrorCode | str, message: str, *, fatal: bool = False) -> None:
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


# -- interactive verification by emoji (securechat/e2e/sas.py) -------------------------------------


class VerificationError(E2EError):
    """An emoji verification cannot take this step (the emoji are not shown yet, or it has
    ended)."""


class SasMessageError(VerificationError):
    """A verification message is malformed or belongs to another verification: refused, and the
    verification it was offered to goes on unchanged."""


class VerificationFailed(VerificationError):
    """An emoji verification ended without marking anyone verified.

    `code` is the cancel code (sas.CancelCode's value) that tells the other device why; `by_peer`
    says the other device ended it, so no cancel needs to go back.
    """

    def __init__(self, message: str, *, code: str, by_peer: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.by_peer = by_peer


class SasMismatch(VerificationFailed):
    """The two devices do not agree on the keys being compared: someone (the server) may be
    intercepting. Nothing was marked verified."""
