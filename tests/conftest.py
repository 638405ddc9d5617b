"""What every test session shares."""

from __future__ import annotations

import compileall
from pathlib import Path

import pytest

import omirror


def pytest_sessionstart(session: pytest.Session) -> None:
    """The package's bytecode, written once: the daemons the tests start (hundreds) each
    compile every module again otherwise where ``PYTHONDONTWRITEBYTECODE`` is set, as an
    installed omirrord never does."""
    compileall.compile_dir(Path(omirror.__file__).parent, quiet=1)
