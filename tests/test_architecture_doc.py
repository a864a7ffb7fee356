"""docs/ARCHITECTURE.md's module map names every module of the package, so a newcomer finds it."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _module_map() -> str:
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    match = re.search(r"^## Module map\n(.*?)^## ", text, re.M | re.S)
    assert match, "docs/ARCHITECTURE.md has no '## Module map' section"
    return match.group(1)


def test_module_map_names_every_module() -> None:
    listed = set(re.findall(r"[a-z_]+\.py", _module_map()))
    package = ROOT / "securechat"
    modules = {
        path.name
        for path in package.rglob("*.py")
        if path.name not in {"__init__.py", "__main__.py"}
    }
    assert sorted(modules - listed) == []


def test_module_map_names_no_module_that_is_gone() -> None:
    package = ROOT / "securechat"
    existing = {path.name for path in package.rglob("*.py")}
    listed = set(re.findall(r"[a-z_]+\.py", _module_map()))
    assert sorted(listed - existing) == []
