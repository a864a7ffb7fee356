"""Canonical JSON: the one byte form of every record securechat signs, seals or encrypts.

Keys sorted, no whitespace, UTF-8, so that a record has exactly one encoding and a signature or a
re-encoding check covers it. Each record format fixes one of two flavours for good, since the
bytes are what is signed or compared: sealed and encrypted records (DMs, room records, room-key
payloads) keep text as UTF-8, at most 4 bytes a character instead of 12; the signed records
(identity records, device records and revocations, prekeys) and the sealed local state escape
anything outside ASCII as a JSON \\u escape (four hex digits).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any


def canonical_json(value: Mapping[str, Any], *, ascii_only: bool = False) -> bytes:
    """`value` as sorted, compact JSON in UTF-8 (non-ASCII escaped when ascii_only)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=ascii_only).encode(
        "utf-8"
    )
