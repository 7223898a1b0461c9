"""Every command-line option is documented: in the man page and in the README.

``--help`` comes from the code, so it cannot fall behind; the man pages and
the README are written by hand and can.  (Pure: reads files, runs nothing.)
"""

from __future__ import annotations

import os

import click
import pytest

from mpxd.cli import main as mpxd_main
from mpxd.mpxctl import main as mpxctl_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(relative: str) -> str:
    with open(os.path.join(ROOT, relative), encoding="utf-8") as f:
        return f.read()


def long_options(command: click.Command) -> list[str]:
    """The command's --options, both halves of --x/--no-x, subcommands' too."""
    found = [opt for param in command.params
             for opt in (*param.opts, *param.secondary_opts) if opt.startswith("--")]
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            found += long_options(sub)
    return sorted(set(found) - {"--help"})


@pytest.mark.parametrize("command, page", [(mpxd_main, "man/mpxd.1"),
                                           (mpxctl_main, "man/mpxctl.1")])
def test_every_option_is_in_the_man_page(command, page):
    text = read(page).replace("\\-", "-")       # roff escapes the hyphens
    missing = [opt for opt in long_options(command) if opt not in text]
    assert not missing, f"{page} does not mention {missing}"


@pytest.mark.parametrize("command", [mpxd_main, mpxctl_main])
def test_every_option_is_in_the_readme(command):
    text = read("README.md")
    missing = [opt for opt in long_options(command) if opt not in text]
    assert not missing, f"README.md does not mention {missing}"
