"""The client's encrypted local history: nothing readable on disk, conversations and search after
a restart, one copy of a redelivered DM, and --no-history."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import stat
from dataclasses import asdict
from pathlib import Path

import pytest

from securechat import identity
from securechat.client import Client
from securechat.client.chat_session import ChatSession
from securechat.client.events import DirectMessage, Message
from securechat.client.history import Entry, HistoryError, LocalHistory, history_path
from securechat.terminal.controller import Controller
from securechat.terminal.notices import as_text

from .cli_helpers import LineClient, run_client
from .conftest import PASSPHRASE, close_and_see_it_part, drop_acks, wait_for

SECRET_WORDS = ("marmalade", "zeppelin", "quokka")


def every_byte(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


def dial(server, certs_dir: Path, ident, user: str, history: LocalHistory | None) -> Client:
    host, port = server.address
    return Client.connect(host, port, ident, user, certs_dir / "ca.pem", history=history)


def undated(line: str) -> str:
    return line.split("] ", 1)[1] if line.startswith("[") else line


def run_lines(client: Client, *lines: str) -> list[str]:
    out: list[str] = []
    controller = Controller(ChatSession(client), lambda notice: out.append(as_text(notice)))
    for line in lines:
        controller.handle_line(line)
    return out


# -- the store on its own -------------------------------------------------------------------------


def test_entries_are_kept_once_and_read_back_by_conversation(make_identity, tmp_path) -> None:
    alice = make_identity("alice")
    history = LocalHistory.beside(alice)
    assert history.path == tmp_path / "keys" / "alice.history.db"
    dm = Entry("@bob", "bob", "the marmalade is in the zeppelin", 2_000, msg_id="m1")
    room = Entry("#lobby", "carol", "quokka sighting", 1_000)
    assert history.add(dm) is True
    assert history.add(room) is True
    assert history.add(dm) is False  # a redelivered DM: same sender and id
    assert history.add(Entry("#lobby", "carol", "quokka sighting", 1_000)) is False
    assert history.add(Entry("#lobby", "carol", "quokka sighting", 3_000)) is True  # said again
    assert history.seen_dm("bob", "m1") and not history.seen_dm("carol", "m1")
    assert history.conversation("@bob") == [dm]
    assert [e.ts for e in history.conversation("#lobby")] == [1_000, 3_000]
    assert history.conversation("#lobby", limit=1)[0].ts == 3_000  # the newest
    assert history.conversation("@carol") == []
    assert len(history) == 3
    history.close()
    assert stat.S_IMODE(os.stat(history.path).st_mode) == 0o600


def test_search_needs_every_word_in_any_case(make_identity) -> None:
    history = LocalHistory.beside(make_identity("alice"))
    for i, text in enumerate(
        ["Zeppelin over the harbour", "a zeppelin of marmalade", "MARMALADE only", "nothing"]
    ):
        history.add(Entry("#lobby", "bob", text, 1_000 + i))
    assert [e.text for e in history.search("marmalade ZEPPELIN")] == ["a zeppelin of marmalade"]
    assert [e.text for e in history.search("marmalade")] == [
        "a zeppelin of marmalade",
        "MARMALADE only",
    ]
    assert [e.text for e in history.search("zeppelin", limit=1)] == ["a zeppelin of marmalade"]
    assert history.search("walrus") == []
    assert history.search("   ") == []


def test_the_file_holds_no_plaintext(make_identity, tmp_path) -> None:
    history = LocalHistory.beside(make_identity("alice"))
    for i, word in enumerate(SECRET_WORDS):
        history.add(Entry("@bobbington", "bobbington", f"secret {word}", i, msg_id=f"id-{word}"))
        history.add(Entry("#hideout", "carolyne", f"room {word}", i))
    assert len(history.search("secret")) == 3
    folder = history.path.parent
    blob = every_byte(folder)  # the database and its write-ahead log, as they are on disk
    history.close()
    blob += every_byte(folder)
    for needle in (*SECRET_WORDS, "bobbington", "carolyne", "hideout", "id-quokka"):
        assert needle.encode() not in blob, needle


def test_another_identity_cannot_open_it(make_identity, tmp_path) -> None:
    alice = make_identity("alice")
    LocalHistory.beside(alice).close()
    mallory = make_identity("mallory")
    with pytest.raises(HistoryError) as info:
        LocalHistory(history_path(alice.path), mallory)
    assert str(info.value) == (
        f"the local history {history_path(alice.path)} belongs to another identity key; "
        "move it aside or use --no-history"
    )


def test_the_same_identity_reopens_it_after_loading_the_key_again(make_identity) -> None:
    alice = make_identity("alice")
    with_key = LocalHistory.beside(alice)
    with_key.add(Entry("@bob", "bob", "hello again", 5, msg_id="x"))
    with_key.close()
    reloaded = identity.load(alice.path, PASSPHRASE, min_kdf=identity.KDF_FAST_FOR_TESTS)
    assert [e.text for e in LocalHistory.beside(reloaded).conversation("@bob")] == ["hello again"]


def test_a_damaged_row_is_skipped_and_the_rest_stays_readable(make_identity) -> None:
    history = LocalHistory.beside(make_identity("alice"))
    history.add(Entry("@bob", "bob", "first", 1, msg_id="a"))
    history.add(Entry("@bob", "bob", "second", 2, msg_id="b"))
    path = history.path
    history.close()
    with sqlite3.connect(path) as db:
        (blob,) = db.execute("SELECT blob FROM entries ORDER BY seq LIMIT 1").fetchone()
        db.execute(
            "UPDATE entries SET blob = ? WHERE seq = 1", (blob[:-1] + bytes([blob[-1] ^ 1]),)
        )
    reopened = LocalHistory.beside(make_identity("alice"))
    recalled = reopened.conversation("@bob")
    assert ([e.text for e in recalled], recalled.refused) == (["second"], 1)


def test_rows_moved_between_conversations_are_detected_and_reported(
    server, certs_dir, make_identity
) -> None:
    alice = make_identity("alice")
    history = LocalHistory.beside(alice)
    history.add(Entry("@bob", "bob", "lunch at noon?", 1_000, msg_id="from-bob-1"))
    history.add(Entry("@carol", "carol", "the vault code is 7291", 2_000, msg_id="from-carol"))
    history.add(Entry("#lobby", "dave", "vault tours resume monday", 3_000))
    history.close()
    # Someone with the file (but not the key) files carol's DM and a room line under bob's
    # conversation tag, and copies carol's sealed blob over bob's row.
    with sqlite3.connect(history_path(alice.path)) as db:
        rows = db.execute("SELECT seq, conv, blob FROM entries ORDER BY seq").fetchall()
        (bob_seq, bob_conv, _), (carol_seq, _, carol_blob), (room_seq, _, _) = rows
        db.execute(
            "UPDATE entries SET conv = ? WHERE seq IN (?, ?)", (bob_conv, carol_seq, room_seq)
        )
        db.execute("UPDATE entries SET blob = ? WHERE seq = ?", (carol_blob, bob_seq))

    reopened = LocalHistory.beside(alice)
    assert (list(reopened.conversation("@bob")), reopened.conversation("@bob").refused) == ([], 3)
    assert reopened.conversation("@carol") == []  # its row now claims to be bob's
    with dial(server, certs_dir, alice, "alice", reopened) as client:
        out = run_lines(client, "/history @bob", "/search vault")
    reopened.close()
    warning = (
        "!! {} entries of your local history failed their integrity check (damaged, altered,"
        " or moved from another conversation) and were not shown"
    )
    assert out == [
        "-- 0 messages with bob in your local history",
        warning.format(3),
        '-- 0 messages found for "vault"',
        warning.format(3),
    ]


def test_a_room_line_an_older_version_filed_as_a_dm_is_refused(make_identity) -> None:
    # Before room names were checked, a server could have a room line "in @bob" recorded under
    # bob's DM conversation. The file format is unchanged, so such a row may still be there.
    history = LocalHistory.beside(make_identity("alice"))
    forged = Entry("@bob", "bob", "forged, never sealed", 1_000)  # no message id: not a DM
    assert history.add(forged) is False
    assert history.add(Entry("#lobby", "bob", "a DM id on a room line", 1_000, msg_id="x")) is False
    plain = json.dumps(asdict(forged)).encode()
    with sqlite3.connect(history.path) as db:
        db.execute(
            "INSERT INTO entries (tag, conv, blob) VALUES (?, ?, ?)",
            (history._entry_tag(forged), history._tag("conv", "@bob"), history._box.encrypt(plain)),
        )
    history.add(Entry("@bob", "bob", "a real DM", 2_000, msg_id="real-one"))
    recalled = history.conversation("@bob")
    assert ([e.text for e in recalled], recalled.refused) == (["a real DM"], 1)
    found = history.search("forged")
    assert (list(found), found.refused) == ([], 1)
    history.close()


def test_an_unwritable_history_is_a_clear_error(make_identity, tmp_path) -> None:
    alice = make_identity("alice")
    history_path(alice.path).mkdir()  # something that is not a database is in the way
    with pytest.raises(HistoryError) as info:
        LocalHistory.beside(alice)
    assert str(info.value).startswith(f"cannot open the local history {history_path(alice.path)}")
    assert str(info.value).endswith("use --no-history to chat without it")


# -- with a real server ---------------------------------------------------------------------------


def test_dms_and_rooms_are_there_after_a_restart(server, certs_dir, make_identity) -> None:
    alice_key, bob_key = make_identity("alice"), make_identity("bob")
    bob_history = LocalHistory.beside(bob_key)
    with (
        dial(server, certs_dir, alice_key, "alice", LocalHistory.beside(alice_key)) as alice,
        dial(server, certs_dir, bob_key, "bob", bob_history) as bob,
    ):
        alice.send_dm("bob", "the marmalade is ready").result(5)
        wait_for(bob, lambda e: isinstance(e, DirectMessage))
        bob.send_dm("alice", "bring the zeppelin").result(5)
        alice.send("#lobby", "quokka at noon").result(5)
        wait_for(bob, lambda e: isinstance(e, Message) and e.text == "quokka at noon")
    bob_history.close()

    # A new process, in effect: the key is loaded again and the history reopened.
    bob_again = identity.load(bob_key.path, PASSPHRASE, min_kdf=identity.KDF_FAST_FOR_TESTS)
    with dial(server, certs_dir, bob_again, "bob", LocalHistory.beside(bob_again)) as bob:
        out = run_lines(bob, "/history @alice", "/search MARMALADE", "/search quokka noon")
    assert [undated(line) for line in out] == [
        "*alice* the marmalade is ready",
        "-> *alice* bring the zeppelin",
        "-- 2 messages with alice in your local history",
        "*alice* the marmalade is ready",
        '-- 1 messages found for "MARMALADE"',
        "#lobby <alice> quokka at noon",
        '-- 1 messages found for "quokka noon"',
    ]
    assert re.match(r"\[\d{4}-\d\d-\d\d \d\d:\d\d\] ", out[0])  # dated: may be another day


def test_a_redelivered_dm_is_shown_once_across_restarts(
    server, certs_dir, make_identity, monkeypatch
) -> None:
    alice_key, bob_key = make_identity("alice"), make_identity("bob")
    with dial(server, certs_dir, alice_key, "alice", None) as alice:
        # bob has a name, and is offline
        close_and_see_it_part(dial(server, certs_dir, bob_key, "bob", None), alice)
        assert alice.send_dm("bob", "did you get this?").result(5)["status"] == "queued"
        assert alice.send_dm("bob", "and this?").result(5)["status"] == "queued"
    drop_acks(monkeypatch)
    history = LocalHistory.beside(bob_key)
    with dial(server, certs_dir, bob_key, "bob", history) as bob:
        assert bob.wait_queue(5)
        shown = [wait_for(bob, lambda e: isinstance(e, DirectMessage)).text for _ in range(2)]
        assert shown == ["did you get this?", "and this?"]  # shown, but the acks are lost
    history.close()
    monkeypatch.undo()

    bob_again = identity.load(bob_key.path, PASSPHRASE, min_kdf=identity.KDF_FAST_FOR_TESTS)
    with dial(server, certs_dir, bob_again, "bob", LocalHistory.beside(bob_again)) as bob:
        assert bob.wait_queue(5)  # the server delivered both again...
        bob.ping().result(5)
        events = list(iter(lambda: bob.next_event(timeout=0), None))
        assert [e for e in events if isinstance(e, DirectMessage)] == []  # none shown twice
        assert bob.wait_idle(5)
    pending = server.store.pending_envelopes
    assert server._worker.submit(pending, "bob", bob.device_id, 0).result(5) == []


def test_no_history_keeps_nothing_and_says_so(server, certs_dir, make_identity) -> None:
    with dial(server, certs_dir, make_identity("alice"), "alice", None) as alice:
        out = run_lines(alice, "/history @bob", "/search anything")
    assert out == ["!! local history is off (--no-history)"] * 2
    assert not history_path(make_identity("alice").path).exists()


# -- through the CLI ------------------------------------------------------------------------------


def test_cli_history_and_search_after_a_restart(server, certs_dir, tmp_path) -> None:
    port = server.address[1]
    ca = certs_dir / "ca.pem"
    alice_key, bob_key = tmp_path / "cli" / "alice.key", tmp_path / "cli" / "bob.key"
    for key, user in ((bob_key, "bob"), (alice_key, "alice")):
        assert run_client(key, port, ca, "", user=user).returncode == 0
    bob = LineClient(bob_key, port, ca)
    bob.out.wait_for("joined #lobby")
    sent = run_client(alice_key, port, ca, "/msg bob the marmalade is ready\nquokka at noon\n")
    assert sent.returncode == 0, sent.stderr
    bob.out.wait_for("<alice> quokka at noon")
    assert bob.finish() == 0

    later = run_client(bob_key, port, ca, "/history @alice\n/search quokka\n")
    assert later.returncode == 0, later.stderr
    lines = [undated(line) for line in later.stdout.splitlines()]
    assert "*alice* the marmalade is ready" in lines
    assert "-- 1 messages with alice in your local history" in lines
    assert "#lobby <alice> quokka at noon" in lines
    assert '-- 1 messages found for "quokka"' in lines
    assert b"marmalade" not in every_byte(tmp_path / "cli")


def test_cli_no_history_flag(server, certs_dir, tmp_path) -> None:
    key = tmp_path / "cli" / "carol.key"
    done = run_client(
        key, server.address[1], certs_dir / "ca.pem", "/search x\n", "--no-history", user="carol"
    )
    assert done.returncode == 0, done.stderr
    assert "!! local history is off (--no-history)" in done.stdout
    # No history file: only the key and the device's own state (device, sessions, chains).
    assert sorted(p.name for p in key.parent.iterdir()) == [
        "carol.conversations.json",
        "carol.device.json",
        "carol.key",
        "carol.olm-sessions.json",
    ]
