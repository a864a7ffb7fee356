"""Keys and sealed blobs for the device's local state, all derived from the identity's seed.

Only the unlocked identity can derive these keys, so a device file, its sessions or its
conversation state copied without the key file and passphrase are useless. No I/O here, and no
key material in any message.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
from typing import Any

import nacl.exceptions
import nacl.secret

from securechat.canonical import canonical_json
from securechat.errors import DeviceStateError
from securechat.identity import Identity

# BLAKE2b personalisations (at most 16 bytes): one independent key per purpose.
PURPOSE_DEVICE_FILE = b"sc-e2e-device"
PURPOSE_SESSIONS_FILE = b"sc-e2e-sessions"
PURPOSE_CONVERSATIONS_FILE = b"sc-e2e-convs"
PURPOSE_OLM_PICKLE = b"sc-e2e-pickle"


def derive_key(identity: Identity, purpose: bytes) -> bytes:
    """A 32-byte key for `purpose`, derived from the identity's seed (Identity.subkey)."""
    return identity.subkey(purpose)


def pickle_key(identity: Identity) -> bytes:
    """The key vodozemac encrypts its account and session pickles with."""
    return derive_key(identity, PURPOSE_OLM_PICKLE)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def seal_state(identity: Identity, fmt: str, purpose: bytes, payload: dict[str, Any]) -> bytes:
    """The bytes of a state file: a clear header naming the identity, the payload sealed.

    The header's identity key only lets a wrong key file be told apart from a damaged file;
    SecretBox (random nonce, MAC) protects the payload.
    """
    box = nacl.secret.SecretBox(derive_key(identity, purpose))
    inner = canonical_json(payload, ascii_only=True)
    outer = {
        "format": fmt,
        "version": 1,
        "identity": _b64(identity.verify_key_bytes),
        "sealed": _b64(box.encrypt(inner)),
    }
    return json.dumps(outer, indent=1, sort_keys=True).encode("utf-8") + b"\n"


def open_state(
    identity: Identity, fmt: str, purpose: bytes, raw: bytes, what: str
) -> dict[str, Any]:
    """The payload seal_state sealed; DeviceStateError naming `what` on any failure."""
    try:
        outer = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise DeviceStateError(f"{what} is damaged (not JSON)") from None
    if not isinstance(outer, dict) or outer.get("format") != fmt:
        raise DeviceStateError(f"{what} is not a securechat {fmt} file")
    if outer.get("version") != 1 or isinstance(outer.get("version"), bool):
        raise DeviceStateError(f"{what} has a format version this securechat cannot read")
    try:
        owner = base64.b64decode(outer.get("identity") or "", validate=True)
        sealed = base64.b64decode(outer.get("sealed") or "", validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise DeviceStateError(f"{what} is damaged (bad base64)") from None
    if not hmac.compare_digest(owner, identity.verify_key_bytes):
        raise DeviceStateError(
            f"{what} belongs to another identity key; use the key file it was made with, or "
            "move it aside to start a new device"
        )
    try:
        inner = nacl.secret.SecretBox(derive_key(identity, purpose)).decrypt(sealed)
        payload = json.loads(inner.decode("utf-8"))
    except (nacl.exceptions.CryptoError, UnicodeDecodeError, ValueError, RecursionError):
        raise DeviceStateError(
            f"{what} is damaged or was altered (it does not open with your key)"
        ) from None
    if not isinstance(payload, dict):
        raise DeviceStateError(f"{what} is damaged (no table inside)")
    return payload
