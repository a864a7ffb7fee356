"""Outside programs some tests need. Each test names the ones it uses and skips, saying which is
missing, when one is not installed; .ci/run installs all of them, so nothing skips in CI."""

from __future__ import annotations

import os
import shutil

import pytest

# Where each comes from on Debian, for the skip reason.
PACKAGES = {
    "Xvfb": "xvfb",
    "xdotool": "xdotool",
    "xwd": "x11-apps",
    "openssl": "openssl",
    "ngircd": "ngircd",
}


def find(tool: str) -> str | None:
    """The path of `tool`, also in /usr/sbin (ngircd lives there, off a user's PATH)."""
    found = shutil.which(tool)
    sbin = f"/usr/sbin/{tool}"
    return found or (sbin if os.access(sbin, os.X_OK) else None)


def _reason(tools: tuple[str, ...]) -> str | None:
    missing = [t for t in tools if find(t) is None]
    if not missing:
        return None
    packages = " ".join(PACKAGES.get(t, t) for t in missing)
    return f"{', '.join(missing)} not installed (apt-get install {packages}; .ci/run does it)"


def needs(*tools: str) -> pytest.MarkDecorator:
    """Mark a test that runs these programs: it skips with the reason when one is missing."""
    reason = _reason(tools)
    return pytest.mark.skipif(reason is not None, reason=reason or "")


def require(*tools: str) -> None:
    """The same, from inside a fixture or a test."""
    reason = _reason(tools)
    if reason is not None:
        pytest.skip(reason)
