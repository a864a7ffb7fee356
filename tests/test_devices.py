"""Version 2 DMs between devices through the real server: several devices per person, each DM
reaching every device once, revocation, and a server that hands out devices or keys of its own.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from securechat import identity
from securechat.client import Client
from securechat.client.events import Closed, DirectMessage
from securechat.errors import AuthError
from securechat.server import Server

from .conftest import PASSPHRASE, wait_for

Connect = Callable[[str, str], Client]


@pytest.fixture
def device(
    server: Server,
    certs_dir: Path,
    make_identity: Callable[[str], identity.Identity],
    tmp_path: Path,
) -> Iterator[Connect]:
    """`device("alice", "phone")` logs in a device of alice: her key file copied to a folder of
    its own (its device files live beside it), so each name is another installation."""
    clients: list[Client] = []

    def connect(user: str, name: str) -> Client:
        original = make_identity(user).path
        assert original is not None
        path = tmp_path / "devices" / f"{user}-{name}" / original.name
        if not path.exists():
            path.parent.mkdir(parents=True)
            shutil.copy2(original, path)
        ident = identity.load(path, PASSPHRASE, min_kdf=identity.KDF_FAST_FOR_TESTS)
        host, port = server.address
        client = Client.connect(host, port, ident, user, certs_dir / "ca.pem")
        clients.append(client)
        return client

    try:
        yield connect
    finally:
        for client in clients:
            client.close()


def dms_until_quiet(client: Client, timeout: float = 1.0) -> list[DirectMessage]:
    """Every DirectMessage that arrives before `timeout` seconds of silence."""
    got = []
    while (event := client.next_event(timeout=timeout)) is not None:
        if isinstance(event, DirectMessage):
            got.append(event)
    return got


def seen(client: Client) -> list[tuple[str, str, bool]]:
    return sorted((d.sender, d.text, d.own) for d in dms_until_quiet(client))


def test_every_dm_reaches_each_device_of_both_people_once(device: Connect) -> None:
    laptop, phone = device("alice", "laptop"), device("alice", "phone")
    bob1, bob2 = device("bob", "one"), device("bob", "two")
    assert len({laptop.device_id, phone.device_id, bob1.device_id, bob2.device_id}) == 4
    reply = laptop.send_dm("bob", "hello bob").result(10)
    assert (reply["status"], reply["devices"]) == ("delivered", 3)
    reply = bob2.send_dm("alice", "hello alice").result(10)
    assert (reply["status"], reply["devices"]) == ("delivered", 3)
    assert seen(laptop) == [("bob", "hello alice", False)]
    assert seen(phone) == [("alice", "hello bob", True), ("bob", "hello alice", False)]
    assert seen(bob1) == [("alice", "hello bob", False), ("bob", "hello alice", True)]
    assert seen(bob2) == [("alice", "hello bob", False)]


def test_a_revoked_device_is_cut_off_and_gets_nothing_more(device: Connect) -> None:
    laptop, phone = device("alice", "laptop"), device("alice", "phone")
    bob = device("bob", "one")
    laptop.send_dm("bob", "before").result(10)
    assert seen(phone) == [("alice", "before", True)]
    lost = phone.device_id
    reply = laptop.revoke_device(lost)
    assert (reply["device_id"], reply["dropped"]) == (lost, 0)
    closed = wait_for(phone, lambda e: isinstance(e, Closed))
    assert closed.reason == "this device was revoked"
    listed = {d.device_id: d.revoked for d in bob.devices("alice")}
    assert listed == {laptop.device_id: False, lost: True}
    reply = bob.send_dm("alice", "after").result(10)
    assert reply["devices"] == 1
    assert seen(laptop) == [("bob", "after", False)]
    with pytest.raises(AuthError, match="this device was revoked; it cannot log in"):
        device("alice", "phone")
