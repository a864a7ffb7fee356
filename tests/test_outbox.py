"""Room feeds and outboxes, driven through a loop that never starts (the test plays its thread),
and through the hub with real loop threads: every connection gets its frames once, in the order
they were queued, whatever mix of rooms, frames of its own, joins and departures it is sent."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from securechat.protocol import Join, Part, Say
from securechat.server.hub import Hub
from securechat.server.loop import IOLoop
from securechat.server.outbox import Audience, Feed, Outbox, Roster

from .test_loop import Member


@pytest.fixture
def loop() -> Iterator[IOLoop]:
    loop = IOLoop(0)
    yield loop
    loop.selector.close()
    loop._wake_r.close()
    loop._wake_w.close()


def audience(members: list[Member]) -> Audience:
    """A room of these members on the loop, as a broadcast names it."""
    return Roster(members).audience()  # type: ignore[arg-type]


def flush(loop: IOLoop) -> None:
    while loop.dirty or loop._grown:
        loop._flush_dirty()


def test_a_turn_of_room_messages_is_one_write_shared_by_every_member(loop: IOLoop) -> None:
    members = [Member() for _ in range(5)]
    room = audience(members)
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
    room = audience([sender, other])
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
    room_a = audience([both, only_a])
    room_b = audience([both, only_b])
    loop._feed(b"a1", room_a)
    loop._feed(b"b1", room_b)
    loop._feed(b"a2", room_a)
    both.outbox.push(b"own")
    loop._feed(b"b2", room_b)
    flush(loop)
    assert both.writes == [b"a1b1a2ownb2"]
    assert only_a.writes == [b"a1a2"]
    assert only_b.writes == [b"b1b2"]


def test_two_busy_rooms_keep_one_feed_each_through_a_turn(loop: IOLoop) -> None:
    both, only_a, only_b = Member(), [Member(), Member()], [Member(), Member()]
    room_a = audience([both, *only_a])
    room_b = audience([both, *only_b])
    for i in range(3):  # the rooms' messages alternate, as two busy rooms' do
        loop._feed(b"a%d" % i, room_a)
        loop._feed(b"b%d" % i, room_b)
    # One feed per room, not one per message: each member followed its room's once.
    assert [len(m.outbox.feeds) for m in (both, *only_a, *only_b)] == [2, 1, 1, 1, 1]
    assert room_a.roster.feed is not None and room_b.roster.feed is not None
    assert (len(room_a.roster.feed.frames), len(room_b.roster.feed.frames)) == (3, 3)
    flush(loop)
    assert both.writes == [b"a0b0a1b1a2b2"]
    assert [m.writes for m in only_a] == [[b"a0a1a2"]] * 2
    assert [m.writes for m in only_b] == [[b"b0b1b2"]] * 2
    # ...and each room's frames are still joined once for all its members at one cursor.
    assert only_a[0].writes[0] is only_a[1].writes[0]


def test_a_newcomer_gets_only_what_was_said_after_it_joined(loop: IOLoop) -> None:
    old, new = Member(), Member()
    loop._feed(b"before", audience([old]))
    loop._feed(b"after", audience([old, new]))
    flush(loop)
    assert old.writes == [b"beforeafter"]
    assert new.writes == [b"after"]


def test_a_closed_member_is_skipped_and_the_others_are_served(loop: IOLoop) -> None:
    gone, stays = Member(), Member()
    gone.open = False
    loop._feed(b"m", audience([gone, stays]))
    flush(loop)
    assert (gone.writes, stays.writes) == ([], [b"m"])
    assert gone.outbox.take(1 << 20) == b""


class NotReading(Member):
    """A member whose socket is full: its connection takes nothing from its outbox."""

    def flush(self) -> None:
        pass


def test_frames_a_full_socket_did_not_take_are_counted_and_kept_in_order(loop: IOLoop) -> None:
    reader, stuck = Member(), NotReading()
    room = audience([reader, stuck])
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


# -- joins and departures: the feed carries on -----------------------------------------------------


def test_members_who_join_and_leave_mid_turn_get_exactly_their_frames_from_one_feed(
    loop: IOLoop,
) -> None:
    stays, leaves, rejoins, newcomer, stuck = Member(), Member(), Member(), Member(), NotReading()
    roster = Roster([stays, leaves, rejoins, stuck])  # type: ignore[arg-type]
    loop._feed(b"m1", roster.audience())
    roster.change(rejoins, joined=False)  # type: ignore[arg-type]
    loop._feed(b"m2", roster.audience())
    roster.change(newcomer, joined=True)  # type: ignore[arg-type]
    roster.change(stuck, joined=False)  # type: ignore[arg-type]
    loop._feed(b"m3", roster.audience())
    roster.change(rejoins, joined=True)  # type: ignore[arg-type]
    roster.change(leaves, joined=False)  # type: ignore[arg-type]
    loop._feed(b"m4", roster.audience())
    feed = roster.feed
    assert feed is not None and feed.frames == [b"m1", b"m2", b"m3", b"m4"]
    flush(loop)
    assert stays.writes == [b"m1m2m3m4"]
    assert leaves.writes == [b"m1m2m3"]
    assert rejoins.writes == [b"m1m4"]
    assert newcomer.writes == [b"m3m4"]
    # A member whose socket is full keeps what was said while it was there, and nothing after.
    assert stuck.outbox.backlog() == 4
    assert stuck.outbox.take(1 << 20) == b"m1m2"
    # Each member followed that one feed: no change made a feed that everyone had to follow.
    assert feed.members == {stays, rejoins, newcomer}


def test_a_frame_queued_before_changes_the_loop_has_seen_goes_to_the_members_of_its_time(
    loop: IOLoop,
) -> None:
    """A loop may run a broadcast of its own before one another loop queued earlier: each frame
    still goes to exactly the members the room had when the hub sent it."""
    old, leaves, joins = Member(), Member(), Member()
    roster = Roster([old, leaves])  # type: ignore[arg-type]
    earlier = roster.audience()
    roster.change(leaves, joined=False)  # type: ignore[arg-type]
    roster.change(joins, joined=True)  # type: ignore[arg-type]
    loop._feed(b"late1", roster.audience())
    loop._feed(b"early", earlier)
    loop._feed(b"late2", roster.audience())
    flush(loop)
    assert old.writes == [b"late1earlylate2"]
    assert leaves.writes == [b"early"]
    assert joins.writes == [b"late1late2"]


class CountingOutbox(Outbox):
    __slots__ = ("follows",)

    def __init__(self) -> None:
        super().__init__()
        self.follows = 0

    def follow(self, feed: Feed, start: int = 0) -> None:
        self.follows += 1
        super().follow(feed, start)


class Conn(Member):
    """What the hub and its loop use of a connection; a closed one writes nothing more."""

    def __init__(self, user: str, loop: IOLoop) -> None:
        super().__init__()
        self.user, self.device, self.loop = user, "AAAAAAAAAAAAAAAA", loop
        self.outbox = CountingOutbox()

    def flush(self) -> None:
        if self.open:
            super().flush()

    def all_frames(self) -> list[tuple[str, str]]:
        """(type, room) of every frame it was sent."""
        return [(frame["type"], frame.get("room", "")) for frame in self._frames()]

    def room_frames(self, room: str) -> list[tuple[str, str, str]]:
        """What it was sent in `room`: (type, user, text), a history copy typed "history"."""
        return [
            (
                "history" if frame.get("history") else frame["type"],
                frame.get("user", frame.get("from")),
                frame.get("text", ""),
            )
            for frame in self._frames()
            if frame.get("room") == room
        ]

    def _frames(self) -> list[dict[str, Any]]:
        data, frames = b"".join(self.writes), []
        while data:
            size = int.from_bytes(data[:4], "big")
            frames.append(json.loads(data[4 : 4 + size]))
            data = data[4 + size :]
        return frames


def on_loop(loop: IOLoop, fn: Callable[[], None]) -> None:
    """Run `fn` on the loop's own thread, as one callback of one turn."""
    done, failed = threading.Event(), []

    def call() -> None:
        try:
            fn()
        except Exception as exc:
            failed.append(exc)
        done.set()

    loop.call_soon(call)
    assert done.wait(10), "the loop did not run the callback"
    assert not failed, failed


def test_a_mass_departure_in_one_turn_keeps_every_member_in_order_and_makes_one_feed() -> None:
    """The shape of an output-budget shed: many members of a room just under --presence-limit
    dropped in one turn of their loop, with messages, a part and a join among them. Every member
    gets each of the room's frames once, in the hub's order, while it is in the room (a newcomer
    gets what came before as history); and the loop's members follow one feed for the turn,
    not one per departure."""
    loops = [IOLoop(0), IOLoop(1)]
    hub = Hub(presence_limit=41)  # #r (34-40) announces everyone; #lobby (42-46) is quiet
    on_a = [Conn(f"a{i}", loops[0]) for i in range(40)]
    on_b = [Conn(f"b{i}", loops[1]) for i in range(6)]
    newcomer = Conn("new", loops[1])
    expected: dict[Conn, list[tuple[str, str, str]]] = {c: [] for c in [*on_a, *on_b, newcomer]}
    in_room: list[Conn] = []
    said: list[tuple[str, str, str]] = []

    def heard(frame: tuple[str, str, str]) -> None:
        for conn in in_room:
            expected[conn].append(frame)

    def join(conn: Conn) -> None:
        first = not in_room and not said  # it makes #r: a plain room, as the frames are text
        frame = Join(id=1, room="#r", create=first, plain=first)
        hub.handle(conn, frame)  # type: ignore[arg-type]
        expected[conn] += [("history", user, text) for _, user, text in said]
        in_room.append(conn)
        heard(("joined", conn.user, ""))

    def say(conn: Conn, text: str) -> None:
        hub.say(conn, Say(id=2, room="#r", text=text))  # type: ignore[arg-type]
        said.append(("message", conn.user, text))
        heard(said[-1])

    def shed(conn: Conn) -> None:
        conn.open = False  # as Connection.abort: closed first, then out of the hub
        hub.logout(conn, "outbound queue full: client not reading")
        in_room.remove(conn)
        heard(("parted", conn.user, ""))

    def part(conn: Conn) -> None:
        hub.handle(conn, Part(id=3, room="#r"))  # type: ignore[arg-type]
        heard(("parted", conn.user, ""))
        in_room.remove(conn)

    def setup() -> None:
        for conn in [*on_a, *on_b]:
            hub.login(conn)  # type: ignore[arg-type]
        for conn in [*on_a[:36], *on_b[:4]]:
            join(conn)
        say(on_a[0], "before")

    def one_turn() -> None:
        say(on_a[0], "m1")
        for conn in on_a[1:5]:
            shed(conn)
        say(on_b[0], "m2")
        part(on_b[1])
        hub.login(newcomer)  # type: ignore[arg-type]
        join(newcomer)
        shed(on_a[5])
        say(on_b[2], "m3")

    for loop in loops:
        loop.start()
    try:
        on_loop(loops[0], setup)
        follows = {conn: conn.outbox.follows for conn in on_a}
        on_loop(loops[0], one_turn)
    finally:
        for loop in loops:
            loop.stop()
            loop.join(10)
    for conn in expected:
        conn.flush()  # what the loop had not written yet when it stopped
        got = conn.room_frames("#r")
        if conn.open:
            assert got == expected[conn], conn.user
        else:
            # A shed member's last frames may be lost with it, but never one from after it left.
            assert got == expected[conn][: len(got)], conn.user
    assert expected[on_a[0]][-10:] == [
        ("message", "a0", "m1"),
        *[("parted", f"a{i}", "") for i in range(1, 5)],
        ("message", "b0", "m2"),
        ("parted", "b1", ""),
        ("joined", "new", ""),
        ("parted", "a5", ""),
        ("message", "b2", "m3"),
    ]
    # The four departures, the message after them and the join made no new feed on a's loop.
    assert on_a[0].outbox.follows - follows[on_a[0]] == 1
    assert [on_a[i].outbox.follows - follows[on_a[i]] for i in (36, 37)] == [0, 0]  # not in #r


def log_in_to_r(hub: Hub, conns: list[Conn]) -> None:
    """Log `conns` in (#lobby) and join them to #r, which the first makes plain (the frames
    these tests read are text)."""
    for conn in conns:
        hub.login(conn)  # type: ignore[arg-type]
        first = conn is conns[0]
        hub.handle(conn, Join(id=1, room="#r", create=first, plain=first))  # type: ignore[arg-type]


def test_connections_shed_together_are_announced_room_by_room_with_one_feed_each() -> None:
    """The output budget sheds several clients in one call (hub.logout_all): every room they were
    in announces all of them in a row, so a member of both rooms follows one feed per room for
    the lot, not two for each departure."""
    loop = IOLoop(0)
    hub = Hub(history_keep=0)  # no --presence-limit: both rooms announce everything
    conns = [Conn(f"u{i}", loop) for i in range(30)]
    shed = conns[1:5]

    def setup() -> None:
        log_in_to_r(hub, conns)

    def shed_together() -> None:
        hub.logout_all(shed, "outbound queue full: client not reading")  # type: ignore[arg-type]
        for conn in shed:
            conn.open = False

    loop.start()
    try:
        on_loop(loop, setup)
        follows = [conn.outbox.follows for conn in conns]
        on_loop(loop, shed_together)
    finally:
        loop.stop()
        loop.join(10)
    for conn in conns:
        conn.flush()
    for conn in (conns[0], *conns[5:]):
        last = [(f[0], f[1]) for f in conn.room_frames("#lobby")][-4:]
        assert last == [("parted", c.user) for c in shed]
        last = [(f[0], f[1]) for f in conn.room_frames("#r")][-4:]
        assert last == [("parted", c.user) for c in shed]
        rooms = [room for kind, room in conn.all_frames() if kind == "parted"]
        assert rooms in (["#lobby"] * 4 + ["#r"] * 4, ["#r"] * 4 + ["#lobby"] * 4)
    # Two feeds each (u1 left before any notice; the other three heard the first ones).
    assert [c.outbox.follows - f for c, f in zip(conns, follows, strict=True)] == [2, 0] + [2] * 28


def test_a_room_emptied_one_by_one_stays_exact_across_fresh_rosters() -> None:
    """Departures with messages between them, enough for the room's roster to start afresh
    several times (hub.ROSTER_RESTART): each member gets every message and notice once, in
    order, up to its own departure, and nothing after."""
    loop = IOLoop(0)
    hub = Hub(history_keep=0)
    conns = [Conn(f"u{i}", loop) for i in range(40)]
    speaker, leaving = conns[-1], conns[:-3]

    def setup() -> None:
        log_in_to_r(hub, conns)

    def one_turn() -> None:
        for i, conn in enumerate(leaving):
            hub.say(speaker, Say(id=2, room="#r", text=f"m{i}"))  # type: ignore[arg-type]
            if i % 2:
                hub.handle(conn, Part(id=3, room="#r"))  # type: ignore[arg-type]
            else:
                conn.open = False  # shed
                hub.logout(conn, "outbound queue full: client not reading")  # type: ignore[arg-type]

    loop.start()
    try:
        on_loop(loop, setup)
        on_loop(loop, one_turn)
    finally:
        loop.stop()
        loop.join(10)
    expected = []
    for i, conn in enumerate(leaving):
        expected += [("message", speaker.user, f"m{i}"), ("parted", conn.user, "")]
    for i, conn in enumerate(conns):
        conn.flush()
        got = [f for f in conn.room_frames("#r") if f[0] != "joined"]
        if conn not in leaving:
            assert got == expected
        elif i % 2:
            assert got == expected[: 2 * i + 2], conn.user  # up to its own part
        else:
            assert got == [], conn.user  # shed: closed before its loop wrote again


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
        room = audience([member])
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
        audiences = {name: audience(conns) for name, conns in rooms.items()}
        expected: list[list[bytes]] = [[], [], []]
        got = [b"", b"", b""]
        for i, (step, who, size) in enumerate(steps):
            frame = bytes([65 + i % 26]) * size
            if step in rooms:
                if i % 7 == 0:  # as a roster that starts afresh
                    audiences[step] = audience(rooms[step])  # a fresh roster
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
