"""The client's pacer without sockets: fed the server's replies by hand, and driven against the
server's own bucket over a simulated link that holds bursts back."""

from __future__ import annotations

import heapq
import itertools
import json
from concurrent.futures import Future
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from securechat.client.pacing import MAX_TRIES, PACE_MARGIN, Paced, Pacer, Verdict
from securechat.errors import ProtocolError
from securechat.ratelimit import TokenBucket


def encode(frame: dict[str, Any]) -> bytes:
    return json.dumps(frame).encode()


def pacer_with(n: int, rate: float = 10.0, burst: int = 3, max_refusals: int = 20) -> Pacer:
    pacer = Pacer(rate, burst, max_refusals, 0.0, encode)
    for i in range(1, n + 1):
        pacer.add(Paced(i, i, "say", {"text": f"m{i}"}, Future()))
    return pacer


def sent(pacer: Pacer, now: float) -> list[dict[str, Any]]:
    out, failed = pacer.take_due(now)
    assert failed == []
    return [json.loads(d) for d in out]


def test_a_refused_request_goes_again_in_its_place_and_says_resume() -> None:
    pacer = pacer_with(5)
    first = sent(pacer, 0.0)
    assert [(f["id"], f["text"]) for f in first] == [(1, "m1"), (2, "m2"), (3, "m3")]  # burst
    pacer.answered(1, carried_out=True)
    assert pacer.refused(2, 0.1, 0.01, new_id=100) is Verdict.RETRY
    assert sent(pacer, 5.0) == []  # request 3 is still in flight: its refusal may yet come
    assert pacer.next_due(5.0) is None
    assert pacer.refused(3, 0.1, 0.02, new_id=101) is Verdict.RETRY  # held behind request 2
    assert sent(pacer, 0.02 + 0.1) == []  # not before retry_after, with the margin
    resumed = sent(pacer, 0.02 + 0.1 / PACE_MARGIN + 0.2)
    assert resumed == [
        {"type": "say", "id": 100, "text": "m2", "resume": True},
        {"type": "say", "id": 101, "text": "m3"},
    ]
    assert [f["text"] for f in sent(pacer, 10.0)] == ["m4", "m5"]
    for request_id in (100, 101, 4, 5):
        pacer.answered(request_id, carried_out=True)
    assert pacer.idle and pacer.retries == 2


def test_only_refusals_of_its_own_count_as_tries_and_the_waits_grow() -> None:
    pacer = pacer_with(2, burst=2)
    sent(pacer, 0.0)
    now, head, behind, waits = 0.0, 1, 2, []
    for _ in range(MAX_TRIES - 1):
        assert pacer.refused(head, 0.1, now, new_id=head + 10) is Verdict.RETRY
        # Refused only because the head was: not a try of its own.
        assert pacer.refused(behind, 0.1, now, new_id=behind + 10) is Verdict.RETRY
        waits.append(round(pacer.next_due(now), 6))
        now += 100.0
        head, behind = head + 10, behind + 10
        assert sent(pacer, now) == [
            {"type": "say", "id": head, "text": "m1", "resume": True},
            {"type": "say", "id": behind, "text": "m2"},
        ]
    assert waits == [round(0.1 * 2**k / PACE_MARGIN, 6) for k in range(MAX_TRIES - 1)]
    assert pacer.refused(head, 0.1, now, new_id=999) is Verdict.GIVE_UP
    assert pacer.refused(behind, 0.1, now, new_id=1000) is Verdict.RETRY  # goes on
    assert sent(pacer, now + 100.0) == [{"type": "say", "id": 1000, "text": "m2", "resume": True}]


def test_without_an_announced_flood_limit_nothing_is_sent_again() -> None:
    pacer = pacer_with(1, max_refusals=None)  # type: ignore[arg-type]
    sent(pacer, 0.0)
    assert pacer.refused(1, 0.1, 0.0, new_id=2) is Verdict.GIVE_UP
    assert pacer.idle


def test_it_never_risks_the_flood_limit() -> None:
    pacer = pacer_with(10, burst=10, max_refusals=4)
    assert len(sent(pacer, 0.0)) == 3  # three refused in a row would still be one short
    assert pacer.refused(1, 0.0, 0.0, new_id=11) is Verdict.RETRY
    pacer.refused(2, 0.0, 0.0, new_id=12)
    pacer.refused(3, 0.0, 0.0, new_id=13)
    # Three refusals counted: one more would be the fourth, so only one goes, alone.
    assert [f["id"] for f in sent(pacer, 1.0)] == [11]
    pacer.answered(11, carried_out=True)  # the row is over
    assert [f["id"] for f in sent(pacer, 5.0)] == [12, 13, 4]


def test_a_resend_that_outgrows_the_frame_limit_fails_alone() -> None:
    def tight(frame: dict[str, Any]) -> bytes:
        if frame["id"] == 3:
            raise ProtocolError("frame_too_large", "too big")
        return encode(frame)

    pacer = Pacer(10.0, 3, 20, 0.0, tight)
    for i in (1, 2):
        pacer.add(Paced(i, i, "say", {"text": f"m{i}"}, Future()))
    pacer.take_due(0.0)
    pacer.refused(1, 0.0, 0.0, new_id=3)
    pacer.refused(2, 0.0, 0.0, new_id=4)
    out, failed = pacer.take_due(1.0)
    assert [(p.seq, str(e)) for p, e in failed] == [(1, "too big")]
    assert [json.loads(d) for d in out] == [{"type": "say", "id": 4, "text": "m2", "resume": True}]


def run_over_link(holds: list[tuple[float, float]], n: int = 40) -> tuple[list[str], int]:
    """The pacer against the server's bucket over a link that holds the client's bytes back
    during each (start, length) and then delivers them at once. Returns what the server carried
    out, in order, and how many requests were sent again."""
    rate, burst, max_refusals = 20.0, 5, 20
    server = TokenBucket.full(rate, burst, 0.0, max_refusals)
    pacer = pacer_with(n, rate, burst, max_refusals)
    ids = itertools.count(1000)
    events: list[tuple[float, int, str, dict[str, Any]]] = []
    order = itertools.count()
    last_arrival, now, carried = 0.0, 0.0, []
    for _ in range(100_000):
        out, failed = pacer.take_due(now)
        assert failed == []
        for data in out:
            arrival = now + 0.001
            for start, length in holds:
                if start <= now < start + length:
                    arrival = start + length
            last_arrival = max(last_arrival, arrival)  # TCP: in order
            heapq.heappush(events, (last_arrival, next(order), "server", json.loads(data)))
        due = pacer.next_due(now)
        if not events and due is None:
            break
        if events and (due is None or events[0][0] <= now + due):
            now, _, where, frame = heapq.heappop(events)
        else:
            now += max(due or 0.0, 1e-4)  # floats: a wait of 1e-17 would not move the clock
            continue
        if where == "server":
            if server.take_in_order(now, frame.get("resume") is True):
                carried.append(frame["text"])
                reply = {"type": "ok", "id": frame["id"]}
            else:
                assert not server.flooding, "the client was cut off as a flooder"
                retry_after = round(server.retry_after(now), 3)
                reply = {"type": "error", "id": frame["id"], "retry_after": retry_after}
            heapq.heappush(events, (now + 0.001, next(order), "client", reply))
        elif reply_ok := frame["type"] == "ok":
            pacer.answered(frame["id"], carried_out=reply_ok)
        else:
            verdict = pacer.refused(frame["id"], frame["retry_after"], now, next(ids))
            assert verdict is Verdict.RETRY
    assert pacer.idle
    return carried, pacer.retries


def test_a_held_back_burst_is_sent_again_in_order_and_once() -> None:
    carried, retries = run_over_link([(0.0, 1.2)])
    assert carried == [f"m{i}" for i in range(1, 41)]
    assert retries > 0


@given(st.lists(st.tuples(st.floats(0.0, 3.0), st.floats(0.0, 1.5)), min_size=1, max_size=4))
def test_any_held_back_bursts_lose_nothing_reorder_nothing_and_never_flood(holds) -> None:
    carried, _ = run_over_link(holds)
    assert carried == [f"m{i}" for i in range(1, 41)]
