"""Big rooms: above --presence-limit members a join or part is told to that user only, and member
lists are cut to what fits in one frame, with the full count beside them."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from securechat import framing
from securechat.client import Client
from securechat.client.events import Joined, Message, Parted
from securechat.protocol import Join, Part, Who
from securechat.server.hub import Hub
from securechat.server.outbox import Audience
from tests.cli_helpers import run_client
from tests.conftest import wait_for


@dataclass(eq=False)
class StubLoop:
    frames: dict[str, list[dict]] = field(default_factory=dict)

    def deliver(self, data: bytes, conns: tuple) -> None:
        for conn in conns:
            self.frames.setdefault(conn.user, []).append(json.loads(data[4:]))

    def broadcast(self, data: bytes, audience: Audience) -> None:
        self.deliver(data, audience.members)


@dataclass(eq=False)
class StubConn:
    user: str
    loop: StubLoop
    device: str = "AAAAAAAAAAAAAAAA"


def crowd(hub: Hub, names: list[str]) -> tuple[StubLoop, list[StubConn]]:
    loop = StubLoop()
    conns = [StubConn(name, loop) for name in names]
    for conn in conns:
        hub.login(conn)  # type: ignore[arg-type]
    return loop, conns


def kinds(loop: StubLoop, user: str) -> list[tuple[str, str]]:
    return [(f["type"], f.get("user", "")) for f in loop.frames.get(user, [])]


def test_joins_beyond_the_limit_are_told_only_to_the_user_who_joins() -> None:
    loop, _ = crowd(Hub(presence_limit=2), ["ann", "bob", "cat"])
    assert kinds(loop, "ann") == [("joined", "ann"), ("joined", "bob")]
    assert kinds(loop, "bob") == [("joined", "bob")]
    assert kinds(loop, "cat") == [("joined", "cat")]


def test_a_part_from_a_big_room_is_told_only_to_the_user_who_leaves() -> None:
    hub = Hub(presence_limit=2)
    loop, (_ann, bob, cat) = crowd(hub, ["ann", "bob", "cat"])
    loop.frames.clear()
    hub.handle(cat, Part(id=1, room="#lobby"))  # type: ignore[arg-type]
    hub.logout(bob, "quit")  # type: ignore[arg-type]  # two members left: announced again
    assert kinds(loop, "cat") == [("parted", "cat")]
    assert kinds(loop, "ann") == [("parted", "bob")]


def test_without_a_limit_everyone_hears_every_join() -> None:
    loop, _ = crowd(Hub(presence_limit=0), ["ann", "bob", "cat"])
    assert kinds(loop, "ann") == [("joined", "ann"), ("joined", "bob"), ("joined", "cat")]


def test_a_member_list_too_long_for_one_frame_is_cut_and_counted() -> None:
    hub = Hub(max_frame=framing.MIN_FRAME)
    names = [f"user{i:03d}-" + "x" * 20 for i in range(60)]
    _, conns = crowd(hub, names)
    reply = hub.handle(conns[0], Who(id=7, room="#lobby"))  # type: ignore[arg-type]
    assert reply["count"] == 60
    assert reply["truncated"] is True
    assert 0 < len(reply["members"]) < 60
    assert reply["members"] == sorted(names)[: len(reply["members"])]
    assert len(framing.encode(reply, framing.MIN_FRAME)) <= framing.MIN_FRAME + 4
    join = hub.handle(conns[1], Join(id=8, room="#lobby"))  # type: ignore[arg-type]
    assert join["count"] == 60 and join["truncated"] is True


def test_a_short_member_list_is_whole() -> None:
    hub = Hub()
    _, conns = crowd(hub, ["ann", "bob"])
    reply = hub.handle(conns[0], Who(id=1, room="#lobby"))  # type: ignore[arg-type]
    assert reply == {
        "type": "ok", "id": 1, "room": "#lobby", "mode": "plain", "members": ["ann", "bob"],
        "count": 2,
    }  # fmt: skip


@pytest.mark.server_config(presence_limit=2)
def test_a_real_big_room_stays_quiet_and_clients_still_know_their_rooms(
    connect: Callable[..., Client],
) -> None:
    alice = connect("alice")
    wait_for(alice, lambda e: isinstance(e, Joined) and e.user == "alice")
    bob = connect("bob")
    wait_for(alice, lambda e: isinstance(e, Joined) and e.user == "bob")
    carol = connect("carol")
    wait_for(carol, lambda e: isinstance(e, Joined) and e.user == "carol")
    assert carol.rooms == {"#lobby"}
    carol.part("#lobby").result(10)
    wait_for(carol, lambda e: isinstance(e, Parted) and e.user == "carol")
    assert carol.rooms == set()
    bob.send("#lobby", "after carol").result(10)
    # alice heard neither carol's join nor her part: the next thing she sees is bob's message.
    event = alice.next_event(timeout=10)
    assert isinstance(event, Message) and event.text == "after carol"


@pytest.mark.server_config(max_frame=framing.MIN_FRAME)
def test_who_in_a_crowded_room_names_those_that_fit_and_counts_the_rest(
    connect: Callable[..., Client], server, certs_dir, cli_key
) -> None:
    crowd_names = [f"member{i:02d}-{'x' * 22}" for i in range(30)]
    for name in crowd_names:
        connect(name)
    out = run_client(
        cli_key("dana"), server.address[1], certs_dir / "ca.pem", "/who\n", user="dana"
    )
    assert out.returncode == 0, out.stderr
    (line,) = [line for line in out.stdout.splitlines() if line.startswith("-- in #lobby: ")]
    listed = line.removeprefix("-- in #lobby: ").split(" and ")[0].split(", ")
    assert listed == sorted([*crowd_names, "dana"])[: len(listed)]
    assert line.endswith(f" and {31 - len(listed)} more")
