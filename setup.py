"""The one build step pyproject.toml cannot declare: the manual pages.

omirrord(8) and omirrd.conf(5) are written in reStructuredText (``man/*.rst``) and
turned into troff by docutils' manpage writer at build time, so no generated troff is
kept in the repository and a page cannot drift from its source. ``build_man`` runs as
a sub-command of ``build``, which both ``pip install .`` (a wheel) and ``pip install -e
.`` (an editable wheel) run; it writes ``build/man/omirrord.8`` and
``build/man/omirrd.conf.5``, which ``data_files`` installs under the prefix:
``<prefix>/share/man/man8/omirrord.8`` and ``<prefix>/share/man/man5/omirrd.conf.5``,
where man(1) looks (``man -M <venv>/share/man omirrord``). Any reStructuredText warning
in a page stops the build, so a broken page is never installed.

The rendering settings live in :func:`render_manpage` alone; tests/unit/test_manpages.py
calls it too, so the pages it checks are the pages that are installed.
"""

from __future__ import annotations

import os

from setuptools import Command, setup
from setuptools.command.build import build

MAN_SOURCES = {"man/omirrord.8.rst": "man8", "man/omirrd.conf.5.rst": "man5"}
MAN_BUILD_DIR = "build/man"


def manpage_name(source: str) -> str:
    """man/omirrord.8.rst -> omirrord.8"""
    return os.path.basename(source).removesuffix(".rst")


def render_manpage(source: str, target: str) -> None:
    """Write the troff of one page; a warning about the source raises an error.

    No docutils configuration file is read, so the output depends on the source alone.
    """
    from docutils.core import publish_file
    from docutils.writers import manpage

    publish_file(source_path=source, destination_path=target, writer=manpage.Writer(),
                 settings_overrides={"_disable_config": True, "halt_level": 2,
                                     "report_level": 2, "input_encoding": "utf-8",
                                     "output_encoding": "utf-8"})


class BuildMan(Command):
    """Render the manual pages into build/man (a ``build`` sub-command)."""

    description = "render the manual pages from man/*.rst with docutils"
    user_options: list[tuple[str, str | None, str]] = []
    editable_mode = False

    def initialize_options(self) -> None:
        self.build_lib: str | None = None

    def finalize_options(self) -> None:
        self.set_undefined_options("build_py", ("build_lib", "build_lib"))

    def run(self) -> None:
        # also in editable mode: the pages are data files, copied, never linked
        os.makedirs(MAN_BUILD_DIR, exist_ok=True)
        for source in MAN_SOURCES:
            target = os.path.join(MAN_BUILD_DIR, manpage_name(source))
            self.announce(f"rendering {source} -> {target}", level=2)
            render_manpage(source, target)
        if self.editable_mode:
            # setuptools' editable_wheel asks the distribution for "has_data", which
            # it does not have (install has it), and so never installs data_files;
            # install_data then puts the pages into the editable wheel itself. A
            # command runs once per build, so a setuptools that does run it is fine.
            self.run_command("install_data")

    def get_source_files(self) -> list[str]:
        return list(MAN_SOURCES)

    def get_outputs(self) -> list[str]:
        return []  # installed by install_data, not from build_lib

    def get_output_mapping(self) -> dict[str, str]:
        return {}


class Build(build):
    sub_commands = [*build.sub_commands, ("build_man", None)]


if __name__ == "__main__":
    setup(
        cmdclass={"build": Build, "build_man": BuildMan},
        data_files=[(f"share/man/{section}",
                     [f"{MAN_BUILD_DIR}/{manpage_name(source)}"])
                    for source, section in MAN_SOURCES.items()],
    )
