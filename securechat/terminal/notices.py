"""What the controller tells the user, typed: a kind and a text, never a hand-typed prefix.

The terminal shows the kind as a prefix ("-- " for information, "!! " for a warning), the GUI
styles the line by its kind. LINE is display text shown as it is: a message, a history entry,
the help.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class NoticeKind(enum.Enum):
    INFO = "info"  # a command's answer, a change of state
    WARNING = "warning"  # something failed, was refused, or needs the user's attention
    LINE = "line"  # display text shown as it is (a message, a history entry, /help)


@dataclass(frozen=True)
class Notice:
    kind: NoticeKind
    text: str


def info(text: str) -> Notice:
    return Notice(NoticeKind.INFO, text)


def warning(text: str) -> Notice:
    return Notice(NoticeKind.WARNING, text)


def line(text: str) -> Notice:
    return Notice(NoticeKind.LINE, text)


PREFIXES = {NoticeKind.INFO: "-- ", NoticeKind.WARNING: "!! ", NoticeKind.LINE: ""}


def as_text(notice: Notice) -> str:
    """The notice as the terminal shows it: its kind as a prefix, then its text."""
    return PREFIXES[notice.kind] + notice.text
