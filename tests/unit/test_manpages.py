"""The manual pages, omirrord(8) and omirrd.conf(5).

Each page is rendered from man/*.rst by the very function the build uses (setup.py),
then formatted by groff with every warning on: a page that groff warns about, or that
leaves out an option, an environment variable or a command that omirror/cli.py defines,
fails here, so the pages cannot fall behind the command line. The pages the build
installed must be where man(1) looks for them.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import click
import pytest

from omirror import __version__, cli

ROOT = Path(__file__).resolve().parents[2]


def _build_script() -> ModuleType:
    """setup.py as a module: its pages and its renderer, without running setup()."""
    spec = importlib.util.spec_from_file_location("omirror_setup", ROOT / "setup.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BUILD = _build_script()
SOURCES: dict[str, str] = BUILD.MAN_SOURCES
PAGES = {BUILD.manpage_name(source): source for source in SOURCES}


@pytest.fixture(scope="module")
def troff(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each page rendered from its source, by name (omirrord.8, omirrd.conf.5)."""
    out = tmp_path_factory.mktemp("man")
    rendered = {}
    for name, source in PAGES.items():
        rendered[name] = out / name
        BUILD.render_manpage(str(ROOT / source), str(rendered[name]))
    return rendered


@functools.cache
def _groff(page: Path) -> str:
    """The page as a terminal shows it, as plain text; no warning allowed."""
    groff = shutil.which("groff")
    if groff is None:
        pytest.skip("groff is not installed (Debian: apt-get install groff)")
    # -P-cbou: no escape sequences, bold or underline, so the text can be searched
    result = subprocess.run([groff, "-man", "-ww", "-Tutf8", "-P-cbou", str(page)],
                            capture_output=True, encoding="utf-8", timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", f"groff warns about {page.name}:\n{result.stderr}"
    # undo hyphenation at line ends (U+2010); groff may print \- as a minus sign
    return re.sub("\u2010\n *", "", result.stdout).replace("\u2212", "-")


def _section(text: str, title: str) -> str:
    """One section of a formatted page: from its heading to the next one."""
    match = re.search(rf"^{re.escape(title)}\n(.*?)(?=^[A-Z][A-Z ]+\n)", text,
                      re.MULTILINE | re.DOTALL)
    assert match is not None, f"no section {title}"
    return match.group(1)


def _mentions(text: str, word: str) -> bool:
    """``word`` stands in ``text`` as a word of its own: -C is not -Cx, --path is not
    --paths."""
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text) is not None


def _commands(command: click.Command, ctx: click.Context,
              path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], click.Command,
                                                           click.Context]]:
    """Every command of the tree with its words (("log", "dump")) and a context, which
    carries the help option names down from the group as click does."""
    yield path, command, ctx
    if isinstance(command, click.Group):
        for name, sub in sorted(command.commands.items()):
            yield from _commands(sub, click.Context(sub, info_name=name, parent=ctx),
                                 (*path, name))


def _cli() -> list[tuple[tuple[str, ...], click.Command, click.Context]]:
    return list(_commands(cli.main, click.Context(cli.main, info_name="omirrord",
                                                  **cli.main.context_settings)))


def _option_names() -> set[str]:
    names: set[str] = set()
    for _, command, ctx in _cli():
        for param in command.get_params(ctx):
            if isinstance(param, click.Option):
                names.update(param.opts, param.secondary_opts)
    return names


def _envvars() -> set[str]:
    found: set[str] = set()
    for _, command, ctx in _cli():
        for param in command.get_params(ctx):
            if isinstance(param.envvar, str):
                found.add(param.envvar)
            elif param.envvar:
                found.update(param.envvar)
    return found


def _choices() -> set[str]:
    """The fixed values an option or argument takes (completion's shell names)."""
    found: set[str] = set()
    for _, command, ctx in _cli():
        for param in command.get_params(ctx):
            if isinstance(param.type, click.Choice):
                found.update(str(choice) for choice in param.type.choices)
    return found


# -- the sources ---------------------------------------------------------------------------

def test_the_cli_tree_is_walked() -> None:
    # the checks below are only as good as this walk: it reaches the nested log group
    # and the help option, and sees the environment variables
    assert {"--config", "-h", "--help", "--older-than", "--from"} <= _option_names()
    assert ("log", "replay") in [path for path, _, _ in _cli()]
    assert "OMIRRORD_CONFIG" in _envvars()


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_sources_are_ascii(source: str) -> None:
    # troff reads bytes: a stray non-ASCII character depends on groff's input encoding
    text = (ROOT / source).read_bytes()
    assert text.isascii(), (source, [line for line in text.splitlines()
                                     if not line.isascii()])


def test_a_source_with_a_warning_fails_the_build(tmp_path: Path) -> None:
    from docutils.utils import SystemMessage

    bad = tmp_path / "bad.8.rst"
    bad.write_text("=====\n bad page\n=====\n\n:Manual section: 8\n\nDESCRIPTION\n"
                   "===========\n\nx\n")
    with pytest.raises(SystemMessage, match="too short"):
        BUILD.render_manpage(str(bad), str(tmp_path / "bad.8"))
    assert not (tmp_path / "bad.8").exists()


@pytest.mark.parametrize(("name", "section"), [("omirrord.8", "8"), ("omirrd.conf.5", "5")])
def test_page_header_names_the_page_and_this_version(troff: dict[str, Path], name: str,
                                                     section: str) -> None:
    header = next(line for line in troff[name].read_text().splitlines()
                  if line.startswith(".TH "))
    assert header.startswith(f'.TH "{name.rsplit(".", 1)[0]}" "{section}" ')
    assert f'"omirror {__version__}"' in header


# -- formatted by groff --------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(PAGES))
def test_groff_formats_the_page_without_a_warning(troff: dict[str, Path], name: str) -> None:
    text = _groff(troff[name])
    assert text.count("\n") > 100
    for title in ("SYNOPSIS", "DESCRIPTION", "EXAMPLES", "FILES", "SEE ALSO"):
        assert re.search(rf"^{title}$", text, re.MULTILINE), (name, title)


def test_omirrord_page_has_every_section_an_operator_looks_for(
        troff: dict[str, Path]) -> None:
    text = _groff(troff["omirrord.8"])
    for title in ("COMMANDS", "OPTIONS", "ENVIRONMENT", "EXIT STATUS", "SIGNALS"):
        assert _section(text, title).strip(), title


def test_omirrord_page_names_every_option_of_the_command_line(
        troff: dict[str, Path]) -> None:
    options = _section(_groff(troff["omirrord.8"]), "OPTIONS")
    missing = sorted(name for name in _option_names() if not _mentions(options, name))
    assert not missing, f"OPTIONS of man/omirrord.8.rst lacks {missing}"


def test_omirrord_page_names_every_environment_variable(troff: dict[str, Path]) -> None:
    environment = _section(_groff(troff["omirrord.8"]), "ENVIRONMENT")
    missing = sorted(name for name in _envvars() if not _mentions(environment, name))
    assert not missing, f"ENVIRONMENT of man/omirrord.8.rst lacks {missing}"


def test_omirrord_page_describes_every_command(troff: dict[str, Path]) -> None:
    commands = _section(_groff(troff["omirrord.8"]), "COMMANDS")
    # a command's heading is a line indented by 7, its description by 14
    headings = [line for line in commands.splitlines() if re.match(r" {7}\S", line)]
    missing = [" ".join(path) for path, _, _ in _cli()[1:]
               if not any(_mentions(line, " ".join(path)) for line in headings)]
    assert not missing, f"COMMANDS of man/omirrord.8.rst lacks {missing}"
    choices = sorted(choice for choice in _choices() if not _mentions(commands, choice))
    assert not choices, f"COMMANDS of man/omirrord.8.rst lacks the values {choices}"


def test_conf_page_names_every_install_option_and_command(troff: dict[str, Path]) -> None:
    from omirror import config

    text = _groff(troff["omirrd.conf.5"])
    commands = _section(text, "COMMANDS")
    words = [*config.INSTALL_OPTIONS, *config.COMMANDS]
    missing = [word for word in words if not _mentions(commands, word)]
    assert not missing, f"COMMANDS of man/omirrd.conf.5.rst lacks {missing}"
    assert "ssh-ed25519" in _section(text, "THE PEERS FILE")


# -- installed -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(PAGES))
def test_installed_page_is_under_the_prefix_where_man_looks(name: str) -> None:
    section = SOURCES[PAGES[name]]
    manpath = Path(sys.prefix) / "share" / "man"
    page = manpath / section / name
    assert page.is_file(), (f"{page} is missing: the build installs it; run "
                            "pip install -e '.[test]' again")
    assert page.read_text().count("\n.TH ") == 1
    man = shutil.which("man")
    if man is None:
        pytest.skip("man is not installed")
    stem, number = name.rsplit(".", 1)
    found = subprocess.run([man, "-M", str(manpath), "-w", number, stem], capture_output=True,
                           text=True, timeout=60, check=False, env={**os.environ, "LC_ALL": "C"})
    assert found.returncode == 0, found.stderr
    assert Path(found.stdout.strip()) == page
