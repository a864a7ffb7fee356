"""Device records and revocations, signed by the identity key.

The identity key is the person's root: a device counts only when the identity key pinned for
its user signed its record, so verifying a person once covers all their devices. A server that
adds a device of its own, swaps a device's keys, or revokes a device by itself is refused.

Transcripts (what the identity key signs) are a fixed context string and one NUL, then the
canonical JSON of the record's fields (sorted keys, no whitespace, UTF-8):

    b"securechat/device-record/v2\\0" + {"created_ms","curve25519","device_id","ed25519",
                                         "identity_key","user"}
    b"securechat/device-revocation/v2\\0" + {"device_id","identity_key","revoked_ms","user"}

Every field is a restricted string or an integer, so each record has exactly one transcript.
No I/O here.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import nacl.exceptions
import nacl.signing
import vodozemac

from securechat.canonical import canonical_json
from securechat.e2e.device import Device, valid_device_id
from securechat.errors import DeviceRecordError, UnsignedDevice
from securechat.identity import Identity, fingerprint
from securechat.protocol import valid_name

RECORD_CONTEXT = b"securechat/device-record/v2\0"
REVOCATION_CONTEXT = b"securechat/device-revocation/v2\0"
_TS_MAX = 2**53
_RECORD_KEYS = frozenset(
    {"user", "device_id", "curve25519", "ed25519", "created_ms", "identity_key", "signature"}
)
_REVOCATION_KEYS = frozenset({"user", "device_id", "revoked_ms", "identity_key", "signature"})


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def vodozemac_key_bytes(key: str) -> bytes:
    """The raw bytes of a key in vodozemac's unpadded base64 (for fingerprints)."""
    return base64.b64decode(key + "=" * (-len(key) % 4))


@dataclass(frozen=True)
class DeviceRecord:
    """One device of `user`, vouched for by the identity key `identity_key`."""

    user: str
    device_id: str
    curve25519: str  # vodozemac unpadded base64
    ed25519: str  # vodozemac unpadded base64
    created_ms: int
    identity_key: bytes
    signature: bytes

    def _signed_fields(self) -> dict[str, Any]:
        return {
            "user": self.user,
            "device_id": self.device_id,
            "curve25519": self.curve25519,
            "ed25519": self.ed25519,
            "created_ms": self.created_ms,
            "identity_key": _b64(self.identity_key),
        }

    def transcript(self) -> bytes:
        return RECORD_CONTEXT + canonical_json(self._signed_fields(), ascii_only=True)

    @property
    def fingerprint(self) -> str:
        """The fingerprint of the device's Ed25519 key, as /devices shows it."""
        return fingerprint(vodozemac_key_bytes(self.ed25519))

    def to_wire(self) -> dict[str, Any]:
        return {**self._signed_fields(), "signature": _b64(self.signature)}


@dataclass(frozen=True)
class Revocation:
    """The identity key's statement that `device_id` of `user` no longer counts."""

    user: str
    device_id: str
    revoked_ms: int
    identity_key: bytes
    signature: bytes

    def _signed_fields(self) -> dict[str, Any]:
        return {
            "user": self.user,
            "device_id": self.device_id,
            "revoked_ms": self.revoked_ms,
            "identity_key": _b64(self.identity_key),
        }

    def transcript(self) -> bytes:
        return REVOCATION_CONTEXT + canonical_json(self._signed_fields(), ascii_only=True)

    def to_wire(self) -> dict[str, Any]:
        return {**self._signed_fields(), "signature": _b64(self.signature)}


@dataclass(frozen=True)
class DeviceList:
    """The devices of one user that may be encrypted to, and what was refused (to warn about)."""

    user: str
    devices: tuple[DeviceRecord, ...]
    revoked: tuple[str, ...]  # device ids with a valid revocation
    refused: tuple[str, ...]  # one warning per record that was refused

    def get(self, device_id: str) -> DeviceRecord | None:
        return next((d for d in self.devices if d.device_id == device_id), None)


# -- signing --------------------------------------------------------------------------------------


def _check_user(user: Any) -> str:
    why = valid_name(user) if isinstance(user, str) else "must be text"
    if why:
        raise DeviceRecordError(f"the user name {why}")
    return str(user)


def _check_time(value: Any, field: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < _TS_MAX:
        raise DeviceRecordError(f"the {field} of a device record is not a time")
    return value


def sign_device(identity: Identity, user: str, device: Device) -> DeviceRecord:
    """The record of `device`, signed by `identity`, to publish for `user`."""
    unsigned = DeviceRecord(
        user=_check_user(user),
        device_id=device.device_id,
        curve25519=device.curve25519,
        ed25519=device.ed25519,
        created_ms=_check_time(device.created_ms, "creation time"),
        identity_key=identity.verify_key_bytes,
        signature=b"",
    )
    return replace(unsigned, signature=identity.sign(unsigned.transcript()))


def sign_revocation(identity: Identity, user: str, device_id: str, now_ms: int) -> Revocation:
    """A revocation of `device_id`, signed by `identity`, to publish for `user`."""
    if not valid_device_id(device_id):
        raise DeviceRecordError("a device id is 16 characters of A-Z and 2-7")
    unsigned = Revocation(
        user=_check_user(user),
        device_id=device_id,
        revoked_ms=_check_time(now_ms, "revocation time"),
        identity_key=identity.verify_key_bytes,
        signature=b"",
    )
    return replace(unsigned, signature=identity.sign(unsigned.transcript()))


# -- verifying ------------------------------------------------------------------------------------


def _b64_field(data: dict[str, Any], field: str, size: int) -> bytes:
    try:
        raw = base64.b64decode(data.get(field) or "", validate=True)
    except (binascii.Error, ValueError, TypeError):
        raw = b""
    if len(raw) != size or _b64(raw) != data.get(field):
        raise DeviceRecordError(f"the {field} of a device record is not {size} bytes of base64")
    return raw


def _olm_key(data: dict[str, Any], field: str) -> str:
    value = data.get(field)
    parse = vodozemac.Curve25519PublicKey if field == "curve25519" else vodozemac.Ed25519PublicKey
    try:
        canonical = parse.from_base64(value).to_base64() if isinstance(value, str) else None
    except vodozemac.KeyException:
        canonical = None
    if canonical is None or canonical != value:
        raise DeviceRecordError(f"the {field} key of a device record is malformed")
    return canonical


def _check_signed(item: DeviceRecord | Revocation, user: str, pinned_key: bytes, what: str) -> None:
    if item.user != user:
        raise DeviceRecordError(f"a {what} offered for {user} names another user ({item.user})")
    if not hmac.compare_digest(item.identity_key, pinned_key):
        raise UnsignedDevice(
            f"a {what} for {user} ({item.device_id}) is signed by a key that is not the one you "
            f"pinned for {user}; it was refused. The server may be adding a device of its own"
        )
    try:
        nacl.signing.VerifyKey(pinned_key).verify(item.transcript(), item.signature)
    except (nacl.exceptions.BadSignatureError, ValueError, TypeError):
        raise UnsignedDevice(
            f"a {what} for {user} ({item.device_id}) does not carry a valid signature by "
            f"{user}'s pinned identity key; it was refused. The server may be adding a device "
            "of its own"
        ) from None


def _fields(data: Any, keys: frozenset[str], what: str) -> dict[str, Any]:
    if not isinstance(data, dict) or set(data) != keys:
        raise DeviceRecordError(f"a {what} does not have exactly the fields {sorted(keys)}")
    if not valid_device_id(data["device_id"]):
        raise DeviceRecordError(f"the device id of a {what} is malformed")
    return data


def verify_device(data: Any, user: str, pinned_key: bytes) -> DeviceRecord:
    """The device record in `data` (wire form) if `pinned_key` signed it for `user`.

    DeviceRecordError when it is malformed; UnsignedDevice when the pinned key did not sign it.
    """
    data = _fields(data, _RECORD_KEYS, "device record")
    record = DeviceRecord(
        user=_check_user(data["user"]),
        device_id=data["device_id"],
        curve25519=_olm_key(data, "curve25519"),
        ed25519=_olm_key(data, "ed25519"),
        created_ms=_check_time(data["created_ms"], "creation time"),
        identity_key=_b64_field(data, "identity_key", 32),
        signature=_b64_field(data, "signature", 64),
    )
    _check_signed(record, user, pinned_key, "device record")
    return record


def verify_revocation(data: Any, user: str, pinned_key: bytes) -> Revocation:
    """The revocation in `data` (wire form) if `pinned_key` signed it for `user`."""
    data = _fields(data, _REVOCATION_KEYS, "device revocation")
    revocation = Revocation(
        user=_check_user(data["user"]),
        device_id=data["device_id"],
        revoked_ms=_check_time(data["revoked_ms"], "revocation time"),
        identity_key=_b64_field(data, "identity_key", 32),
        signature=_b64_field(data, "signature", 64),
    )
    _check_signed(revocation, user, pinned_key, "device revocation")
    return revocation


def verified_devices(
    user: str, pinned_key: bytes, records: Iterable[Any], revocations: Iterable[Any] = ()
) -> DeviceList:
    """The devices of `user` to encrypt to: signed by the pinned key and not revoked.

    One bad record does not hide the good ones: each refusal becomes a warning in `refused`,
    for the front end to show loudly. A device id offered twice with different keys is refused.
    """
    refused: list[str] = []
    revoked: set[str] = set()
    for item in revocations:
        try:
            revoked.add(verify_revocation(item, user, pinned_key).device_id)
        except DeviceRecordError as exc:
            refused.append(str(exc))
    by_id: dict[str, DeviceRecord | None] = {}
    for item in records:
        try:
            record = verify_device(item, user, pinned_key)
        except DeviceRecordError as exc:
            refused.append(str(exc))
            continue
        seen = by_id.get(record.device_id, record)
        if seen is None or seen != record:
            if seen is not None:
                refused.append(
                    f"{user}'s device {record.device_id} was offered with two different sets of "
                    "keys; it was refused"
                )
            by_id[record.device_id] = None
        else:
            by_id[record.device_id] = record
    devices = tuple(
        r for d, r in sorted(by_id.items()) if r is not None and r.device_id not in revoked
    )
    return DeviceList(user, devices, tuple(sorted(revoked)), tuple(refused))
