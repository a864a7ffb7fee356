"""A hostile server that drops the connection and, once the client is back, replays a DM it had
already delivered. The replay guard is saved with the device's state after every DM, so the copy
is refused with a warning (or, redelivered from the queue, not shown twice), whether a local
history is kept, kept but emptied behind the client's back, or off (--no-history), and in a
new process too."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from securechat.client import Client
from securechat.client.dm import DeviceState
from securechat.client.events import Closed, DirectMessage, DMRejected, Joined
from securechat.client.history import LocalHistory
from securechat.terminal.render import render

from .conftest import rewrite_sent_frames, wait_for

SECRET = "the shipment moves on tuesday"


def dial(server, certs_dir: Path, ident, user: str, history: LocalHistory | None) -> Client:
    host, port = server.address
    return Client.connect(host, port, ident, user, certs_dir / "ca.pem", history=history)


def a_dm(e) -> bool:
    return isinstance(e, DirectMessage | DMRejected)


@pytest.mark.parametrize("history_kind", ["no-history", "history", "history-emptied"])
def test_a_dm_replayed_after_a_reconnect_is_refused(
    server, certs_dir, make_identity, monkeypatch, history_kind
) -> None:
    bob_key = make_identity("bob")
    history = None if history_kind == "no-history" else LocalHistory.beside(bob_key)
    delivered: list[dict] = []
    rewrite_sent_frames(monkeypatch, "dm", lambda f: delivered.append(f) or [f])
    alice = dial(server, certs_dir, make_identity("alice"), "alice", None)
    bob = dial(server, certs_dir, bob_key, "bob", history)
    second: Client | None = None
    try:
        wait_for(alice, lambda e: isinstance(e, Joined) and e.user == "bob")
        alice.send_dm("bob", SECRET).result(5)
        assert wait_for(bob, a_dm).text == SECRET
        [old] = delivered
        if history_kind == "history-emptied":
            # A history that lost its rows (a damaged or tampered file) knows nothing of it.
            with sqlite3.connect(history.path) as db:
                db.execute("DELETE FROM entries")
            assert history.seen_dm("alice", old["msg_id"]) is False

        # The server drops bob's connection; bob's client dials again (a new Client, as the
        # terminal's and the GUI's reconnect loops make) and the server replays the old DM,
        # live and as if from the offline queue, before a fresh one.
        second = dial(server, certs_dir, bob_key, "bob", history)
        assert wait_for(bob, lambda e: isinstance(e, Closed)).reason.startswith("logged in again")
        rewrite_sent_frames(monkeypatch, "dm", lambda f: [dict(old), {**old, "queued": True}, f])
        alice.send_dm("bob", "a fresh one").result(5)
        refused = wait_for(second, a_dm)
        assert isinstance(refused, DMRejected)
        assert (refused.sender, refused.kind) == ("alice", "replayed")
        assert SECRET not in refused.detail
        assert render(refused).startswith("!! a direct message from alice was refused (replayed)")
        fresh = wait_for(second, a_dm)  # the queued copy was not shown again
        assert (type(fresh), fresh.text) == (DirectMessage, "a fresh one")
        second.ping().result(5)
        assert [e for e in iter(lambda: second.next_event(0), None) if a_dm(e)] == []
    finally:
        for client in (alice, bob, second):
            if client is not None:
                client.close()
        if history is not None:
            history.close()


def test_the_replay_memory_is_saved_with_the_device(server, certs_dir, make_identity) -> None:
    bob_key = make_identity("bob")
    alice = dial(server, certs_dir, make_identity("alice"), "alice", None)
    bob = dial(server, certs_dir, bob_key, "bob", None)
    try:
        msg_id = alice.send_dm("bob", SECRET).result(5)["msg_id"]
        assert wait_for(bob, a_dm).text == SECRET
    finally:
        alice.close()
        bob.close()
    # What a restarted client (a new process) loads from beside the key file.
    assert DeviceState(bob_key, "bob").tracker.guard.seen("alice", msg_id)
