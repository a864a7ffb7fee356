"""The interactive terminal client, on prompt_toolkit.

The input line stays at the bottom: incoming events print above it (patch_stdout) and never
clobber what you are typing. Up-arrow recalls earlier lines, Tab completes commands, rooms and
names, a status bar shows who and where you are, and a multi-line paste (bracketed paste) is
sent as one message because Enter submits the whole buffer. Ctrl-D, Ctrl-C or /quit leave.
When the connection drops it reconnects by itself with backoff and jitter (the status bar says
so); lines typed meanwhile are sent after the reconnect, or you are told they were not.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from functools import partial

from prompt_toolkit import PromptSession
from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document
from prompt_toolkit.history import InMemoryHistory
from prompt_toolkit.input import Input
from prompt_toolkit.output import Output
from prompt_toolkit.patch_stdout import patch_stdout

from securechat.client.chat_session import (
    ChatSession,
    ConnectionLost,
    GaveUp,
    Reconnected,
    Retrying,
    SessionEvent,
)
from securechat.client.events import Closed, Event
from securechat.terminal import commands, notices
from securechat.terminal.controller import Controller, OwnerThread
from securechat.terminal.notices import Notice, as_text
from securechat.terminal.render import mode_label


class ChatCompleter(Completer):
    """Commands after a leading slash; rooms and names elsewhere."""

    def __init__(self, controller: Controller) -> None:
        self.controller = controller

    def get_completions(
        self, document: Document, complete_event: CompleteEvent
    ) -> Iterable[Completion]:
        text = document.text_before_cursor
        word = document.get_word_before_cursor(WORD=True)
        if text.startswith("/") and " " not in text:
            for name in commands.COMMANDS:
                if name.startswith(text[1:].lower()):
                    yield Completion(f"/{name}", start_position=-len(text))
            return
        if word.startswith("#"):
            candidates = sorted(self.controller.client.rooms)
        else:
            candidates = sorted(self.controller.names)
        for candidate in candidates:
            if candidate.startswith(word.lower()) and candidate != word:
                yield Completion(candidate, start_position=-len(word))


class Console:
    """One interactive chat: the prompt on the caller's thread, the session's events on an
    "events" thread, and the controller on its own owner thread, which both hand work to."""

    def __init__(
        self,
        session: ChatSession,
        where: str,
        pt_input: Input | None = None,
        pt_output: Output | None = None,
        on_output: Callable[[str], None] | None = None,
    ) -> None:
        self.session, self.where, self.on_output = session, where, on_output
        self.prompt: PromptSession[str] = PromptSession(
            history=InMemoryHistory(), input=pt_input, output=pt_output
        )
        self.owner = OwnerThread()
        self.controller = Controller(session, self.show)
        self.prompt.completer = ChatCompleter(self.controller)
        self.prompt.bottom_toolbar = self.toolbar
        self.status = "connected (TLS 1.3)"
        self.gone: str | None = None  # why we stop for good, when the connection decides it

    def show(self, notice: Notice) -> None:
        text = as_text(notice)
        print(text, flush=True)
        if self.on_output:
            self.on_output(text)

    def toolbar(self) -> str:
        controller = self.controller
        target = (
            f"DM {controller.query}" if controller.query else (controller.current_room or "no room")
        )
        mode = ""
        if not controller.query and controller.current_room:
            mode = f" ({mode_label(controller.client.room_mode(controller.current_room))})"
        return f" {controller.client.user}@{self.where}  {target}{mode}  {self.status}  /help"

    def prompt_text(self) -> str:
        return f"[{self.controller.query or self.controller.current_room or '-'}] "

    def poke_prompt(self, closing: bool = False) -> None:
        # The prompt's event loop may be between two prompts or already closed; both are fine:
        # the next prompt redraws, and the main loop sees `gone`.
        app = self.prompt.app
        try:
            if closing and app.is_running and app.loop is not None:
                app.loop.call_soon_threadsafe(lambda: app.exit(exception=EOFError()))
            elif app.is_running:
                app.invalidate()
        except RuntimeError:
            pass

    def exit_if_gone(self) -> None:
        # Closes the gap between `while self.gone is None` and the prompt starting to run.
        if self.gone is not None:
            self.prompt.app.exit(exception=EOFError())

    # -- the events thread ----------------------------------------------------------------------

    def pump_events(self) -> None:
        for event in self.session.events():
            self.on_event(event)
            self.poke_prompt()
        self.status = "disconnected"
        self.poke_prompt(closing=self.gone is not None)

    def on_event(self, event: Event | SessionEvent) -> None:
        controller, call = self.controller, self.owner.call
        if isinstance(event, ConnectionLost):
            self.show(notices.info(f"connection lost ({event.reason}); reconnecting"))
        elif isinstance(event, Retrying):
            self.status = (
                f"reconnecting: attempt {event.attempt} in {event.delay:.1f}s ({event.reason})"
            )
        elif isinstance(event, Reconnected):
            self.status = "connected (TLS 1.3)"
            self.show(notices.info("reconnected"))
            for room, why in event.rejoin_failures:
                self.show(notices.warning(f"could not rejoin {room}: {why}"))
            call(lambda: controller.reattached(self.session.resume()))
        elif isinstance(event, GaveUp):
            if event.login_refused:
                self.show(notices.warning(f"cannot log in again: {event.reason}"))
            self.gone = "gave up reconnecting"
        elif isinstance(event, Closed):
            if not controller.quit_requested:
                call(lambda: controller.on_event(event))
                self.gone = event.reason
        else:
            call(lambda: controller.on_event(event))

    # -- the prompt (the caller's thread) --------------------------------------------------------

    def run(self) -> int:
        """Chat until /quit, Ctrl-D/Ctrl-C, or a connection loss we cannot recover from."""
        controller = self.controller
        printer = threading.Thread(target=self.pump_events, name="events", daemon=True)
        with patch_stdout(raw=False):
            printer.start()
            while self.gone is None:
                try:
                    line = self.prompt.prompt(self.prompt_text, pre_run=self.exit_if_gone)
                except (EOFError, KeyboardInterrupt):
                    break  # Ctrl-D or Ctrl-C: leave cleanly
                if not self.owner.call(partial(controller.handle_line, line)):
                    break
        self.session.stop()
        if self.gone is not None and not controller.quit_requested:
            self.owner.close()
            return 1
        controller.quit_requested = True
        held = self.session.held
        if held:
            self.show(
                notices.warning(f"{len(held)} line(s) typed while disconnected were not sent")
            )
        self.session.close(idle_timeout=5)
        printer.join(5)
        self.owner.close()
        return 0


def run(
    session: ChatSession,
    where: str,
    *,
    pt_input: Input | None = None,
    pt_output: Output | None = None,
    on_output: Callable[[str], None] | None = None,
) -> int:
    """Chat on the terminal. A session that can redial retries a dropped connection with
    backoff and jitter while the user keeps typing. pt_input/pt_output replace the terminal and
    on_output sees every line shown (tests drive the real prompt through a pipe)."""
    return Console(session, where, pt_input, pt_output, on_output).run()
