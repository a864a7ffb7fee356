"""When an outbound Megolm session must be replaced: pure policy, the clock passed in.

Rules, checked in this order:
  1. someone who holds the session lost access: a member left or is no longer trusted, e.g.
     their identity key changed (MEMBER_LEFT), or one device of a member that stays is no
     longer a recipient, e.g. it was revoked (DEVICE_REMOVED); a new session keeps them out of
     what follows;
  2. the session has encrypted `max_messages` messages (MESSAGES);
  3. the session is `max_age_s` old, or the clock went back past its start (AGE).
New recipients need no rotation: they get the session at its current index, so they cannot read
what it encrypted before.
"""

from __future__ import annotations

import enum
from collections.abc import Set
from dataclasses import dataclass

from securechat.megolm.port import DeviceRef

WEEK_S = 7 * 24 * 3600.0


class RotationReason(enum.Enum):
    MEMBER_LEFT = "a member left or lost your trust"
    DEVICE_REMOVED = "a device was removed"
    MESSAGES = "the session reached its message limit"
    AGE = "the session reached its age limit"


@dataclass(frozen=True)
class RotationPolicy:
    max_messages: int = 100
    max_age_s: float = WEEK_S


DEFAULT_POLICY = RotationPolicy()


@dataclass(frozen=True)
class SessionUse:
    """What the policy needs to know about one outbound session."""

    created_at: float  # seconds since the epoch
    messages: int  # messages encrypted with it so far
    shared_with: frozenset[DeviceRef]


def rotation_reason(
    use: SessionUse,
    recipients: Set[DeviceRef],
    now: float,
    policy: RotationPolicy = DEFAULT_POLICY,
) -> RotationReason | None:
    """Why the session in `use` must not encrypt the next message for `recipients`, or None."""
    lost = use.shared_with - recipients
    if lost:
        staying = {d.user for d in recipients}
        if any(d.user not in staying for d in lost):
            return RotationReason.MEMBER_LEFT
        return RotationReason.DEVICE_REMOVED
    if use.messages >= policy.max_messages:
        return RotationReason.MESSAGES
    if now - use.created_at >= policy.max_age_s or now < use.created_at:
        return RotationReason.AGE
    return None
