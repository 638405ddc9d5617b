"""The daemon's checks of the host it starts on."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from omirror.daemon import _warn_unprotected_hardlinks


@pytest.mark.parametrize("value, warned", [(b"0\n", True), (b"1\n", False), (b"2\n", False)])
def test_unprotected_hard_links_are_named_at_start(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, value: bytes, warned: bool) -> None:
    """With fs.protected_hardlinks=0 any user may hard-link /etc/shadow into a tree,
    where this daemon reads it as root: the operator is told, with the fix."""
    sysctl = tmp_path / "protected_hardlinks"
    sysctl.write_bytes(value)
    with caplog.at_level(logging.WARNING, logger="omirror.daemon"):
        assert _warn_unprotected_hardlinks(str(sysctl)) is warned
    assert ("fs.protected_hardlinks is 0" in caplog.text) is warned
    assert _warn_unprotected_hardlinks(str(tmp_path / "none")) is False
