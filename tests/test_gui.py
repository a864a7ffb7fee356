"""The desktop client on a virtual display: a real server, the window driven through its own
methods (and xdotool for typing), a line-mode client on the other side, and a screenshot."""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from securechat import identity
from securechat.client import Client
from securechat.client.chat_session import ChatSession, Held
from securechat.client.events import Closed

from .cli_helpers import LineClient, ServerProcess, cli_env, run_client
from .conftest import PASSPHRASE, REPO, wait_for
from .screenshot import take
from .tools import needs, require

tk = pytest.importorskip("tkinter")

# How long to wait for anything: generous, so that a loaded machine only makes a test slower.
WAIT = 60.0


def _free_display() -> int:
    for number in range(90, 200):
        if (
            not Path(f"/tmp/.X11-unix/X{number}").exists()
            and not Path(f"/tmp/.X{number}-lock").exists()
        ):
            return number
    raise RuntimeError("no free X display number")


@pytest.fixture(scope="module")
def display() -> Iterator[str]:
    require("Xvfb")
    number = _free_display()
    proc = subprocess.Popen(
        ["Xvfb", f":{number}", "-screen", "0", "1280x800x24", "-nolisten", "tcp"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + WAIT
    while not Path(f"/tmp/.X11-unix/X{number}").exists():
        if time.monotonic() > deadline:
            proc.kill()
            pytest.skip(f"Xvfb could not start a display :{number}")
        try:
            proc.wait(timeout=0.05)  # returns only if Xvfb gave up
        except subprocess.TimeoutExpired:
            continue
        pytest.skip(f"Xvfb could not start a display :{number} (exit {proc.returncode})")
    old = os.environ.get("DISPLAY")
    os.environ["DISPLAY"] = f":{number}"
    try:
        yield f":{number}"
    finally:
        if old is None:
            os.environ.pop("DISPLAY", None)
        else:
            os.environ["DISPLAY"] = old
        proc.terminate()
        proc.wait(10)


@pytest.fixture(autouse=True)
def collect_tk_on_the_main_thread() -> Iterator[None]:
    """Tk objects must die on the thread that made them: a Tk interpreter freed by a garbage
    collection that happens to run on a server thread aborts the process. Collect here."""
    yield
    gc.collect()


class Gui:
    """One chat window on the test's thread, pumped until what we wait for has happened."""

    def __init__(self, session: ChatSession, where: str = "test") -> None:
        from securechat.gui.bridge import Bridge
        from securechat.gui.window import ChatWindow

        self.root = tk.Tk()
        self.bridge = Bridge(self.root)
        self.window = ChatWindow(self.root, self.bridge, session, where)
        self.model = self.window.model
        # A new window is ready to type into: its keys will go to the input box.
        assert self.root.focus_lastfor() is self.window.input

    def pump(self, until: Callable[[], object], timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while not until():
            assert time.monotonic() < deadline, "the window never got there"
            self.root.tk.dooneevent(0)  # waits for the next Tk event (the bridge polls often)

    def focus_input(self) -> None:
        """Give the input box the keyboard focus, and wait until it really has it: a key event
        goes to whichever widget has the focus, not necessarily the one it was generated on."""
        self.window.input.focus_force()
        self.pump(lambda: self.root.focus_get() is self.window.input)

    def type_enter(self, text: str) -> None:
        """Type `text` into the input box and press Enter, with the focus where a user's is."""
        self.focus_input()
        self.window.input.insert("end", text)
        self.window.input.event_generate("<Return>")
        assert self.window.input.get("1.0", "end-1c") == "", "Enter did not send"

    def lines(self, name: str) -> list[str]:
        conv = self.model.conversations.get(name)
        return [line.text for line in conv.lines] if conv else []

    def shows(self, name: str, text: str) -> Callable[[], bool]:
        return lambda: any(text in line for line in self.lines(name))

    def view(self) -> str:
        return self.window.view.get("1.0", "end")


@pytest.fixture
def gui_for(display, server, certs_dir, make_identity) -> Iterator[Callable[[str], Gui]]:
    made: list[Gui] = []

    def make(user: str) -> Gui:
        host, port = server.address
        client = Client.connect(host, port, make_identity(user), user, certs_dir / "ca.pem")
        gui = Gui(ChatSession(client), f"{host}:{port}")
        made.append(gui)
        gui.pump(lambda: gui.model.conversations["#lobby"].members)
        return gui

    yield make
    for gui in made:
        if not gui.window._closing:
            gui.window.close()


def key_file(tmp_path: Path, name: str) -> Path:
    return tmp_path / "cli-keys" / f"{name}.key"


@needs("xwd")  # the screenshot
def test_chat_in_lobby_and_a_dm_with_a_terminal_user(
    gui_for, server, certs_dir, tmp_path, display
) -> None:
    port, ca = server.address[1], certs_dir / "ca.pem"
    bob = LineClient(key_file(tmp_path, "bob"), port, ca, user="bob")
    try:
        chat_with_bob(gui_for, bob, tmp_path, display)
    finally:
        bob.kill()  # already finished, unless the test failed


def chat_with_bob(gui_for, bob: LineClient, tmp_path: Path, display: str) -> None:
    bob.out.wait_for("-- bob joined #lobby", WAIT)
    gui = gui_for("alice")
    gui.pump(lambda: "bob" in gui.model.conversations["#lobby"].members)
    assert list(gui.window.members.get(0, "end")) == ["alice", "bob"]

    # Room: the window sends, the terminal user answers, a mention is highlighted.
    gui.type_enter("hello from the window")
    bob.out.wait_for("<alice> hello from the window", WAIT)
    bob.send("alice: welcome to the lobby")
    gui.pump(gui.shows("#lobby", "welcome to the lobby"))
    [line] = [x for x in gui.model.conversations["#lobby"].lines if "welcome" in x.text]
    assert (line.sender, line.mention) == ("bob", True)
    gui.pump(lambda: "<bob> alice: welcome to the lobby" in gui.view())
    assert gui.window.view.tag_ranges("mention")

    # Shift+Enter adds a line; Enter sends both lines as one message.
    gui.focus_input()
    gui.window.input.insert("1.0", "first line")
    gui.window.input.event_generate("<Shift-Return>")
    gui.window.input.insert("end", "second line")
    assert gui.window.input.get("1.0", "end-1c") == "first line\nsecond line"
    gui.type_enter("")
    bob.out.wait_for("<alice> first line\\nsecond line", WAIT)

    # DM: sealed to bob, answered by bob, unread until opened, with bob's key state shown.
    gui.window.submit("/msg bob the plan is on")
    bob.out.wait_for("*alice* [first seen] the plan is on", WAIT)
    gui.pump(gui.shows("@bob", "the plan is on"))
    bob.send("/msg alice understood")
    gui.pump(gui.shows("@bob", "understood"))
    assert "@bob (1)" in gui.window.sidebar.get(0, "end")
    gui.window.select("@bob")
    assert "@bob" in gui.window.sidebar.get(0, "end")  # read now
    gui.pump(lambda: gui.window.banner_text.cget("text").endswith(": pinned (not verified)"))
    assert "*bob* understood" in gui.view()  # drawn as a DM, never as a room line
    assert str(gui.window.input.cget("state")) == "normal"

    # Verify: the number matches the one bob's terminal shows; marking it verified shows it.
    bob.send("/verify alice")
    number_line = bob.out.wait_for("-- safety number with alice: ", WAIT)
    bob_number = number_line.split(": ", 1)[1].strip()
    gui.window.open_verify()
    gui.pump(lambda: gui.window.verify_dialog is not None)
    assert gui.window.verify_dialog.number == bob_number
    gui.window.verify_dialog.confirm()
    gui.pump(lambda: gui.window.banner_text.cget("text").endswith(": verified"))
    assert "@bob \u2713" in gui.window.sidebar.get(0, "end")

    # The banner's button shows its whole label, beside the key's fingerprint.
    gui.root.update_idletasks()
    button = gui.window.verify_button
    assert button.winfo_width() >= button.winfo_reqwidth()

    # A screenshot of the DM with its verified key, for a person to look at too.
    gui.root.update()
    shot = take(display)
    shot.save_png(tmp_path / "gui.png")
    assert shot.colours() > 20, "the screenshot is blank"

    # Slash commands work as in the terminal; /join opens and selects the room.
    gui.window.submit("/join #dev")
    gui.pump(lambda: gui.model.current == "#dev")
    gui.pump(lambda: list(gui.window.members.get(0, "end")) == ["alice [verified]"])

    gui.window.close()
    bob.out.wait_for("-- alice left #lobby", WAIT)
    assert bob.finish(WAIT) == 0


def test_a_changed_key_is_shown_and_blocks_sending(display, certs_dir, tmp_path, make_identity):
    ca = certs_dir / "ca.pem"
    alice_key = make_identity("alice")
    honest = ServerProcess("--certs", str(certs_dir), "--data", str(tmp_path / "h"), cwd=tmp_path)
    try:
        host, port = honest.address
        assert run_client(key_file(tmp_path, "bob"), port, ca, "", user="bob").returncode == 0
        with Client.connect(host, port, alice_key, "alice", ca) as alice:
            alice.check_key("bob")  # pinned
    finally:
        honest.stop()
    hostile = ServerProcess("--certs", str(certs_dir), "--data", str(tmp_path / "x"), cwd=tmp_path)
    try:
        host, port = hostile.address
        fake = LineClient(key_file(tmp_path, "not-bob"), port, ca, user="bob")
        fake.out.wait_for("-- bob joined #lobby", WAIT)
        gui = Gui(ChatSession(Client.connect(host, port, alice_key, "alice", ca)))
        gui.window.submit("/query bob")
        gui.pump(lambda: gui.model.conversations["@bob"].blocked)
        banner = gui.window.banner_text.cget("text")
        assert banner.startswith("WARNING: the key for bob has changed.")
        for name in ("bob", "not-bob"):  # both fingerprints: the pinned one and the offered one
            ident = identity.load(key_file(tmp_path, name), PASSPHRASE)
            assert ident.fingerprint in banner
        assert "Nothing will be sent to bob" in banner
        assert str(gui.window.input.cget("state")) == "disabled"
        assert "@bob (!)" in gui.window.sidebar.get(0, "end")
        gui.window.send_dm("bob", "are you really bob?")
        gui.pump(gui.shows("@bob", "not sent: WARNING: the key for bob has changed."))
        gui.window.submit("/join #after")  # the window still works
        gui.pump(lambda: gui.model.current == "#after")
        gui.window.close()
        fake.send("/quit")
        assert fake.finish(WAIT) == 0
        assert "are you really bob" not in fake.out.text
    finally:
        hostile.stop()


def test_the_connect_dialog_says_what_went_wrong(
    display, server, certs_dir, other_certs_dir, tmp_path, make_identity
):
    from securechat.gui.app import ConnectDialog, GuiOptions
    from securechat.gui.bridge import Bridge

    host, port = server.address
    Client.connect(host, port, make_identity("taken"), "taken", certs_dir / "ca.pem").close()
    key = tmp_path / "dialog" / "carol.key"
    identity.create(key, b"right passphrase", user="carol")  # the GUI wants full KDF limits
    root = tk.Tk()
    opts = GuiOptions(key, None, host, port, certs_dir / "ca.pem")
    dialog = ConnectDialog(root, Bridge(root), opts)
    gui = Gui.__new__(Gui)
    gui.root = root
    assert dialog.fields["user"].get() == "carol"  # remembered in the key file
    assert dialog.fields["passphrase"].cget("show") == "\u2022"  # masked

    def attempt(**fields: str) -> None:
        for name, value in fields.items():
            dialog.fields[name].delete(0, "end")
            dialog.fields[name].insert(0, value)
        dialog.connect()
        gui.pump(
            lambda: dialog.window is not None or dialog.error.cget("text") != "connecting\u2026"
        )

    attempt(passphrase="wrong")
    assert dialog.error.cget("text") == f"wrong passphrase for identity key {key}"
    attempt(passphrase="right passphrase", ca=str(other_certs_dir / "ca.pem"))
    assert "failed certificate verification" in dialog.error.cget("text")
    attempt(ca=str(certs_dir / "ca.pem"), user="taken")
    assert dialog.error.cget("text") == (
        f'{host}:{port} refused the login: the name "taken" belongs to another identity key'
    )
    attempt(port="1")
    assert dialog.error.cget("text").startswith(f"cannot connect to {host}:1: ")
    attempt(port=str(port), user="carol")
    assert dialog.window is not None
    assert root.title() == f"securechat: carol @ {host}:{port}"
    dialog.window.close()


def find_window(display: str, title: str) -> str:
    """The id of the top-level window whose title starts with `title`, waiting for it.

    Only the screen's top-level windows are searched: a deeper search reads the properties of
    every window, and one that a client destroys meanwhile makes xdotool fail (BadWindow). That
    can still happen to a top-level window, so a failed search is tried again until the deadline.
    """
    xenv = {**os.environ, "DISPLAY": display}
    deadline = time.monotonic() + WAIT
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            found = subprocess.run(
                ["xdotool", "search", "--sync", "--maxdepth", "1", "--name", f"^{title}"],
                env=xenv, capture_output=True, text=True, timeout=remaining,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            break
        if found.returncode == 0 and found.stdout.split():
            return found.stdout.split()[0]
    raise AssertionError(f"no window titled {title!r} on {display}")


@needs("xdotool")
def test_securechat_gui_from_the_command_line(display, certs_dir, tmp_path) -> None:
    srv = ServerProcess("--certs", str(certs_dir), "--data", str(tmp_path / "d"), cwd=tmp_path)
    proc = None
    try:
        port = srv.address[1]
        key = key_file(tmp_path, "dora")
        proc = subprocess.Popen(
            [sys.executable, "-m", "securechat", "gui", "--key", str(key), "--user", "dora",
             "--port", str(port), "--ca", str(certs_dir / "ca.pem")],
            cwd=REPO, env=cli_env(DISPLAY=display), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        srv.wait_log("dora logged in", WAIT)
        # The chat window takes its title once its input box has the focus within it. Give the
        # window the keyboard focus, then type /quit and Enter as a user would (XTEST keys go
        # to the focused window).
        window = find_window(display, "securechat: dora @ ")
        xenv = {**os.environ, "DISPLAY": display}
        for command in (
            ["windowfocus", "--sync", window],
            ["type", "--delay", "20", "/quit"],
            ["key", "Return"],
        ):
            subprocess.run(["xdotool", *command], env=xenv, check=True, timeout=WAIT)
        _out, err = proc.communicate(timeout=WAIT)
        assert proc.returncode == 0, err
        assert "Traceback" not in err
        srv.wait_log("dora left", WAIT)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.communicate()
        srv.stop()


def test_the_window_reconnects_and_sends_what_was_typed(
    display, certs_dir, tmp_path, make_identity
):
    from securechat.client.events import Message

    from .conftest import plain_room_kept, start_server, wait_for

    data = tmp_path / "data"
    srv = start_server(certs_dir, data)
    port = srv.address[1]
    # Plain, and kept so by its history across the restart: the held line goes out as say.
    kept = plain_room_kept(srv.address, certs_dir, make_identity("keeper"), "#ops")

    def dial(user: str = "alice") -> Client:
        return Client.connect("127.0.0.1", port, make_identity(user), user, certs_dir / "ca.pem")

    gui = Gui(ChatSession(dial(), dial))
    gui.window.submit("/join #ops")
    gui.pump(lambda: gui.model.current == "#ops")
    srv.stop()
    gui.pump(lambda: not gui.model.connected)
    gui.window.submit("typed while the server was down")
    gui.window.select("#lobby")  # held lines go where they were typed, not where we are now
    assert gui.window.session.held == [Held("typed while the server was down", "#ops")]
    srv = start_server(certs_dir, data, port=port)
    try:
        gui.pump(lambda: gui.model.connected)
        assert "reconnected" in gui.lines("#lobby")  # said where the user is looking
        with dial("bob") as bob:
            bob.join("#ops").result(WAIT)
            gui.pump(lambda: "bob" in gui.model.conversations["#ops"].members)
            gui.window.submit("and after", "#ops")
            got = wait_for(bob, lambda e: isinstance(e, Message) and e.text == "and after", WAIT)
            assert got.room == "#ops"
            history = bob.room_history("#ops").result(WAIT)["messages"]
            assert [m["text"] for m in history] == [
                kept,
                "typed while the server was down",
                "and after",
            ]
        gui.window.close()
    finally:
        srv.stop()


def test_the_verify_dialog_marks_only_a_key_it_showed(
    gui_for, connect, key_offers, make_identity
) -> None:
    """As /trust: a key swapped after the dialog opened is not the key marked, and a changed key
    offered after a first-contact swap must be named before it is trusted."""
    from securechat.identity import fingerprint
    from securechat.trust import KeyState, safety_number

    bob, carol = connect("bob"), connect("carol")
    mallory_key = make_identity("mallory").verify_key_bytes
    gui = gui_for("alice")
    alice = gui.window.client

    # The server swaps bob's key between the dialog's look-up and the click.
    gui.window.submit("/verify bob")
    gui.pump(lambda: gui.window.verify_dialog is not None)
    key_offers.offer["bob"] = mallory_key
    gui.window.verify_dialog.confirm()
    gui.pump(lambda: gui.window.banner_text.cget("text").endswith(": verified"))
    assert fingerprint(bob.identity.verify_key_bytes) in gui.window.banner_text.cget("text")
    assert alice.known_keys.pinned("bob") == bob.identity.verify_key_bytes

    # carol's key was swapped at first contact; at Verify the server offers her real one.
    key_offers.offer["carol"] = mallory_key
    gui.window.submit("/query carol")
    gui.pump(lambda: (t := gui.model.conversations["@carol"].trust) and t.fingerprint)
    del key_offers.offer["carol"]
    gui.window.verify_dialog = None
    gui.window.open_verify()
    gui.pump(lambda: gui.window.verify_dialog is not None)
    dialog = gui.window.verify_dialog
    carol_key = carol.identity.verify_key_bytes
    alice_key = alice.identity.verify_key_bytes
    assert dialog.number == safety_number("alice", alice_key, "carol", mallory_key)
    assert dialog.shown.offered_number == safety_number("alice", alice_key, "carol", carol_key)
    assert dialog.name_entry is not None

    key_offers.offer["carol"] = mallory_key  # the server's key again, at the click
    dialog.confirm()  # no key named
    gui.pump(lambda: dialog.error.cget("text"))
    new = fingerprint(carol_key).split()[0]
    assert dialog.error.cget("text").startswith(
        "the server now offers carol a different key than the pinned one; say which key's"
    )
    assert f"type {new} for the new key" in dialog.error.cget("text")
    assert alice.known_keys.entry("carol").state is KeyState.PINNED

    dialog.name_entry.insert(0, new)
    dialog.confirm()
    gui.pump(lambda: gui.window.banner_text.cget("text").endswith(": verified"))
    assert alice.known_keys.pinned("carol") == carol_key
    assert alice.known_keys.entry("carol").state is KeyState.VERIFIED
    assert "@carol \u2713" in gui.window.sidebar.get(0, "end")


def test_devices_are_listed_and_revoked_from_the_window(
    gui_for, server, certs_dir, make_identity, tmp_path
) -> None:
    """/devices and /revoke are the terminal's commands, and the window runs them too."""
    gui = gui_for("alice")
    original = make_identity("alice").path
    phone_key = tmp_path / "phone" / original.name  # the same key file on a second machine
    phone_key.parent.mkdir()
    shutil.copy2(original, phone_key)
    phone = Client.connect(
        *server.address,
        identity.load(phone_key, PASSPHRASE, min_kdf=identity.KDF_FAST_FOR_TESTS),
        "alice",
        certs_dir / "ca.pem",
    )
    try:
        laptop = gui.window.client.device_id
        gui.window.submit("/devices")
        gui.pump(gui.shows("#lobby", f"alice device {laptop} (this device): key "))
        gui.pump(gui.shows("#lobby", f"alice device {phone.device_id}: key "))
        gui.window.submit(f"/revoke {phone.device_id}")
        gui.pump(gui.shows("#lobby", f"device {phone.device_id} revoked"))
        closed = wait_for(phone, lambda e: isinstance(e, Closed), timeout=WAIT)
        assert closed == Closed("this device was revoked")
    finally:
        phone.close()


def test_compare_emoji_from_the_verify_dialog_marks_both_keys_verified(gui_for, connect) -> None:
    from securechat.client.events import EmojiVerification
    from securechat.identity import fingerprint
    from securechat.trust import KeyState

    bob = connect("bob")
    gui = gui_for("alice")
    alice = gui.window.client
    gui.window.submit("/verify bob")
    gui.pump(lambda: gui.window.verify_dialog is not None)
    gui.window.compare_emoji(gui.window.verify_dialog)

    def step(name: str) -> Callable[[object], bool]:
        return lambda e: isinstance(e, EmojiVerification) and e.stage == name

    wait_for(bob, step("requested"), WAIT)
    bob.accept_emoji("alice")
    theirs = wait_for(bob, step("compare"), WAIT)
    gui.pump(
        lambda: (
            "bob" in gui.window.emoji_dialogs and gui.window.emoji_dialogs["bob"].stage == "compare"
        )
    )
    dialog = gui.window.emoji_dialogs["bob"]
    assert dialog.emoji.cget("text") == "\n".join(theirs.emoji.split("  "))
    assert dialog.decimals.cget("text") == theirs.decimals
    assert dialog.button_labels() == ["They differ", "They match"]
    dialog.click("They match")
    bob.confirm_emoji("alice")
    wait_for(bob, step("verified"), WAIT)
    gui.pump(lambda: dialog.stage == "verified")
    assert dialog.button_labels() == ["Close"]
    assert alice.known_keys.state("bob") is KeyState.VERIFIED
    assert bob.known_keys.state("alice") is KeyState.VERIFIED
    gui.window.select("@bob")
    gui.pump(lambda: gui.window.banner_text.cget("text").endswith(": verified"))
    assert fingerprint(bob.identity.verify_key_bytes) in gui.window.banner_text.cget("text")
    kinds = {line.kind for line in gui.model.conversations["@bob"].lines}
    assert not kinds & {"dm", "own_dm"}  # no step of it is shown as a message


def test_verify_with_a_step_typed_in_the_window_runs_the_emoji_comparison(gui_for, connect) -> None:
    from securechat.client.events import EmojiVerification

    bob = connect("bob")
    gui = gui_for("alice")
    gui.window.submit("/verify bob emoji")
    asked = wait_for(
        bob, lambda e: isinstance(e, EmojiVerification) and e.stage == "requested", WAIT
    )
    assert asked.user == "alice"
    gui.pump(lambda: "bob" in gui.window.emoji_dialogs)
    assert gui.window.emoji_dialogs["bob"].button_labels() == ["Cancel"]
    assert gui.window.verify_dialog is None  # no safety-number dialog for a step


LOCK = "\N{LOCK}"


def test_rooms_show_their_mode_trust_marks_strictness_and_markers(
    gui_for, connect, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Encrypted rooms in the window: the New room dialog creates a plain room and an encrypted
    one, each shown with its mode; members carry trust marks; the strict switch runs /room
    strict; a newcomer's marker and a ghost's warning are system lines in their room."""
    from securechat.client.events import Message, RoomState
    from securechat.gui.window import COLOURS

    from .conftest import rewrite_sent_frames

    gui = gui_for("alice")
    window = gui.window
    assert "#lobby (not end-to-end encrypted)" in window.sidebar.get(0, "end")
    assert window.banner_text.cget("text") == (
        "#lobby: not end-to-end encrypted: the server can read it"
    )
    assert "#lobby (not end-to-end encrypted)" in window.status.cget("text")

    # A name that is no room's is refused in the dialog itself.
    window.open_new_room()
    dialog = window.new_room_dialog
    dialog.name.delete(0, "end")
    dialog.name.insert(0, "#my team")
    dialog.confirm()
    assert dialog.error.cget("text") == "a room name is one word, like #team"
    assert dialog.top.winfo_exists()

    # Ticked "plain": what /create #open --plain sends.
    dialog.name.delete(0, "end")
    dialog.name.insert(0, "#open")
    dialog.plain_box.invoke()
    dialog.confirm()
    gui.pump(lambda: gui.model.current == "#open" and gui.model.conversations["#open"].mode)
    assert gui.model.conversations["#open"].mode == "plain"
    bob = connect("bob")
    listed = {r["name"]: r["mode"] for r in bob.list_rooms().result(WAIT)["rooms"]}
    assert listed["#open"] == "plain"
    gui.pump(lambda: "#open (not end-to-end encrypted)" in window.sidebar.get(0, "end"))
    assert not window.strict_button.winfo_ismapped()

    # Unticked: end-to-end encrypted, with a lock in the list, the banner and the status line.
    window.open_new_room()
    window.new_room_dialog.name.insert("end", "team")
    window.new_room_dialog.confirm()
    gui.pump(lambda: gui.model.current == "#team" and gui.model.conversations["#team"].mode)
    assert bob.list_rooms().result(WAIT)["rooms"][-1] == {
        "name": "#team",
        "members": 1,
        "mode": "encrypted",
    }
    gui.pump(lambda: f"#team {LOCK}" in window.sidebar.get(0, "end"))
    assert window.banner_text.cget("text") == (
        f"#team: {LOCK} end-to-end encrypted; keys go to pinned members"
    )
    assert f"#team ({LOCK} end-to-end encrypted)" in window.status.cget("text")
    gui.root.update_idletasks()
    assert window.strict_button.winfo_ismapped()

    # Members with trust marks: bob is new to alice, alice verified to herself.
    bob.join("#team").result(WAIT)
    gui.pump(lambda: list(window.members.get(0, "end")) == ["alice [verified]", "bob [new]"])
    assert window.members.itemcget(1, "foreground") == COLOURS["new"]

    # The strict switch runs /room strict, and back.
    window.strict_button.invoke()
    gui.pump(gui.shows("#team", "#team is strict: its keys go only to members you verified"))
    gui.pump(lambda: gui.model.conversations["#team"].strict)
    assert window.client.room_state("#team").strict
    assert window.strict.get()
    assert window.banner_text.cget("text").endswith("keys go to verified members only (strict)")
    window.strict_button.invoke()
    gui.pump(lambda: not gui.model.conversations["#team"].strict)
    assert not window.client.room_state("#team").strict
    assert "#team is normal: its keys go to every member whose key is pinned" in gui.lines("#team")

    # A ghost: the server slips mallory in without a `joined` event; /who shows her, warned.
    rewrite_sent_frames(
        monkeypatch,
        "joined",
        lambda f: [] if (f["user"], f["room"]) == ("mallory", "#team") else [f],
    )
    mallory = connect("mallory")
    mallory.join("#team").result(WAIT)
    window.submit("/who")
    ghost = "mallory [ghost: never seen joining, gets no keys]"
    gui.pump(lambda: ghost in window.members.get(0, "end"))
    assert window.members.itemcget(2, "foreground") == COLOURS["ghost"]
    warning = (
        "the server lists mallory in #team, but you never saw mallory join; mallory gets no keys "
        "and cannot read what you send there"
    )
    gui.pump(gui.shows("#team", warning))
    assert window.banner_text.cget("text").endswith("never seen joining, given no keys: mallory")

    # A downgrade: the server passes bob's message on in clear. Refused, in the room, and the
    # room keeps its lock.
    rewrite_sent_frames(
        monkeypatch,
        "message_encrypted",
        lambda f: [{"type": "message", "room": f["room"], "from": f["from"], "ts": f["ts"],
                    "text": "said in plaintext"}],
    )  # fmt: skip
    bob.send("#team", "a secret").result(WAIT)
    refusal = "a message from bob arriving in clear was refused: #team is end-to-end encrypted"
    gui.pump(gui.shows("#team", refusal))
    [line] = [x for x in gui.model.conversations["#team"].lines if refusal in x.text]
    assert (line.kind, line.sender) == ("warning", "")
    assert "said in plaintext" not in gui.view() and "<bob>" not in gui.view()
    assert f"#team {LOCK}" in window.sidebar.get(0, "end")
    monkeypatch.undo()

    # A newcomer: what carol said before alice joined is a marker, never carol's chat text.
    carol = connect("carol")
    carol.join("#secret").result(WAIT)
    wait_for(carol, lambda e: isinstance(e, RoomState) and e.room == "#secret", WAIT)
    for n in range(2):
        carol.send("#secret", f"before alice {n}").result(WAIT)
        wait_for(carol, lambda e, n=n: isinstance(e, Message) and e.text == f"before alice {n}")
    window.submit("/join #secret")
    marker = "[history] 2 earlier messages were sent before you joined"
    gui.pump(gui.shows("#secret", marker))
    [line] = [x for x in gui.model.conversations["#secret"].lines if x.text == marker]
    assert (line.kind, line.sender) == ("system", "")
    gui.pump(lambda: gui.model.current == "#secret")
    assert "now talking in #secret (2 here)" in gui.lines("#secret")  # said where it happened
    gui.pump(lambda: f"-- {marker}" in gui.view())
    assert "before alice" not in gui.view()
    assert "<carol>" not in gui.view()
