"""Key forwarding between the devices of one identity.

A new device asks its siblings for a room's keys; a sibling answers with every inbound session of
that room exported at the first index it holds, so the new device reads the history from when
this identity joined, and no earlier. Rule: requests are answered, and forwarded keys accepted,
only between devices signed by our own identity key and not revoked. The server cannot pass as
one of them: it would need our identity key to sign a device record.
"""

from __future__ import annotations

from securechat.megolm.membership import Trust
from securechat.megolm.port import DeviceRef


def own_devices(trust: Trust) -> list[DeviceRef]:
    """Our other devices that may exchange keys with this one."""
    me = trust.me
    return sorted(
        DeviceRef(me.user, d.device_id)
        for d in trust.port.devices(me.user)
        if d.user == me.user
        and d.device_id != me.device_id
        and trust.device_problem(me.user, d.device_id) is None
    )


def sibling_problem(trust: Trust, device: DeviceRef) -> str | None:
    """Why `device` may not request or forward our room keys, or None."""
    if device.user != trust.me.user:
        return f"{device.user} is not you; only your own devices exchange room keys"
    if device == trust.me:
        return "it claims to come from this very device"
    return trust.device_problem(device.user, device.device_id)
