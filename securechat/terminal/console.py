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

from prompt_toolkit import PromptSession
from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document
from prompt_toolkit.history import InMemoryHistory
from prompt_toolkit.input import Input
from prompt_toolkit.output import Output
from prompt_toolkit.patch_stdout import patch_stdout

from securechat.client.api import Client
from securechat.client.events import Closed
from securechat.client.reconnect import backoff_delays
from securechat.errors import AuthError, SecureChatError
from securechat.terminal import commands, notices
from securechat.terminal.controller import Controller
from securechat.terminal.notices import Notice, as_text


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
    client: Client,
    where: str,
    *,
    reconnect: Callable[[], Client] | None = None,
    pt_input: Input | None = None,
    pt_output: Output | None = None,
    on_output: Callable[[str], None] | None = None,
) -> int:
    """Chat until /quit, Ctrl-D/Ctrl-C, or a connection loss we cannot recover from.

    With `reconnect` (a function that connects and logs in again) a dropped connection is
    retried with backoff and jitter while the user keeps typing. pt_input/pt_output replace the
    terminal and on_output sees every line shown (tests drive the real prompt through a pipe).
    """
    session: PromptSession[str] = PromptSession(
        history=InMemoryHistory(), input=pt_input, output=pt_output
    )

    def show(notice: Notice) -> None:
        text = as_text(notice)
        print(text, flush=True)
        if on_output:
            on_output(text)

    controller = Controller(client, show)
    session.completer = ChatCompleter(controller)
    status = ["connected (TLS 1.3)"]
    closed: list[str] = []  # set when we stop for good
    stop = threading.Event()

    def toolbar() -> str:
        target = (
            f"DM {controller.query}" if controller.query else (controller.current_room or "no room")
        )
        return f" {controller.client.user}@{where}  {target}  {status[0]}  /help"

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

    def reconnect_loop(reason: str) -> Client | None:
        assert reconnect is not None
        controller.detach()
        show(notices.info(f"connection lost ({reason}); reconnecting"))
        for attempt, delay in enumerate(backoff_delays(), start=1):
            status[0] = f"reconnecting: attempt {attempt} in {delay:.1f}s ({reason})"
            poke_prompt(False)
            if stop.wait(delay):
                return None
            try:
                new = reconnect()
            except AuthError as exc:
                show(notices.warning(f"cannot log in again: {exc}"))
                return None
            except SecureChatError as exc:
                reason = str(exc)
                continue
            status[0] = "connected (TLS 1.3)"
            show(notices.info("reconnected"))
            controller.attach(new)
            poke_prompt(False)
            return new
        return None

    def pump_events() -> None:
        current: Client | None = controller.client
        while current is not None:
            for event in current.events():
                if isinstance(event, Closed):
                    if controller.quit_requested or stop.is_set():
                        current = None
                    elif reconnect is not None:
                        current = reconnect_loop(event.reason)
                        if current is None and not stop.is_set():
                            closed.append("gave up reconnecting")
                    else:
                        controller.on_event(event)
                        current = None
                        closed.append(event.reason)
                    if current is None:
                        status[0] = "disconnected"
                        poke_prompt(bool(closed))
                    break
                controller.on_event(event)
                poke_prompt(False)

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
    stop.set()
    if closed and not controller.quit_requested:
        return 1
    controller.quit_requested = True
    if controller.held:
        show(
            notices.warning(
                f"{len(controller.held)} line(s) typed while disconnected were not sent"
            )
        )
    client = controller.client
    client.wait_idle(5)
    client.close()
    printer.join(5)
    return 0
