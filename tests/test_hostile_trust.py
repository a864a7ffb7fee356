"""A hostile server against what the client trusts: which key /verify and /trust mark, the trust
state shown on every DM, and the name the client is welcomed under.

The server here is the real one, running in the test, with its answers patched the way a
compromised server would change them; the client side is the terminal's own Controller, its
output captured line by line.
"""

from __future__ import annotations

import threading

import pytest

from securechat.client import Client
from securechat.client.chat_session import ChatSession
from securechat.client.events import DirectMessage, Joined
from securechat.errors import ConnectError
from securechat.identity import fingerprint
from securechat.terminal.controller import Controller
from securechat.terminal.notices import Notice, as_text
from securechat.trust import KeyState, safety_number

from .conftest import wait_for


class Terminal:
    """A Controller as the terminal drives it, its output kept."""

    def __init__(self, client: Client) -> None:
        self.lines: list[str] = []
        self._grew = threading.Condition()
        self.controller = Controller(ChatSession(client), self._output)

    def _output(self, notice: Notice) -> None:  # the UI thread, or the connection's for replies
        with self._grew:
            self.lines.append(as_text(notice))
            self._grew.notify_all()

    def run(self, line: str) -> list[str]:
        start = len(self.lines)
        self.controller.handle_line(line)
        return self.lines[start:]

    def lines_after(self, start: int, count: int, timeout: float = 10.0) -> list[str]:
        """The `count` lines output after the first `start` (waiting for late ones), and no more."""
        with self._grew:
            assert self._grew.wait_for(lambda: len(self.lines) >= start + count, timeout)
        return self.lines[start:]


def number_line(lines: list[str]) -> str:
    [line] = [x for x in lines if x.startswith("-- safety number with bob: ")]
    return line.split(": ", 1)[1]


# -- /verify and /trust ---------------------------------------------------------------------------


def test_a_key_swapped_between_verify_and_trust_is_not_the_key_trusted(
    connect, key_offers, make_identity
) -> None:
    alice, bob = connect("alice"), connect("bob")
    bob_key = bob.identity.verify_key_bytes
    terminal = Terminal(alice)
    shown = terminal.run("/verify bob")
    assert shown[0] == f"-- bob's key: {fingerprint(bob_key)} (new)"
    assert number_line(shown) == safety_number(
        "bob", bob_key, "alice", alice.identity.verify_key_bytes
    )

    # The server saw the /verify; it swaps in its own key before the /trust.
    key_offers.offer["bob"] = make_identity("mallory").verify_key_bytes
    assert terminal.run("/trust bob") == [f"-- bob's key {fingerprint(bob_key)} is now verified"]
    assert alice.known_keys.pinned("bob") == bob_key
    assert alice.known_keys.entry("bob").state is KeyState.VERIFIED
    # ...and nothing goes to its key.
    assert terminal.run("/msg bob hello")[0].startswith("!! WARNING: the key for bob has changed.")


def test_after_a_first_contact_swap_verify_shows_the_pinned_key_and_trust_will_not_mark_it(
    connect, key_offers, make_identity
) -> None:
    """The server hands out its key for bob at first contact, bob's real one at /verify (so a
    number over the offered key would match bob's aloud), and its own again at /trust."""
    alice, bob = connect("alice"), connect("bob")
    mallory_key = make_identity("mallory").verify_key_bytes
    bob_key, alice_key = bob.identity.verify_key_bytes, alice.identity.verify_key_bytes
    terminal = Terminal(alice)
    key_offers.offer["bob"] = mallory_key
    assert terminal.run("/whois bob") == [f"-- bob: key {fingerprint(mallory_key)} (new)"]

    del key_offers.offer["bob"]  # bob's real key, for /verify
    bobs_number = Terminal(bob).run("/verify alice")[1].split(": ", 1)[1]
    shown = terminal.run("/verify bob")
    mallory_number = safety_number("alice", alice_key, "bob", mallory_key)
    new, pinned = fingerprint(bob_key).split()[0], fingerprint(mallory_key).split()[0]
    assert shown == [
        "!! the server now offers bob a different key than the one you pinned",
        f"-- pinned key: {fingerprint(mallory_key)} (pinned); safety number: {mallory_number}",
        f"-- new key: {fingerprint(bob_key)}; safety number: {bobs_number}",
        "-- compare with bob outside this chat, and trust the key whose number matches:",
        f"--   /trust bob {new}   trusts the new key",
        f"--   /trust bob {pinned}   trusts the pinned key",
    ]
    assert mallory_number != bobs_number

    key_offers.offer["bob"] = mallory_key  # the server's key again, for /trust
    refused = terminal.run("/trust bob")
    assert refused[0] == (
        "!! the server now offers bob a different key than the pinned one; say which key's "
        f"safety number bob confirmed by naming it: the new key {new} or the pinned key {pinned}"
    )
    assert refused[1:] == [
        f"--   /trust bob {new}   trusts the new key",
        f"--   /trust bob {pinned}   trusts the pinned key",
    ]
    assert alice.known_keys.entry("bob").state is KeyState.PINNED  # mallory's, not verified

    # Naming the key whose number matched trusts exactly that key, whatever is offered now.
    assert terminal.run(f"/trust bob {new.upper()}") == [
        f"-- bob's key {fingerprint(bob_key)} is now verified"
    ]
    assert alice.known_keys.pinned("bob") == bob_key
    assert alice.known_keys.entry("bob").state is KeyState.VERIFIED


def test_trust_names_only_a_key_verify_showed(connect, key_offers, make_identity) -> None:
    alice, bob = connect("alice"), connect("bob")
    terminal = Terminal(alice)
    assert terminal.run("/trust bob") == [
        "!! no safety number for bob was shown yet: /verify bob shows it; compare it with bob, "
        "then /trust bob"
    ]
    terminal.run("/whois bob")
    mallory_key = make_identity("mallory").verify_key_bytes
    key_offers.offer["bob"] = mallory_key
    terminal.run("/verify bob")
    pinned = fingerprint(bob.identity.verify_key_bytes).split()[0]
    new = fingerprint(mallory_key).split()[0]
    wrong = "0000" if "0000" not in (pinned, new) else "1111"
    refused = terminal.run(f"/trust bob {wrong}")
    assert refused[0] == (
        f"!! '{wrong}' starts no key shown for bob; type the new key {new} or the pinned key "
        f"{pinned}"
    )
    assert alice.known_keys.pinned("bob") == bob.identity.verify_key_bytes
    assert alice.known_keys.entry("bob").state is KeyState.PINNED
    # The pinned key can still be confirmed by name while another one is offered.
    assert terminal.run(f"/trust bob {pinned}") == [
        f"-- bob's key {fingerprint(bob.identity.verify_key_bytes)} is now verified"
    ]


# -- trust state on screen ------------------------------------------------------------------------


def test_a_key_pinned_on_first_sight_is_announced_and_every_dm_shows_its_state(
    connect, make_identity
) -> None:
    """The server gave the name bob to mallory's key before alice ever saw bob: trust on first use
    cannot tell, so alice is told the key was pinned unverified, and every DM line says so."""
    alice = connect("alice")
    fake_bob = connect("bob", key_name="mallory")
    carol = connect("carol")
    wait_for(alice, lambda e: isinstance(e, Joined) and e.user == "carol")
    terminal = Terminal(alice)
    mallory_fp = make_identity("mallory").fingerprint

    def shown_dm(text: str) -> list[str]:
        start = len(terminal.lines)
        fake_bob.send_dm("alice", text).result(5)
        terminal.controller.on_event(wait_for(alice, lambda e: isinstance(e, DirectMessage)))
        return [line.split("] ", 1)[-1] for line in terminal.lines[start:]]

    assert shown_dm("it's bob") == [
        "*bob* [first seen] it's bob",
        f"-- bob's key {mallory_fp} was seen for the first time and pinned, not verified; "
        "compare safety numbers with them: /verify bob",
    ]
    assert shown_dm("bob again") == ["*bob* [pinned] bob again"]  # said once only
    terminal.run("/verify bob")
    terminal.run("/trust bob")
    assert shown_dm("verified now") == ["*bob* [verified] verified now"]

    # Outgoing DMs show the state of the key they were sealed to.
    def sent_dm(line: str, count: int) -> list[str]:
        start = len(terminal.lines)
        terminal.controller.handle_line(line)  # its line comes with the server's reply
        return [x.split("] ", 1)[-1] for x in terminal.lines_after(start, count)]

    carol_fp = carol.identity.fingerprint
    assert sent_dm("/msg carol hi carol", 2) == [
        "-> *carol* [first seen] hi carol",
        f"-- carol's key {carol_fp} was seen for the first time and pinned, not verified; "
        "compare safety numbers with them: /verify carol",
    ]
    assert sent_dm("/msg carol again", 1) == ["-> *carol* [pinned] again"]
    assert sent_dm("/msg bob to the verified key", 1) == ["-> *bob* [verified] to the verified key"]


# -- own name -------------------------------------------------------------------------------------


def test_a_welcome_under_another_name_is_refused(
    server, certs_dir, make_identity, monkeypatch
) -> None:
    # The server's welcome fields come after the name the session fills in, so this one wins.
    monkeypatch.setitem(server._context.welcome, "user", "bob")
    host, port = server.address
    with pytest.raises(ConnectError) as caught:
        Client.connect(host, port, make_identity("alice"), "alice", certs_dir / "ca.pem")
    assert str(caught.value) == (
        f"{host}:{port} welcomed us under another name ('bob') than the one we logged in with "
        "('alice'); disconnected. The server may be hostile"
    )


def test_a_server_that_does_not_speak_version_2_is_refused(
    server, certs_dir, make_identity, monkeypatch
) -> None:
    # An older server (or one pretending to be): no downgrade of DMs to a format we dropped.
    monkeypatch.setitem(server._context.welcome, "version", 1)
    host, port = server.address
    with pytest.raises(ConnectError) as caught:
        Client.connect(host, port, make_identity("alice"), "alice", certs_dir / "ca.pem")
    assert str(caught.value) == (
        f"{host}:{port} does not speak protocol version 2 (it said '1'); disconnected"
    )
