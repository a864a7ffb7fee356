"""The terminal front ends: command parsing, safe rendering, the interactive prompt driven through
a real prompt_toolkit pipe, and line mode through real `securechat client` subprocesses."""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput

from securechat import identity
from securechat.client.chat_session import ChatSession
from securechat.client.events import (
    Closed,
    DirectMessage,
    DMRejected,
    Joined,
    Message,
    Parted,
    ServerError,
)
from securechat.client.reconnect import backoff_delays
from securechat.client.text import clean, stamp
from securechat.terminal import console
from securechat.terminal.commands import Command, CommandError, Say, parse
from securechat.terminal.render import one_line, render

from .cli_helpers import REPO, LineClient, ServerProcess, cli_env, client_args, run_client
from .conftest import PASSPHRASE, plain_room_kept, wait_for

TS = 1_700_000_000_000  # any fixed day before today; rendered in local time, with its date


def dated(ts: int = TS) -> str:
    from datetime import datetime

    return datetime.fromtimestamp(ts / 1000).strftime("%Y-%m-%d %H:%M")


# -- commands -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "parsed"),
    [
        ("hello there", Say("hello there")),
        ("//etc/passwd is a file", Say("/etc/passwd is a file")),
        ("/join #dev", Command("join", ("#dev",))),
        ("/join Dev", Command("join", ("#dev",))),
        ("/part", Command("part")),
        ("/part dev", Command("part", ("#dev",))),
        ("/rooms", Command("rooms")),
        ("/who", Command("who")),
        ("/who #ops", Command("who", ("#ops",))),
        ("/me waves  at everyone", Command("me", ("waves  at everyone",))),
        ("/msg Bob hi  there\nsecond line", Command("msg", ("bob", "hi  there\nsecond line"))),
        ("/query bob", Command("query", ("bob",))),
        ("/query", Command("query")),
        ("/whois bob", Command("whois", ("bob",))),
        ("/verify bob", Command("verify", ("bob",))),
        ("/verify Bob emoji", Command("verify", ("bob", "emoji"))),
        ("/trust bob", Command("trust", ("bob",))),
        ("/trust Bob 6937 A1B2", Command("trust", ("bob", "6937", "A1B2"))),
        ("/help", Command("help")),
        ("/QUIT", Command("quit")),
        ("   ", None),
    ],
)
def test_parse(line: str, parsed) -> None:
    assert parse(line) == parsed


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("/teleport mars", "unknown command /teleport; /help lists the commands"),
        ("/join", "usage: /join #room"),
        ("/join #a #b", "usage: /join #room"),
        ("/msg bob", "usage: /msg user text"),
        ("/me", "usage: /me action"),
        ("/rooms now", "usage: /rooms"),
        ("/verify bob emoji now", "usage: /verify user [emoji|accept|match|differ|cancel]"),
    ],
)
def test_bad_commands_say_how_to_write_them(line: str, message: str) -> None:
    with pytest.raises(CommandError) as info:
        parse(line)
    assert str(info.value) == message


# -- rendering ------------------------------------------------------------------------------------


def test_render_each_event() -> None:
    assert render(Message("#lobby", "alice", "hi", TS), "#lobby") == f"[{dated()}] <alice> hi"
    assert render(Message("#dev", "alice", "hi", TS), "#lobby") == f"[{dated()}] #dev <alice> hi"
    assert render(Message("#lobby", "bob", "waves", TS, action=True), "#lobby") == (
        f"[{dated()}] * bob waves"
    )
    assert render(Message("#lobby", "bob", "old", TS, history=True), "#lobby") == (
        f"[{dated()}] [history] <bob> old"
    )
    for state, mark in (("new", "first seen"), ("pinned", "pinned"), ("verified", "verified")):
        assert render(DirectMessage("alice", "bob", "psst", TS, "id", state)) == (
            f"[{dated()}] *alice* [{mark}] psst"
        )
    assert render(Joined("#dev", "carol", TS)) == "-- carol joined #dev"
    assert render(Parted("#dev", "carol", "left", TS)) == "-- carol left #dev"
    assert render(Parted("#dev", "carol", "quit", TS)) == "-- carol left #dev (quit)"
    assert render(DMRejected("bob", "replayed", "seen before")) == (
        "!! a direct message from bob was refused (replayed): seen before"
    )
    assert render(ServerError("bad_json", "frame is not valid JSON")) == (
        "!! server: frame is not valid JSON (bad_json)"
    )
    assert render(Closed("server shutting down")) == "-- disconnected: server shutting down"


def test_escape_sequences_from_others_are_neutralised() -> None:
    hostile = "\x1b[2J\x1b]0;pwned\x07\x9b31m\u202egnp.exe\rgotcha\x08"
    out = render(Message("#lobby", "mal\x1b[1Alory", hostile, TS), "#lobby")
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in out)
    assert "\u202e" not in out
    assert out == (
        f"[{dated()}] <mal\\x1b[1Alory> \\x1b[2J\\x1b]0;pwned\\x07\\x9b31m"
        "\\u202egnp.exe\\x0dgotcha\\x08"
    )


# Trojan Source: bidirectional controls, zero-width characters and Unicode line separators.
INVISIBLE = (
    "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c"
    "\u200b\u200c\u200d\u2060\ufeff\u2028\u2029"
)


def test_bidi_and_zero_width_characters_are_shown_as_escapes() -> None:
    # Displayed, "\u202e...\u2066" would read as a harmless line with a reordered file name.
    hostile = "pay al\u200bice \u202eexe.txt\u2066 now\u2028-- alice joined #lobby"
    out = render(Message("#lobby", "bob", hostile, TS), "#lobby")
    assert out == (
        f"[{dated()}] <bob> pay al\\u200bice \\u202eexe.txt\\u2066 now\\u2028-- alice joined #lobby"
    )
    assert clean(INVISIBLE) == "".join(f"\\u{ord(c):04x}" for c in INVISIBLE)
    for event in (
        Message("#lobby", "bob", INVISIBLE, TS),
        DirectMessage("bob", "alice", INVISIBLE, TS, "id", "pinned"),
        DMRejected("bob", "tampered", INVISIBLE),
        Parted("#lobby", "bob", INVISIBLE, TS),
    ):
        assert not set(render(event, "#lobby")) & set(INVISIBLE), event
    # Text that merely looks unusual is left alone: accents, other scripts, emoji.
    assert clean("café, Привет, 東京, \U0001f600") == "café, Привет, 東京, \U0001f600"


def test_times_before_today_show_the_date() -> None:
    from datetime import datetime, timedelta

    now = datetime(2026, 11, 26, 9, 30)
    today = int(datetime(2026, 11, 26, 8, 5).timestamp() * 1000)
    six_days_ago = int(datetime(2026, 11, 20, 14, 2).timestamp() * 1000)
    assert stamp(today, now) == "08:05"
    assert stamp(six_days_ago, now) == "2026-11-20 14:02"
    assert stamp(int((now + timedelta(days=1)).timestamp() * 1000), now) == "2026-11-27 09:30"
    # A DM held back six days is dated, whatever today is.
    held = int((datetime.now() - timedelta(days=6)).timestamp() * 1000)
    line = render(DirectMessage("bob", "alice", "old news", held, "id", "pinned"))
    when = datetime.fromtimestamp(held / 1000)
    assert line == f"[{when:%Y-%m-%d %H:%M}] *bob* [pinned] old news"


def test_a_message_cannot_fake_a_status_line() -> None:
    out = render(
        Message("#lobby", "mallory", "hi\n-- alice joined #lobby\n!! server", TS), "#lobby"
    )
    lines = out.split("\n")
    assert lines[0] == f"[{dated()}] <mallory> hi"
    assert all(line.startswith("    | ") for line in lines[1:])


def test_line_mode_puts_every_event_on_one_line() -> None:
    text = render(Message("#lobby", "alice", "one\ntwo \\ three", TS), "#lobby")
    assert one_line(text) == f"[{dated()}] <alice> one\\ntwo \\\\ three"
    assert "\n" not in one_line(text)
    assert clean("tab\there") == "tab\\x09here"


# -- the interactive prompt, through a real prompt_toolkit pipe -----------------------------------


def start_console(client, pipe) -> tuple[threading.Thread, list[int]]:
    """The real interactive client reading keys from `pipe`; result gets its exit status."""
    result: list[int] = []
    thread = threading.Thread(
        target=lambda: result.append(
            console.run(ChatSession(client), "test", pt_input=pipe, pt_output=DummyOutput())
        )
    )
    thread.start()
    return thread, result


def test_console_sends_typed_lines_pastes_and_history(connect) -> None:
    alice, bob = connect("alice"), connect("bob")
    wait_for(alice, lambda e: isinstance(e, Joined) and e.user == "bob")
    with create_pipe_input() as pipe:
        thread, result = start_console(alice, pipe)
        pipe.send_text("hello from the prompt\r")
        assert wait_for(bob, lambda e: isinstance(e, Message)).text == "hello from the prompt"
        pipe.send_text("second line\r")
        assert wait_for(bob, lambda e: isinstance(e, Message)).text == "second line"
        # Up-arrow twice recalls the first line.
        pipe.send_text("\x1b[A\x1b[A\r")
        assert wait_for(bob, lambda e: isinstance(e, Message)).text == "hello from the prompt"
        # A bracketed paste of several lines goes out as one message.
        pipe.send_text("\x1b[200~line one\nline two\nline three\x1b[201~\r")
        assert wait_for(bob, lambda e: isinstance(e, Message)).text == (
            "line one\nline two\nline three"
        )
        pipe.send_text("/quit\r")
        thread.join(15)
    assert result == [0]
    assert wait_for(bob, lambda e: isinstance(e, Parted)).user == "alice"


def test_console_exits_non_zero_when_the_server_drops_us(connect, server) -> None:
    alice = connect("alice")
    with create_pipe_input() as pipe:
        thread, result = start_console(alice, pipe)
        alice.ping().result(5)
        server.stop()
        thread.join(15)
    assert result == [1]


# -- line mode, through real subprocesses ---------------------------------------------------------


@pytest.fixture
def keys(cli_key):
    """Key files the CLI accepts (conftest's cli_key)."""
    return cli_key


def test_two_line_mode_clients_chat_in_the_lobby(server, certs_dir, keys, make_identity) -> None:
    port, ca = server.address[1], certs_dir / "ca.pem"
    bob = LineClient(keys("bob"), port, ca, user="bob")
    try:
        bob.out.wait_for("-- bob joined #lobby")
        # alice's /join #dev finds it plain (a room it made would be end-to-end encrypted).
        plain_room_kept(server.address, certs_dir, make_identity("keeper"), "#dev")
        alice = run_client(
            keys("alice"), port, ca, "hello from alice\n/join #dev\n/me waves\n", user="alice"
        )
        assert alice.returncode == 0, alice.stderr
        lines = alice.stdout.splitlines()
        assert "-- alice joined #lobby" in lines
        assert "-- now talking in #dev (1 here)" in lines
        assert any(
            line.endswith("] #dev * alice waves") or line.endswith("] * alice waves")
            for line in lines
        ), lines
        said = bob.out.wait_for("<alice> hello from alice")
        assert said.endswith("] <alice> hello from alice\n")
        bob.out.wait_for("-- alice left #lobby (quit)")
        assert "waves" not in bob.out.text  # bob is not in #dev
    finally:
        assert bob.finish() == 0
    # The key file now remembers the name: --user is no longer needed.
    again = run_client(keys("bob"), port, ca, "back again\n")
    assert again.returncode == 0, again.stderr
    # ... and bob, joining the lobby again, first sees what was said there, marked as history.
    lines = again.stdout.splitlines()
    assert lines[0].endswith("] [history] <alice> hello from alice")
    assert lines[1] == "-- bob joined #lobby"


def test_a_second_key_claiming_a_taken_name_is_refused_and_sees_nothing(
    server, certs_dir, keys
) -> None:
    port, ca = server.address[1], certs_dir / "ca.pem"
    first = run_client(keys("alice"), port, ca, "I am alice\n", user="alice")
    assert first.returncode == 0, first.stderr
    thief = run_client(keys("mallory"), port, ca, "I am alice too\n", user="alice")
    assert thief.returncode == 1
    assert thief.stdout == ""
    assert thief.stderr == (
        f"securechat: error: 127.0.0.1:{port} refused the login: "
        'the name "alice" belongs to another identity key\n'
    )


def test_client_errors_are_one_clear_line(
    server, certs_dir, other_certs_dir, keys, tmp_path
) -> None:
    port = server.address[1]
    wrong_ca = run_client(keys("alice"), port, other_certs_dir / "ca.pem", "hi\n", user="alice")
    assert wrong_ca.returncode == 1
    assert wrong_ca.stderr.startswith(
        f"securechat: error: the server at 127.0.0.1:{port} failed certificate verification"
    )
    no_server = run_client(keys("alice"), 1, certs_dir / "ca.pem", "hi\n", user="alice")
    assert no_server.returncode == 1
    assert no_server.stderr.startswith("securechat: error: cannot connect to 127.0.0.1:1: ")
    no_user = run_client(keys("carol"), port, certs_dir / "ca.pem", "hi\n")
    assert no_user.returncode == 1
    assert no_user.stderr == (
        f"securechat: error: no user name yet for {keys('carol')}; "
        "pass --user NAME the first time\n"
    )
    bad_name = run_client(keys("carol"), port, certs_dir / "ca.pem", "hi\n", user="x y")
    assert bad_name.returncode == 1
    assert "user name 'x y' may hold only" in bad_name.stderr
    for result in (wrong_ca, no_server, no_user, bad_name):
        assert "Traceback" not in result.stderr


def test_a_line_that_is_not_utf8_is_refused_and_the_rest_still_goes(
    server, certs_dir, keys
) -> None:
    port, ca = server.address[1], certs_dir / "ca.pem"
    bob = LineClient(keys("bob"), port, ca, user="bob")
    try:
        bob.out.wait_for("-- bob joined #lobby")
        args = client_args(keys("alice"), port, ca, (), "alice")
        result = subprocess.run(
            args,
            cwd=REPO,
            env=cli_env(),
            input=b"bad \x9b byte\nafter the bad line\n",
            capture_output=True,
            timeout=60,
        )
        out, err = result.stdout.decode(), result.stderr.decode()
        assert result.returncode == 1, err  # something was not sent
        assert (
            "!! that line is not valid UTF-8 (check your terminal's or file's encoding); it " in out
        )
        assert "Traceback" not in err
        bob.out.wait_for("<alice> after the bad line")
        assert "bad" not in bob.out.text.replace("after the bad line", "")
    finally:
        assert bob.finish() == 0


def test_dm_through_the_cli_and_a_server_that_swaps_bobs_key(certs_dir, tmp_path, keys) -> None:
    """Issue 3, done when: through the CLI alone, alice's DM reaches bob; neither the server's
    data folder nor its log holds the text; and when alice later talks to a server that offers
    a different key for bob, she is warned, and nothing she writes to bob is sent."""
    secret = "the spare key is under the blue pot"
    ca = certs_dir / "ca.pem"
    honest = ServerProcess(
        "--certs",
        str(certs_dir),
        "--data",
        str(tmp_path / "honest"),
        "--log-level",
        "debug",
        cwd=tmp_path,
    )
    try:
        port = honest.address[1]
        bob = LineClient(keys("bob"), port, ca, user="bob")
        bob.out.wait_for("-- bob joined #lobby")
        alice = run_client(keys("alice"), port, ca, f"/msg bob {secret}\n", user="alice")
        assert alice.returncode == 0, alice.stderr
        *_, said, notice = alice.stdout.splitlines()
        assert said.endswith(f"-> *bob* [first seen] {secret}")
        assert notice.startswith("-- bob's key ") and notice.endswith("/verify bob")
        assert bob.out.wait_for(f"*alice* [first seen] {secret}").endswith(
            f"] *alice* [first seen] {secret}\n"
        )
        assert bob.finish() == 0
    finally:
        assert honest.stop() == 0
    stored = [p for p in (tmp_path / "honest").rglob("*") if p.is_file()]
    assert stored
    for path in stored:
        assert secret.encode() not in path.read_bytes()
    assert secret not in "".join(honest.log)
    assert "alice logged in" in "".join(honest.log)

    # Another server where "bob" belongs to a different key (a server that swapped it).
    hostile = ServerProcess(
        "--certs", str(certs_dir), "--data", str(tmp_path / "hostile"), cwd=tmp_path
    )
    try:
        port = hostile.address[1]
        fake_bob = LineClient(keys("not-bob"), port, ca, user="bob")
        fake_bob.out.wait_for("-- bob joined #lobby")
        alice = run_client(keys("alice"), port, ca, "/msg bob are you there?\nroom marker\n")
        assert alice.returncode == 1
        assert "!! WARNING: the key for bob has changed." in alice.stdout
        assert "Nothing will be sent to bob" in alice.stdout
        fake_bob.out.wait_for("<alice> room marker")
        assert "are you there" not in fake_bob.out.text
        assert fake_bob.finish() == 0
    finally:
        assert hostile.stop() == 0


def test_the_readme_bot_runs_as_written(server, certs_dir, tmp_path, connect) -> None:
    import re
    import subprocess
    import sys

    from .cli_helpers import LineReader, cli_env

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    [code] = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert len(code.strip().splitlines()) <= 10
    code = code.replace("12345", str(server.address[1])).replace(
        'Path("certs/ca.pem")', f"Path({str(certs_dir / 'ca.pem')!r})"
    )
    identity.create(tmp_path / "bot.key", b"bot passphrase")  # as the README says
    bot = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        alice = connect("alice")
        wait_for(alice, lambda e: isinstance(e, Joined) and e.user == "echobot", timeout=30)
        alice.send("#lobby", "ping bot").result(5)
        echo = wait_for(alice, lambda e: isinstance(e, Message) and e.sender == "echobot")
        assert echo.text == "alice said: ping bot"
    finally:
        bot.kill()
        errors = LineReader(bot.stderr)
        bot.wait(10)
        errors.join(10)
        bot.stdout.close()
        bot.stderr.close()
    assert "Traceback" not in errors.text


def test_whois_verify_and_trust_in_line_mode(server, certs_dir, keys) -> None:
    port, ca = server.address[1], certs_dir / "ca.pem"
    bob = LineClient(keys("bob"), port, ca, user="bob")
    try:
        bob.out.wait_for("-- bob joined #lobby")
        bob_fp = identity.load(keys("bob"), PASSPHRASE).fingerprint
        out = run_client(
            keys("alice"),
            port,
            ca,
            "/whois bob\n/verify bob\n/trust bob\n/whois bob\n/msg nobody hi\n",
            user="alice",
        )
        lines = out.stdout.splitlines()
        assert f"-- bob: key {bob_fp} (new)" in lines
        assert f"-- bob's key: {bob_fp} (pinned)" in lines
        [number] = [line for line in lines if line.startswith("-- safety number with bob: ")]
        assert f"-- bob's key {bob_fp} is now verified" in lines
        assert f"-- bob: key {bob_fp} (verified)" in lines
        assert "!! nobody is called nobody" in lines
        assert out.returncode == 0  # a refused look-up is reported, not a failed delivery
        bob.send("/verify alice")
        theirs = bob.out.wait_for("-- safety number with alice: ")
        assert theirs.split(": ")[1] == number.split(": ")[1] + "\n"
    finally:
        assert bob.finish() == 0


def test_console_reconnects_after_a_server_restart_and_sends_what_was_typed(
    certs_dir, tmp_path, make_identity
) -> None:
    import queue
    import time

    from securechat.client import Client

    from .conftest import plain_room_kept, start_server

    shown: queue.Queue[str] = queue.Queue()

    def wait_shown(fragment: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = shown.get(timeout=remaining)
            except queue.Empty:
                break
            if fragment in line:
                return line
        raise AssertionError(f"the console never showed {fragment!r}")

    data = tmp_path / "data"
    srv = start_server(certs_dir, data)
    port = srv.address[1]
    # Plain, and kept so by its history across the restart: the held line goes out as say.
    plain_room_kept(srv.address, certs_dir, make_identity("keeper"), "#dev")

    def dial() -> Client:
        return Client.connect(
            "127.0.0.1", port, make_identity("alice"), "alice", certs_dir / "ca.pem"
        )

    result: list[int] = []
    srv2 = None
    with create_pipe_input() as pipe:
        thread = threading.Thread(
            target=lambda: result.append(
                console.run(
                    ChatSession(dial(), dial),
                    "test",
                    pt_input=pipe,
                    pt_output=DummyOutput(),
                    on_output=shown.put,
                )
            )
        )
        thread.start()
        try:
            pipe.send_text("/join #dev\r")
            wait_shown("-- now talking in #dev")
            srv.stop()
            wait_shown("-- connection lost (server shutting down); reconnecting")
            pipe.send_text("typed while the server was down\r")
            wait_shown("-- not connected: this will be sent once we reconnect")
            srv2 = start_server(certs_dir, data, port=port)
            wait_shown("-- reconnected")
            with Client.connect(
                "127.0.0.1", port, make_identity("bob"), "bob", certs_dir / "ca.pem"
            ) as bob:
                bob.join("#dev").result(5)
                said = wait_for(
                    bob,
                    lambda e: (
                        isinstance(e, Message) and e.text == "typed while the server was down"
                    ),
                )
                assert (said.room, said.sender) == ("#dev", "alice")
            pipe.send_text("/quit\r")
            thread.join(15)
        finally:
            if srv2 is not None:
                srv2.stop()
    assert result == [0]


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    import random

    delays = backoff_delays(random.Random(7))
    got = [next(delays) for _ in range(10)]
    assert 0.25 <= got[0] <= 0.5 and 0.5 <= got[1] <= 1.0 and 1.0 <= got[2] <= 2.0
    assert all(15.0 <= d <= 30.0 for d in got[7:])
    assert len(set(got)) == len(got)


def test_two_devices_of_alice_through_the_cli_and_revoking_one(server, certs_dir, keys) -> None:
    """The same key file on a second machine is a second device: a DM it sends shows on the
    first as sent by alice, /devices lists both, and /revoke shuts the second out."""
    port, ca = server.address[1], certs_dir / "ca.pem"
    laptop_key = keys("alice")
    phone_key = laptop_key.parent.parent / "phone" / laptop_key.name
    phone_key.parent.mkdir(mode=0o700)
    shutil.copy2(laptop_key, phone_key)
    bob = LineClient(keys("bob"), port, ca, user="bob")
    laptop = LineClient(laptop_key, port, ca, user="alice")
    try:
        bob.out.wait_for("-- bob joined #lobby")
        laptop.out.wait_for("-- alice joined #lobby")
        phone = run_client(
            phone_key, port, ca, "/devices\n/msg bob hi from the phone\n", user="alice"
        )
        assert phone.returncode == 0, phone.stderr
        [mine] = [line for line in phone.stdout.splitlines() if "(this device)" in line]
        found = re.search(r"alice device ([A-Z2-7]{16}) \(this device\): key ", mine)
        assert found is not None, mine
        phone_id = found[1]
        assert sum("-- alice device " in line for line in phone.stdout.splitlines()) == 2
        bob.out.wait_for("*alice* [first seen] hi from the phone")
        laptop.out.wait_for(f"-> *bob* hi from the phone (sent from your device {phone_id})")
        laptop.send(f"/revoke {phone_id}")
        laptop.out.wait_for(f"-- device {phone_id} revoked: it can no longer log in or get DMs")
    finally:
        assert laptop.finish() == 0
        assert bob.finish() == 0
    again = run_client(phone_key, port, ca, "anyone?\n")
    assert again.returncode == 1
    assert again.stderr == (
        f"securechat: error: 127.0.0.1:{port} refused the login: this device was revoked; it "
        "cannot log in\n"
    )


def test_emoji_verification_in_line_mode_marks_both_keys_verified(server, certs_dir, keys) -> None:
    port, ca = server.address[1], certs_dir / "ca.pem"
    alice = LineClient(keys("alice"), port, ca, user="alice")
    bob = LineClient(keys("bob"), port, ca, user="bob")
    try:
        alice.out.wait_for("-- alice joined #lobby")
        bob.out.wait_for("-- bob joined #lobby")
        alice.send("/verify bob")
        assert alice.out.wait_for("-- or, while bob is online") == (
            "-- or, while bob is online, compare emoji with their device: /verify bob emoji\n"
        )
        alice.send("/verify bob emoji")
        assert "is online" in alice.out.wait_for("-- asked bob's device ")
        asked = bob.out.wait_for("wants to compare emoji with you")
        assert asked.startswith("!! alice (device ")
        assert asked.endswith("/verify alice accept to start, /verify alice cancel to refuse\n")
        bob.send("/verify alice accept")
        theirs = bob.out.wait_for("!! compare with alice: ")
        mine = alice.out.wait_for("!! compare with bob: ")
        assert (
            mine.split(": ", 1)[1].split(". Same")[0] == theirs.split(": ", 1)[1].split(". Same")[0]
        )
        assert mine.endswith(
            "Same on bob's screen: /verify bob match; different: /verify bob differ\n"
        )
        alice.send("/verify bob match")
        alice.out.wait_for("-- confirmed; waiting for bob to confirm on their side")
        bob.send("/verify alice match")
        bob_fp = identity.load(keys("bob"), PASSPHRASE).fingerprint
        alice_fp = identity.load(keys("alice"), PASSPHRASE).fingerprint
        alice.out.wait_for(
            f"-- the emoji matched: bob's key is now verified (fingerprint {bob_fp})"
        )
        bob.out.wait_for(
            f"-- the emoji matched: alice's key is now verified (fingerprint {alice_fp})"
        )
        alice.send("/whois bob")
        alice.out.wait_for(f"-- bob: key {bob_fp} (verified)")
        alice.send("/verify bob sideways")
        alice.out.wait_for("!! usage: /verify user [emoji|accept|match|differ|cancel]")
    finally:
        assert alice.finish() == 0
        assert bob.finish() == 0
    assert not any("*alice*" in line or "sas." in line for line in bob.out.lines)


def test_emoji_steps_render_with_the_words_that_answer_them() -> None:
    from securechat.client.events import EmojiVerification

    dev = "ABCDEFGHIJKLMNOP"
    asked = EmojiVerification("alice", dev, "requested", "alice (device X) wants\x1b[2J")
    assert render(asked) == (
        "!! alice (device X) wants\\x1b[2J: /verify alice accept to start, /verify alice cancel "
        "to refuse"
    )
    shown = EmojiVerification("bob", dev, "compare", "", "\U0001f436 Dog", "1234 5678 9012")
    assert render(shown) == (
        "!! compare with bob: \U0001f436 Dog\n    | (or the numbers 1234 5678 9012). Same on "
        "bob's screen: /verify bob match; different: /verify bob differ"
    )
    assert render(EmojiVerification("bob", dev, "verified", "matched")) == "-- matched"
    failed = EmojiVerification("bob", dev, "cancelled", "bob was NOT verified", mismatch=True)
    assert render(failed) == "!! bob was NOT verified"
