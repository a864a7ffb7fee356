"""The library apart from its front ends: securechat.client and the core modules import no front
end, and the GUI takes from the terminal package only the shared slash-command logic."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "securechat"
FRONT_ENDS = ("securechat.terminal", "securechat.gui", "prompt_toolkit", "tkinter")
# What the GUI shares with the terminal: the commands it accepts and what they do and say.
SHARED_UI = {
    "securechat.terminal.commands",
    "securechat.terminal.controller",
    "securechat.terminal.hints",
    "securechat.terminal.notices",
}


def imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_the_library_and_the_core_import_no_front_end() -> None:
    core = [*PACKAGE.glob("client/*.py"), *PACKAGE.glob("*.py"), *PACKAGE.glob("server/*.py")]
    leaks = {
        f"{path.relative_to(PACKAGE)}: {name}"
        for path in core
        if path.name not in ("cli.py", "__main__.py")  # the command line starts the front ends
        for name in imports(path)
        if name.startswith(FRONT_ENDS)
    }
    assert leaks == set()


def test_the_gui_takes_only_shared_ui_logic_from_the_terminal() -> None:
    taken = {
        name
        for path in PACKAGE.glob("gui/*.py")
        for name in imports(path)
        if name.startswith("securechat.terminal.")
    }
    assert taken  # the GUI does run the terminal's commands
    assert {name for name in taken if not name.startswith(tuple(SHARED_UI))} == set()
