"""The replay guard that direct messages reuse (securechat/e2e keeps one per device, saved with
its conversation state): ids seen before are refused, the time window holds, memory is bounded,
and a damaged saved state is refused.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from securechat.sealing import (
    OpenedDM,
    ReplayedMessage,
    ReplayGuard,
    ReplayStateError,
    StaleMessage,
    new_message_id,
)

NOW = 1_700_000_000_000  # a fixed "now" in ms, so the replay window is deterministic
DAY = 24 * 60 * 60 * 1000


def test_message_ids_are_random_and_fit_the_wire_protocol() -> None:
    ids = {new_message_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(len(i) == 22 and i.replace("-", "").replace("_", "").isalnum() for i in ids)


def test_the_guard_says_what_it_has_seen() -> None:
    guard = ReplayGuard()
    guard.check(opened(), now_ms=NOW)
    assert guard.seen("alice", "msg-0000000001")
    assert not guard.seen("carol", "msg-0000000001")


def opened(message_id: str = "msg-0000000001", ts: int = NOW, sender: str = "alice") -> OpenedDM:
    return OpenedDM(sender, "bob", message_id, ts, "hi")


def test_a_replayed_message_id_is_refused() -> None:
    guard = ReplayGuard()
    guard.check(opened(), now_ms=NOW)
    with pytest.raises(ReplayedMessage, match="alice"):
        guard.check(opened(), now_ms=NOW + 1000)


def test_the_same_id_from_another_sender_is_not_a_replay() -> None:
    # Ids are per sender, so a hostile peer cannot pre-empt someone else's id.
    guard = ReplayGuard()
    guard.check(opened(sender="alice"), now_ms=NOW)
    guard.check(opened(sender="carol"), now_ms=NOW)


def test_the_window_edges() -> None:
    guard = ReplayGuard()
    guard.check(opened("msg-oldest-ok", ts=NOW - 7 * DAY), now_ms=NOW)
    guard.check(opened("msg-newest-ok", ts=NOW + 5 * 60 * 1000), now_ms=NOW)
    with pytest.raises(StaleMessage, match="7 days"):
        guard.check(opened("msg-too-old-1", ts=NOW - 7 * DAY - 1), now_ms=NOW)
    with pytest.raises(StaleMessage, match="5 minutes in the future"):
        guard.check(opened("msg-future-01", ts=NOW + 5 * 60 * 1000 + 1), now_ms=NOW)


def test_stale_and_refused_messages_are_not_remembered() -> None:
    guard = ReplayGuard()
    with pytest.raises(StaleMessage):
        guard.check(opened(ts=NOW + DAY), now_ms=NOW)
    assert len(guard) == 0
    guard.check(opened(ts=NOW + DAY), now_ms=NOW + DAY)  # once its time has come, it is fine


def test_memory_is_bounded_by_the_window() -> None:
    guard = ReplayGuard(max_age_ms=10_000)
    for i in range(1000):
        guard.check(opened(f"msg-{i:010d}", ts=NOW + i * 1000), now_ms=NOW + i * 1000)
        assert len(guard) <= 11
    assert len(json.dumps(guard.export())) < 2000


def test_memory_is_bounded_by_a_cap_without_reopening_replays() -> None:
    guard = ReplayGuard(max_remembered=3)
    for i in range(10):
        guard.check(opened(f"msg-{i:010d}", ts=NOW + i), now_ms=NOW + 10)
        assert len(guard) <= 3
    # msg-0 was forgotten, but alice's floor rose past it: still refused.
    with pytest.raises(StaleMessage):
        guard.check(opened("msg-0000000000", ts=NOW), now_ms=NOW + 10)
    # another sender's older messages are not affected by alice's flood
    guard.check(opened("msg-carol-0001", ts=NOW - 5, sender="carol"), now_ms=NOW + 10)


def test_setting_the_clock_back_does_not_reopen_forgotten_ids() -> None:
    guard = ReplayGuard(max_age_ms=1000)
    guard.check(opened(ts=NOW), now_ms=NOW)
    guard.check(opened("msg-0000000002", ts=NOW + 5000), now_ms=NOW + 5000)  # forgets the first
    with pytest.raises(StaleMessage):
        guard.check(opened(ts=NOW), now_ms=NOW)


def test_replay_state_export_and_load_round_trip() -> None:
    guard = ReplayGuard(max_remembered=2)
    for i in range(3):
        guard.check(opened(f"msg-{i:010d}", ts=NOW + i), now_ms=NOW)
    data = json.loads(json.dumps(guard.export()))
    loaded = ReplayGuard.load(data, max_remembered=2)
    assert loaded.export() == guard.export()
    with pytest.raises(ReplayedMessage):
        loaded.check(opened("msg-0000000002", ts=NOW + 2), now_ms=NOW)
    with pytest.raises(StaleMessage):  # forgotten under the cap, refused by the floor
        loaded.check(opened("msg-0000000000", ts=NOW), now_ms=NOW)
    loaded.check(opened("msg-0000000009", ts=NOW + 9), now_ms=NOW)


def test_loading_keeps_memory_bounded() -> None:
    guard = ReplayGuard()
    for i in range(5):
        guard.check(opened(f"msg-{i:010d}", ts=NOW + i), now_ms=NOW)
    smaller = ReplayGuard.load(guard.export(), max_remembered=2)
    assert len(smaller) == 2
    later = ReplayGuard.load(guard.export(), max_age_ms=DAY)
    later.check(opened("msg-new-000001", ts=NOW + 2 * DAY), now_ms=NOW + 2 * DAY)
    assert len(later) == 1


@pytest.mark.parametrize(
    "data",
    [
        None,
        [],
        {},
        {"version": 2, "horizon": 0, "seen": [], "floors": {}},
        {"version": 1, "horizon": "0", "seen": [], "floors": {}},
        {"version": 1, "horizon": 0, "seen": [["alice", "id"]], "floors": {}},
        {"version": 1, "horizon": 0, "seen": [["alice", "id", "1"]], "floors": {}},
        {"version": 1, "horizon": 0, "seen": [], "floors": {"alice": None}},
        {"version": 1, "horizon": 0, "seen": [], "floors": []},
    ],
)
def test_damaged_replay_state_is_refused(data: Any) -> None:
    with pytest.raises(ReplayStateError, match="damaged"):
        ReplayGuard.load(data)
