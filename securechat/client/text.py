"""Text from other people, made safe to show, and message times: shared by every front end.

Names, message text and reasons come from other users or the server. Control characters and
escape sequences become visible escapes, so that nobody can drive a terminal (move the cursor,
clear the screen, retitle it) or fake a line of ours; bidirectional controls and invisible
characters are escaped too (the "Trojan Source" trick: text that reads one way on screen and is
another). Nothing here knows about terminals or windows: both front ends draw through it.
"""

from __future__ import annotations

import re
from datetime import datetime

# C0 controls but newline, DEL, C1 controls; bidirectional embeddings, overrides, isolates and
# marks (U+202A-U+202E, U+2066-U+2069, U+200E, U+200F, U+061C), which make text display in another
# order than it is; zero-width characters (U+200B-U+200D, U+2060, U+FEFF), which hide characters
# inside a word; and the line and paragraph separators U+2028/U+2029, which break a line where
# the terminal's newline handling cannot see it.
_UNSAFE = re.compile(
    "[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060\u2066-\u2069\ufeff]"
)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def clean(text: str) -> str:
    """Text from others, with every unsafe character replaced by a visible escape."""
    return _UNSAFE.sub(_escape, text)


def clean_line(text: str) -> str:
    """clean(), and newlines too: for names and reasons, which must stay on one line."""
    return clean(text).replace("\n", "\\n")


def stamp(ts: int, now: datetime | None = None) -> str:
    """The local time of `ts` (ms since the epoch): "14:02" today, "2026-11-20 14:02" on any
    other day, so that a message held back for days never passes for one from this afternoon."""
    when = datetime.fromtimestamp(ts / 1000)
    today = (now or datetime.now()).date()
    return when.strftime("%H:%M" if when.date() == today else "%Y-%m-%d %H:%M")
