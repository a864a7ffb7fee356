"""Durable messaging: queued DMs survive SIGKILL, leave only when acknowledged, respect quotas
and expiry; room history is kept, replayed on join, and survives a restart."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from securechat.client import Client, RequestError
from securechat.client.events import DirectMessage, Message
from securechat.errors import StorageError

from .cli_helpers import ServerProcess
from .conftest import close_and_see_it_part, drop_acks, join_plain, start_server, wait_for
from .raw import RawTLS


def dial(address, certs_dir: Path, ident, user: str) -> Client:
    host, port = address
    return Client.connect(host, port, ident, user, certs_dir / "ca.pem")


def dms(client: Client, count: int) -> list[DirectMessage]:
    return [wait_for(client, lambda e: isinstance(e, DirectMessage)) for _ in range(count)]


def test_queued_dms_survive_sigkill_and_arrive_in_order_once(
    certs_dir, tmp_path, make_identity
) -> None:
    data = tmp_path / "data"
    first = ServerProcess("--certs", str(certs_dir), "--data", str(data), cwd=tmp_path)
    try:
        dial(first.address, certs_dir, make_identity("bob"), "bob").close()  # bob has a name
        with dial(first.address, certs_dir, make_identity("alice"), "alice") as alice:
            replies = [alice.send_dm("bob", f"note {i}").result(5) for i in range(20)]
        assert {r["status"] for r in replies} == {"queued"}
    finally:
        first.stop(signal.SIGKILL)  # every DM above was acknowledged as queued before this
    second = ServerProcess("--certs", str(certs_dir), "--data", str(data), cwd=tmp_path)
    try:
        with dial(second.address, certs_dir, make_identity("bob"), "bob") as bob:
            got = dms(bob, 20)
            assert [d.text for d in got] == [f"note {i}" for i in range(20)]
            assert [d.message_id for d in got] == [r["msg_id"] for r in replies]
            bob.ping().result(5)
            assert bob.next_event(timeout=0.2) is None  # no duplicate shown
    finally:
        assert second.stop() == 0
    for path in data.iterdir():
        assert b"note 1" not in path.read_bytes()


def test_dm_not_acknowledged_is_delivered_again(
    server, certs_dir, make_identity, monkeypatch
) -> None:
    with dial(server.address, certs_dir, make_identity("alice"), "alice") as alice:
        first = dial(server.address, certs_dir, make_identity("bob"), "bob")
        device = first.device_id
        close_and_see_it_part(first, alice)
        assert alice.send_dm("bob", "did you get this?").result(5)["status"] == "queued"
    drop_acks(monkeypatch)
    with dial(server.address, certs_dir, make_identity("bob"), "bob") as bob:
        [shown] = dms(bob, 1)
        assert shown.text == "did you get this?"  # shown, but the ack is lost
    monkeypatch.undo()
    pending = server._worker.submit(server.store.pending_envelopes, "bob", device, 0).result(5)
    assert [dm.msg_id for dm in pending] == [shown.message_id]
    with dial(server.address, certs_dir, make_identity("bob"), "bob") as bob:
        # The server delivers it again; this device showed it already (its saved state says
        # so), so it is not shown twice, but it is acknowledged now (the ack leaves before this
        # ping).
        assert bob.wait_queue(5)
        bob.ping().result(5)
        assert [
            e for e in iter(lambda: bob.next_event(0), None) if isinstance(e, DirectMessage)
        ] == []
    assert server._worker.submit(server.store.pending_envelopes, "bob", device, 0).result(5) == []


def test_a_full_queue_refuses_with_a_clear_error(certs_dir, tmp_path, make_identity) -> None:
    srv = start_server(certs_dir, tmp_path / "data", dm_quota_count=2, dm_sender_share=100)
    try:
        with dial(srv.address, certs_dir, make_identity("alice"), "alice") as alice:
            bob = dial(srv.address, certs_dir, make_identity("bob"), "bob")
            close_and_see_it_part(bob, alice)
            alice.send_dm("bob", "one").result(5)
            alice.send_dm("bob", "two").result(5)
            with pytest.raises(RequestError) as info:
                alice.send_dm("bob", "three").result(5)
        assert info.value.code == "quota_exceeded"
        assert info.value.message.startswith(
            f"bob's queue of waiting messages for device {bob.device_id} is full (2 messages"
        )
    finally:
        srv.stop()


def test_byte_quota(certs_dir, tmp_path, make_identity) -> None:
    # A body of 1,000 bytes is padded to the 2,048-byte bucket: two do not fit in 4,000 bytes.
    srv = start_server(certs_dir, tmp_path / "data", dm_quota_bytes=4000, dm_sender_share=100)
    try:
        with dial(srv.address, certs_dir, make_identity("alice"), "alice") as alice:
            close_and_see_it_part(dial(srv.address, certs_dir, make_identity("bob"), "bob"), alice)
            alice.send_dm("bob", "x" * 1000).result(5)
            with pytest.raises(RequestError) as info:
                alice.send_dm("bob", "y" * 1000).result(5)
        assert info.value.code == "quota_exceeded"
    finally:
        srv.stop()


def test_one_sender_cannot_fill_anothers_queue_for_everyone(
    certs_dir, tmp_path, make_identity
) -> None:
    """mallory fills her share of bob's queue (a quarter of it) and is told so; alice's DM to bob
    is still queued and reaches him."""
    srv = start_server(certs_dir, tmp_path / "data", dm_quota_count=8, dm_sender_share=25)
    try:
        with dial(srv.address, certs_dir, make_identity("mallory"), "mallory") as mallory:
            first = dial(srv.address, certs_dir, make_identity("bob"), "bob")
            close_and_see_it_part(first, mallory)
            for i in range(2):
                assert mallory.send_dm("bob", f"spam {i}").result(5)["status"] == "queued"
            with pytest.raises(RequestError) as info:
                mallory.send_dm("bob", "spam 2").result(5)
        assert info.value.code == "quota_exceeded"
        assert info.value.message.startswith(
            f"your share of bob's queue of waiting messages for device {first.device_id} is full"
            " (2 messages, "
        )
        assert "one sender may have at most 2 messages or 2621440 bytes" in info.value.message
        with dial(srv.address, certs_dir, make_identity("alice"), "alice") as alice:
            assert alice.send_dm("bob", "lunch?").result(5)["status"] == "queued"
        with dial(srv.address, certs_dir, make_identity("bob"), "bob") as bob:
            got = dms(bob, 3)
        assert [(d.sender, d.text) for d in got] == [
            ("mallory", "spam 0"),
            ("mallory", "spam 1"),
            ("alice", "lunch?"),
        ]
    finally:
        srv.stop()


def test_queued_dms_expire(certs_dir, tmp_path, make_identity) -> None:
    srv = start_server(certs_dir, tmp_path / "data", dm_ttl_ms=1)
    try:
        with dial(srv.address, certs_dir, make_identity("alice"), "alice") as alice:
            close_and_see_it_part(dial(srv.address, certs_dir, make_identity("bob"), "bob"), alice)
            assert alice.send_dm("bob", "too late").result(5)["status"] == "queued"
        with dial(srv.address, certs_dir, make_identity("bob"), "bob") as bob:
            # A key look-up runs on the store's worker after the login's queue read, so once
            # it is answered anything queued for bob has been handed to him.
            bob.check_key("alice")
            assert bob.wait_queue(5)
            events = []
            while (event := bob.next_event(timeout=0)) is not None:
                events.append(event)
            assert not [e for e in events if isinstance(e, DirectMessage)]
            pending = srv.store.pending_envelopes
            assert srv._worker.submit(pending, "bob", bob.device_id, 0).result(5) == []
    finally:
        srv.stop()


def test_room_history_on_join_on_request_and_after_restart(
    certs_dir, tmp_path, make_identity
) -> None:
    data = tmp_path / "data"
    srv = start_server(certs_dir, data, history=3)
    try:
        with dial(srv.address, certs_dir, make_identity("alice"), "alice") as alice:
            join_plain(alice, "#dev")
            for i in range(5):
                alice.send("#dev", f"line {i}").result(5)
            alice.send("#dev", "waves", action=True).result(5)
        with dial(srv.address, certs_dir, make_identity("bob"), "bob") as bob:
            bob.join("#dev").result(5)
            seen = [wait_for(bob, lambda e: isinstance(e, Message)) for _ in range(3)]
            assert [(m.text, m.history, m.action) for m in seen] == [
                ("line 3", True, False),
                ("line 4", True, False),
                ("waves", True, True),
            ]
            shown = bob.history_events(bob.room_history("#dev", 2).result(5))
            assert [m.text for m in shown if isinstance(m, Message)] == ["line 4", "waves"]
    finally:
        srv.stop()
    srv = start_server(certs_dir, data, history=3)
    try:
        with dial(srv.address, certs_dir, make_identity("carol"), "carol") as carol:
            carol.join("#dev").result(5)
            texts = [wait_for(carol, lambda e: isinstance(e, Message)).text for _ in range(3)]
            assert texts == ["line 3", "line 4", "waves"]
    finally:
        srv.stop()


def test_offline_dm_survives_sigkill_through_the_cli_alone(certs_dir, tmp_path, cli_key) -> None:
    """Issue 4, done when: alice DMs bob while bob is offline; the server is killed with SIGKILL
    and restarted; bob logs in and reads the DM; the server's data folder never held the text;
    a user who joins #lobby late sees the earlier room messages."""
    from .cli_helpers import run_client

    key = cli_key
    secret = "the treasure is buried under the old oak"
    ca, data = certs_dir / "ca.pem", tmp_path / "data"
    server = ServerProcess("--certs", str(certs_dir), "--data", str(data), cwd=tmp_path)
    try:
        port = server.address[1]
        assert run_client(key("bob"), port, ca, "", user="bob").returncode == 0
        alice = run_client(
            key("alice"), port, ca, f"before the crash\n/msg bob {secret}\n", user="alice"
        )
        assert alice.returncode == 0, alice.stderr
        assert alice.stdout.splitlines()[-2].endswith(
            f"-> *bob* [first seen] {secret} (queued: they are offline)"
        )
        assert alice.stdout.splitlines()[-1].endswith("/verify bob")
    finally:
        server.stop(signal.SIGKILL)
    server = ServerProcess("--certs", str(certs_dir), "--data", str(data), cwd=tmp_path)
    try:
        port = server.address[1]
        bob = run_client(key("bob"), port, ca, "")
        assert bob.returncode == 0, bob.stderr
        lines = bob.stdout.splitlines()
        assert any(line.endswith("] [history] <alice> before the crash") for line in lines)
        assert any(line.endswith(f"] *alice* [first seen] {secret}") for line in lines)
        for path in data.iterdir():
            assert secret.encode() not in path.read_bytes(), path
    finally:
        assert server.stop() == 0


def test_a_store_failure_is_answered_with_server_error_and_closes_the_connection(
    server, certs_dir, make_identity, monkeypatch
) -> None:
    def failing_disk(user: str) -> bytes | None:
        # A disk that fails on demand cannot be made; the store raises what SQLite would give.
        raise StorageError("server database error: disk I/O error")

    monkeypatch.setattr(server.store, "public_key", failing_disk)
    with RawTLS(server.address, certs_dir / "ca.pem") as raw:
        raw.login("alice", make_identity("alice"))
        raw.send_frame({"type": "keys", "id": 7, "user": "bob"})
        error = raw.frame_of("error")
        assert error == {
            "type": "error",
            "code": "server_error",
            "message": "server storage error",
            "id": 7,
        }
        assert raw.until_closed() == []
