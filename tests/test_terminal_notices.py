"""The controller's output is typed notices (a kind and a text): the terminal prefixes the kind,
the GUI styles by it, and neither parses prefixes back out of text."""

from __future__ import annotations

from pathlib import Path

import nacl.signing

from securechat.client.chat_session import ChatSession
from securechat.client.events import DMRejected, Joined, Message
from securechat.identity import fingerprint
from securechat.terminal.controller import Controller
from securechat.terminal.notices import Notice, NoticeKind, as_text, info, line, warning
from securechat.terminal.render import notice_of, render
from securechat.trust import KnownKeys


def test_the_terminal_shows_each_kind_as_its_prefix() -> None:
    assert as_text(info("reconnected")) == "-- reconnected"
    assert as_text(warning("message not delivered: gone")) == "!! message not delivered: gone"
    assert as_text(line("[12:00] <bob> hi")) == "[12:00] <bob> hi"
    assert info("x") == Notice(NoticeKind.INFO, "x")


def test_events_become_notices_of_their_kind() -> None:
    assert notice_of(Joined("#dev", "bob", 1)) == info("bob joined #dev")
    said = notice_of(Message("#dev", "bob", "hi", 1_700_000_000_000), "#dev")
    assert said.kind is NoticeKind.LINE and said.text.endswith("] <bob> hi")
    refused = notice_of(DMRejected("bob", "replayed", "seen before"))
    assert refused == warning("a direct message from bob was refused (replayed): seen before")


def test_a_dm_refused_for_a_changed_key_says_which_commands_check_it(tmp_path: Path) -> None:
    old, new = (bytes(nacl.signing.SigningKey.generate().verify_key) for _ in range(2))
    known = KnownKeys(tmp_path / "known.json")
    known.check("bob", old)
    check = known.check("bob", new)
    shown = render(DMRejected("bob", "key_changed", check.warning(), check))
    assert shown.startswith("!! a direct message from bob was refused (key_changed): WARNING: ")
    assert f"offered now: {fingerprint(new)}" in shown
    assert (
        f"(/verify bob) and accept the new key by naming it (/trust bob {check.new_key_start})"
        in shown
    )
    assert "/verify" not in check.warning()


def test_the_controller_emits_typed_notices(connect) -> None:
    got: list[Notice] = []
    controller = Controller(ChatSession(connect("alice")), got.append)
    controller.handle_line("/frob")
    controller.handle_line("/query bob")
    controller.handle_line("/help")
    controller.handle_line("caf\udce9")  # an undecodable byte, as the terminal hands it over
    assert got[0] == warning("unknown command /frob; /help lists the commands")
    assert got[1] == info("plain lines now go to bob as direct messages; /query to stop")
    assert got[2] == line("commands:")
    assert {n.kind for n in got[3:-1]} == {NoticeKind.LINE}
    assert got[-1] == warning(
        "that line is not valid UTF-8 (check your terminal's or file's encoding); it was not sent"
    )
    # Nothing a notice says carries a prefix of its own: the front end adds it from the kind.
    assert not any(n.text.startswith(("-- ", "!! ")) for n in got)
