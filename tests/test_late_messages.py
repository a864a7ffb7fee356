"""The hold of live room messages waiting for their key: order, and the bounds that keep a server
sending junk under unknown session ids from filling memory."""

from __future__ import annotations

from securechat.client import late
from securechat.client.events import Message
from securechat.client.late import LateMessages
from securechat.megolm.envelope import RoomCiphertext
from securechat.terminal.render import notice_of


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def msg(session: str, n: int, room: str = "#team") -> RoomCiphertext:
    return RoomCiphertext(room, "DEVICE", session, f"c{n}".encode())


def texts(held: list[late.Held]) -> list[bytes]:
    return [h.message.ciphertext for h in held]


def test_messages_come_back_per_session_in_the_order_they_came_and_once() -> None:
    hold = LateMessages(Clock())
    for n, session in enumerate(["s1", "s2", "s1"]):
        hold.hold("bob", msg(session, n), n)
    hold.hold("bob", msg("s1", 9, "#ops"), 9)
    assert texts(hold.take("#team", "s1")) == [b"c0", b"c2"]
    assert hold.take("#team", "s1") == []
    assert (len(hold), texts(hold.take("#ops", "s1"))) == (2, [b"c9"])


def test_one_session_keeps_its_newest_messages_and_all_sessions_a_total() -> None:
    clock = Clock()
    hold = LateMessages(clock)
    for n in range(late.PER_SESSION + 5):
        hold.hold("bob", msg("s1", n), n)
    assert len(hold) == late.PER_SESSION
    for n in range(late.TOTAL):
        clock.now += 0.001
        hold.hold("eve", msg(f"junk{n}", n), n)
    assert len(hold) == late.TOTAL
    assert hold.take("#team", "s1") == []  # the oldest went first


def test_a_message_older_than_the_limit_is_forgotten() -> None:
    clock = Clock()
    hold = LateMessages(clock)
    hold.hold("bob", msg("s1", 1), 1)
    clock.now += late.MAX_AGE / 2
    hold.hold("bob", msg("s1", 2), 2)
    clock.now += late.MAX_AGE / 2 + 1
    assert texts(hold.take("#team", "s1")) == [b"c2"]
    assert len(hold) == 0


def test_the_terminal_marks_a_late_message() -> None:
    shown = Message("#team", "bob", "hi", 0, encrypted=True, late=True)
    assert notice_of(shown, "#team").text.endswith("] [late] <bob> hi")
