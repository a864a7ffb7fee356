"""Keys for the room-key state at rest, derived from the identity seed, and sealing that state.

Two independent keys come from the seed: one for vodozemac's own encrypted pickles of group
sessions, one for a SecretBox around the whole state (room names, senders, replay records), so
the saved blob shows nothing but its length. Nothing here logs or raises with key material.
"""

from __future__ import annotations

import json
from typing import Any

import nacl.exceptions
import nacl.secret

from securechat.identity import Identity
from securechat.megolm.errors import RoomStateError

STATE_VERSION = 1
_PICKLE_PURPOSE = b"sc-megolm-pickle"
_STATE_PURPOSE = b"sc-megolm-state"


class StateBox:
    """Seals and opens the JSON state of the room-key stores under keys only `identity` derives."""

    def __init__(self, identity: Identity) -> None:
        self.pickle_key = identity.subkey(_PICKLE_PURPOSE)
        self._box = nacl.secret.SecretBox(identity.subkey(_STATE_PURPOSE))

    def seal(self, data: dict[str, Any]) -> bytes:
        raw = json.dumps({"v": STATE_VERSION, "state": data}, sort_keys=True).encode()
        return bytes(self._box.encrypt(raw))  # PyNaCl draws the nonce

    def open(self, blob: bytes) -> dict[str, Any]:
        try:
            outer = json.loads(self._box.decrypt(blob))
        except (nacl.exceptions.CryptoError, ValueError, TypeError):
            raise RoomStateError(
                "the saved room keys do not open with this identity key (another identity's "
                "file, or damaged); encrypted rooms start afresh without them if you move it aside"
            ) from None
        if not isinstance(outer, dict) or outer.get("v") != STATE_VERSION:
            raise RoomStateError("the saved room keys have a format this securechat cannot read")
        state = outer.get("state")
        if not isinstance(state, dict):
            raise damaged_state("no state table")
        return state


def damaged_state(why: str) -> RoomStateError:
    return RoomStateError(
        f"the saved room keys are damaged ({why}); move them aside to start afresh"
    )
