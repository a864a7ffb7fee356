"""Bounds on the offline queues: most messages and bytes waiting for one recipient (or one of its
devices), and the share of that one sender may fill. Plain checks on counts the store reads;
no I/O here."""

from __future__ import annotations

from dataclasses import dataclass

from securechat.errors import StorageError


class QuotaExceeded(StorageError):
    """The recipient's queue is full; the DM was not stored."""


class SenderShareExceeded(QuotaExceeded):
    """The sender's share of the recipient's queue is full; the DM was not stored."""


@dataclass(frozen=True)
class DMQuota:
    """Most DMs, and most bytes of sealed boxes, that may wait for one recipient; and the part
    of that which one sender may fill, so that one account cannot lock a recipient's queue
    against everyone else."""

    count: int
    bytes: int
    sender_count: int
    sender_bytes: int


def check_quota(
    quota: DMQuota,
    size: int,
    waiting: tuple[int, int],
    from_sender: tuple[int, int],
    recipient: str,
    device: str,
) -> None:
    """Refuse one more message of `size` bytes for one device's queue holding `waiting` (count,
    bytes), of which `from_sender` came from its sender."""
    queue = f"{recipient}'s queue of waiting messages for device {device}"
    count, total = waiting
    if count >= quota.count or total + size > quota.bytes:
        raise QuotaExceeded(f"{queue} is full ({count} messages, {total} bytes); try again later")
    count, total = from_sender
    if count >= quota.sender_count or total + size > quota.sender_bytes:
        raise SenderShareExceeded(
            f"your share of {queue} is full ({count} messages, {total} bytes from you; one "
            f"sender may have at most {quota.sender_count} messages or {quota.sender_bytes} "
            f"bytes waiting for one recipient); try again when {recipient} has read them"
        )
