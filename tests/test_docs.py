"""Every command has help with an example, and the README and docs name every command."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from vtkit.cli.main import COMMANDS, app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help_with_an_example(name):
    result = runner.invoke(app, [name, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    doc = COMMANDS[name].__doc__ or ""
    assert "Example" in doc, f"vtkit {name}: its docstring (the help text) has no example"
    assert doc.split("\n")[0].strip()[:30] in result.output


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_is_in_the_readme(name):
    readme = (ROOT / "README.md").read_text()
    assert f"vtkit {name}" in readme, f"README.md does not show `vtkit {name}`"


def test_readme_shows_the_two_commands_and_links_existing_docs():
    readme = (ROOT / "README.md").read_text()
    assert "make all" in readme and "make test" in readme
    for line in readme.splitlines():
        if line.startswith("- `docs/"):
            doc = line.split("`")[1]
            assert (ROOT / doc).is_file(), f"README links {doc}, which does not exist"


def test_root_help_lists_every_command():
    result = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for name in COMMANDS:
        assert name in result.output


def test_version():
    from vtkit import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output
