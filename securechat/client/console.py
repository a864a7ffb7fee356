"""The interactive terminal client, on prompt_toolkit.

The input line stays at the bottom: incoming events print above it (patch_stdout) and never
clobber what you are typing. Up-arrow recalls earlier lines, Tab completes commands, rooms and
names, a status bar shows who and where you are, and a multi-line paste (bracketed paste) is
sent as one message because Enter submits the whole buffer. Ctrl-D, Ctrl-C or /quit leave.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from prompt_toolkit import PromptSession
from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document
from prompt_toolkit.history import InMemoryHistory
from prompt_toolkit.input import Input
from prompt_toolkit.output import Output
from prompt_toolkit.patch_stdout import patch_stdout

from securechat.client import commands
from securechat.client.api import Client
from securechat.client.controller import Controller
from securechat.client.events import Closed


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


def run(
    client: Client, where: str, *, pt_input: Input | None = None, pt_output: Output | None = None
) -> int:
    """Chat until /quit, end of input, or the connection closes; the exit status.

    pt_input/pt_output replace the terminal (tests drive the real prompt through a pipe).
    """
    session: PromptSession[str] = PromptSession(
        history=InMemoryHistory(), input=pt_input, output=pt_output
    )
    controller = Controller(client, lambda text: print(text, flush=True))
    session.completer = ChatCompleter(controller)
    closed: list[str] = []

    def toolbar() -> str:
        target = (
            f"DM {controller.query}" if controller.query else (controller.current_room or "no room")
        )
        state = f"disconnected: {closed[0]}" if closed else "connected (TLS 1.3)"
        return f" {client.user}@{where}  {target}  {state}  /help"

    session.bottom_toolbar = toolbar

    def poke_prompt(closing: bool) -> None:
        # The prompt's event loop may be between two prompts or already closed; both are fine:
        # the next prompt redraws, and the main loop sees `closed`.
        app = session.app
        try:
            if closing and app.is_running and app.loop is not None:
                app.loop.call_soon_threadsafe(lambda: app.exit(exception=EOFError()))
            elif app.is_running:
                app.invalidate()
        except RuntimeError:
            pass

    def pump_events() -> None:
        for event in client.events():
            if isinstance(event, Closed):
                closed.append(event.reason)
            controller.on_event(event)
            poke_prompt(isinstance(event, Closed))

    def prompt_text() -> str:
        return f"[{controller.query or controller.current_room or '-'}] "

    def exit_if_closed() -> None:
        # Closes the gap between `while not closed` and the prompt starting to run.
        if closed:
            session.app.exit(exception=EOFError())

    printer = threading.Thread(target=pump_events, name="events", daemon=True)
    with patch_stdout(raw=False):
        printer.start()
        while not closed:
            try:
                line = session.prompt(prompt_text, pre_run=exit_if_closed)
            except (EOFError, KeyboardInterrupt):
                break  # Ctrl-D or Ctrl-C: leave cleanly
            if not controller.handle_line(line):
                break
    if closed and not controller.quit_requested:
        return 1
    controller.quit_requested = True
    client.wait_idle(5)
    client.close()
    printer.join(5)
    return 0
