"""The project's reStructuredText (README, docs/, man/, bench/) parses without a warning:
a broken table or a section underline left by an edit is caught here, not by a reader."""

from __future__ import annotations

import io
from pathlib import Path

import docutils.core
import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted([ROOT / "README.rst", *ROOT.glob("docs/*.rst"), *ROOT.glob("man/*.rst"),
                  ROOT / "bench" / "README.rst"])


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_text_parses_without_a_warning(source: Path) -> None:
    warnings = io.StringIO()
    docutils.core.publish_doctree(
        source.read_text(encoding="utf-8"), source_path=str(source),
        settings_overrides={"report_level": 2, "halt_level": 5,
                            "warning_stream": warnings})
    assert warnings.getvalue() == ""
