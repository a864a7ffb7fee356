"""Room feeds and outboxes, driven through a loop that never starts (the test plays its thread):
every connection gets its frames once, in the order they were queued, whatever mix of rooms and
frames of its own it is sent."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from securechat.server.loop import IOLoop
from securechat.server.outbox import Audience, Outbox


class Member:
    def __init__(self) -> None:
        self.open = True
        self.outbox = Outbox()
        self.writes: list[bytes] = []

    def flush(self) -> None:
        data = self.outbox.take(1 << 20)
        if data:
            self.writes.append(data)


@pytest.fixture
def loop() -> Iterator[IOLoop]:
    loop = IOLoop(0)
    yield loop
    loop.selector.close()
    loop._wake_r.close()
    loop._wake_w.close()


def flush(loop: IOLoop) -> None:
    while loop.dirty or loop._grown:
        loop._flush_dirty()


def test_a_turn_of_room_messages_is_one_write_shared_by_every_member(loop: IOLoop) -> None:
    members = [Member() for _ in range(5)]
    room = Audience(members)  # type: ignore[arg-type]
    for text in (b"a", b"b", b"c"):
        loop._feed(text, room)
    flush(loop)
    assert [m.writes for m in members] == [[b"abc"]] * 5
    # One feed for the three messages, joined once for all five members.
    assert len({id(m.writes[0]) for m in members}) == 1


def test_a_reply_comes_after_the_message_it_answers_and_before_later_ones(
    loop: IOLoop,
) -> None:
    sender, other = Member(), Member()
    room = Audience([sender, other])  # type: ignore[arg-type]
    loop._feed(b"m1", room)
    sender.outbox.push(b"ok1")
    loop._feed(b"m2", room)
    sender.outbox.push(b"ok2")
    loop._feed(b"m3", room)
    flush(loop)
    assert sender.writes == [b"m1ok1m2ok2m3"]
    assert other.writes == [b"m1m2m3"]


def test_frames_of_two_rooms_keep_their_order_for_a_member_of_both(loop: IOLoop) -> None:
    both, only_a, only_b = Member(), Member(), Member()
    room_a = Audience([both, only_a])  # type: ignore[arg-type]
    room_b = Audience([both, only_b])  # type: ignore[arg-type]
    loop._feed(b"a1", room_a)
    loop._feed(b"b1", room_b)
    loop._feed(b"a2", room_a)
    both.outbox.push(b"own")
    loop._feed(b"b2", room_b)
    flush(loop)
    assert both.writes == [b"a1b1a2ownb2"]
    assert only_a.writes == [b"a1a2"]
    assert only_b.writes == [b"b1b2"]


def test_a_newcomer_gets_only_what_was_said_after_it_joined(loop: IOLoop) -> None:
    old, new = Member(), Member()
    loop._feed(b"before", Audience([old]))  # type: ignore[arg-type]
    loop._feed(b"after", Audience([old, new]))  # type: ignore[arg-type]
    flush(loop)
    assert old.writes == [b"beforeafter"]
    assert new.writes == [b"after"]


def test_a_closed_member_is_skipped_and_the_others_are_served(loop: IOLoop) -> None:
    gone, stays = Member(), Member()
    gone.open = False
    loop._feed(b"m", Audience([gone, stays]))  # type: ignore[arg-type]
    flush(loop)
    assert (gone.writes, stays.writes) == ([], [b"m"])
    assert gone.outbox.take(1 << 20) == b""


class NotReading(Member):
    """A member whose socket is full: its connection takes nothing from its outbox."""

    def flush(self) -> None:
        pass


def test_frames_a_full_socket_did_not_take_are_counted_and_kept_in_order(loop: IOLoop) -> None:
    reader, stuck = Member(), NotReading()
    room = Audience([reader, stuck])  # type: ignore[arg-type]
    for _ in range(5):
        loop._feed(b"x" * 10, room)
        loop._feed(b"yy", room)
        flush(loop)
        loop._seal()  # as at the end of every turn: the next frames start a new feed
    assert reader.writes == [b"x" * 10 + b"yy"] * 5
    # Five turns' frames wait for the stuck member, counted; the ended feeds are not kept.
    assert stuck.outbox.backlog() == 5 * 12
    assert len(stuck.outbox.feeds) == 1
    stuck.outbox.push(b"own")
    assert stuck.outbox.backlog() == 5 * 12 + 3
    # Taken a little at a time: whole frames from the front, until the limit is reached.
    assert stuck.outbox.take(25) == (b"x" * 10 + b"yy") * 2 + b"x" * 10
    assert stuck.outbox.backlog() == 5 * 12 + 3 - 34
    assert stuck.outbox.take(1 << 20) == b"yy" + (b"x" * 10 + b"yy") * 2 + b"own"
    assert stuck.outbox.backlog() == 0


@given(
    st.lists(
        st.tuples(st.sampled_from(["push", "feed", "seal", "take"]), st.integers(1, 40)),
        max_size=60,
    )
)
def test_a_take_shorter_than_its_limit_leaves_nothing_queued(steps: list[tuple[str, int]]) -> None:
    # Connection.flush stops after such a take instead of asking again.
    loop = IOLoop(0)
    try:
        member = NotReading()
        room = Audience([member])  # type: ignore[arg-type]
        sent: list[bytes] = []
        got = b""
        for i, (step, size) in enumerate(steps):
            frame = bytes([65 + i % 26]) * size
            if step == "push":
                member.outbox.push(frame)
                sent.append(frame)
            elif step == "feed":
                loop._feed(frame, room)
                sent.append(frame)
            elif step == "seal":
                loop._seal()
            else:
                data = member.outbox.take(size)
                got += data
                assert len(data) >= size or member.outbox.take(1 << 20) == b""
        got += member.outbox.take(1 << 20)
        assert got == b"".join(sent)
    finally:
        loop.selector.close()
        loop._wake_r.close()
        loop._wake_w.close()


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["room a", "room b", "push", "seal", "take"]),
            st.integers(0, 2),
            st.integers(1, 40),
        ),
        max_size=80,
    )
)
def test_members_of_overlapping_rooms_get_their_frames_once_in_order(
    steps: list[tuple[str, int, int]],
) -> None:
    loop = IOLoop(0)
    try:
        members = [NotReading() for _ in range(3)]
        rooms = {"room a": members[:2], "room b": members[1:]}
        audiences = {name: Audience(conns) for name, conns in rooms.items()}  # type: ignore[arg-type]
        expected: list[list[bytes]] = [[], [], []]
        got = [b"", b"", b""]
        for i, (step, who, size) in enumerate(steps):
            frame = bytes([65 + i % 26]) * size
            if step in rooms:
                if i % 7 == 0:  # the members changed: the hub makes a new audience
                    audiences[step] = Audience(rooms[step])  # type: ignore[arg-type]
                loop._feed(frame, audiences[step])
                for member in rooms[step]:
                    expected[members.index(member)].append(frame)
            elif step == "push":
                members[who].outbox.push(frame)
                expected[who].append(frame)
            elif step == "seal":
                loop._seal()
            else:
                got[who] += members[who].outbox.take(size)
        for i, member in enumerate(members):
            got[i] += member.outbox.take(1 << 20)
        assert got == [b"".join(frames) for frames in expected]
    finally:
        loop.selector.close()
        loop._wake_r.close()
        loop._wake_w.close()
