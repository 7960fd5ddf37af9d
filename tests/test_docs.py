"""Every command has help with an example, and the README and docs name every command."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vtkit.cli.main import COMMANDS, app
from vtkit.defaults import SCORERS

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


def test_the_repository_reads_nothing_outside_itself():
    """A clone alone in an empty folder must pass its tests: no code, test or chore points at a
    folder beside the checkout or at an environment variable that would."""
    # Spelled in pieces, so this test does not name what it looks for.
    outside = ("../" + "shared", "VTKIT_" + "SHARED_DIR", "parents[" + "2]")
    offenders = []
    for path in [*ROOT.glob("vtkit/**/*.py"), *ROOT.glob("tests/*.py"), ROOT / "Makefile",
                 ROOT / ".ci" / "run"]:
        if path.name == "test_docs.py":
            continue
        text = path.read_text()
        offenders += [f"{path.relative_to(ROOT)}: {token}" for token in outside if token in text]
    assert not offenders, offenders


def test_reference_data_is_documented():
    data = ROOT / "tests" / "data"
    readme = (data / "README.md").read_text()
    for path in data.rglob("*"):
        if path.is_file() and path.name != "README.md":
            assert f"`{path.relative_to(data).as_posix()}`" in readme or path.name in readme, \
                f"tests/data/README.md does not give the source of {path.relative_to(data)}"


def test_comments_and_docs_point_inside_the_repository():
    """The protocol facts the code relies on are in docs/protocol.md; nothing cites a document
    that a clone does not have."""
    pattern = re.compile(r"\bSPEC\b|SPEC\.md")
    offenders = []
    for path in [*ROOT.glob("vtkit/**/*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("docs/*.md"),
                 ROOT / "README.md"]:
        name = path.relative_to(ROOT).as_posix()
        if path.name == "test_docs.py":
            continue
        offenders += [f"{name}:{number}" for number, line in
                      enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders, offenders
    assert [line for line in (ROOT / "docs" / "protocol.md").read_text().splitlines()
            if line.startswith("## ")][:6] == [
        "## 1. The experiment", "## 2. Data (ScienceQA)", "## 3. Prompt and tokens",
        "## 4. Images", "## 5. Decoding and scoring", "## 6. Checkpoints"]


#: The seed's scorers, described in the table of docs/scorers.md; every other has a section.
BUILT_IN_SCORERS = ("l2", "cls", "random", "uniform")


@pytest.mark.parametrize("name", SCORERS)
def test_every_scorer_is_in_docs_scorers(name):
    text = (ROOT / "docs" / "scorers.md").read_text()
    assert re.search(rf"^\| `{name}`( \(default\))? \|", text, re.MULTILINE), \
        f"docs/scorers.md: no row for {name} in the table of methods"
    if name not in BUILT_IN_SCORERS:
        assert re.search(rf"^## {name}\b", text, re.MULTILINE), \
            f"docs/scorers.md has no '## {name}' section"
