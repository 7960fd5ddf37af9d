"""The CLI's own contract: choices for fixed-value options, one-line usage errors, lazy imports."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from vtkit.cli.main import app
from vtkit.defaults import DTYPES, IMAGE_MODES, SCORERS
from vtkit.prompts import CONV_TEMPLATES

runner = CliRunner()
HEAVY = ("torch", "transformers", "h5py", "matplotlib")


def test_help_and_usage_errors_import_no_heavy_library():
    """`vtkit --help`, a command's help and a usage error never load torch and friends."""
    script = f"""
import json, sys
from typer.testing import CliRunner
import vtkit.cli.main as main
runner = CliRunner()
codes = [runner.invoke(main.app, args).exit_code
         for args in (["--help"], ["sweep", "--help"], ["sweep", "--conv-mode", "bogus"],
                      ["run", "--bogus"], ["score"])]
print(json.dumps({{"codes": codes, "loaded": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            check=True)
    report = json.loads(result.stdout.splitlines()[-1])
    assert report == {"codes": [0, 0, 2, 2, 2], "loaded": []}


@pytest.mark.parametrize("flag, choices", [
    ("--conv-mode", tuple(CONV_TEMPLATES)),
    ("--scorer", SCORERS),
    ("--dtype", DTYPES),
    ("--device", ("auto", "cpu", "cuda", "cuda:N")),
])
def test_sweep_help_lists_the_choices(flag, choices):
    result = runner.invoke(app, ["sweep", "--help"], env={"COLUMNS": "250"})
    line = next(line for line in result.stdout.splitlines() if f" {flag} " in line)
    assert f"<{'|'.join(choices)}>" in line and "<str>" not in line


def test_image_mode_help_lists_the_choices():
    result = runner.invoke(app, ["extract", "--help"], env={"COLUMNS": "250"})
    line = next(line for line in result.stdout.splitlines() if " --image-mode " in line)
    assert f"<{'|'.join(IMAGE_MODES)}>" in line


@pytest.mark.parametrize("command, flag, value", [
    ("sweep", "--conv-mode", "bogus"),
    ("run", "--scorer", "l3"),
    ("extract", "--image-mode", "bogus"),
    ("extract", "--dtype", "fp8"),
    ("sweep", "--device", "gpu"),
    ("bench", "--device", "cuda:x"),
    ("extract", "--device", "cuda:N"),
])
def test_a_bad_choice_is_one_line_naming_the_flag(command, flag, value, tmp_path):
    # The model path does not exist: a parse error must come first.
    result = runner.invoke(app, [command, flag, value, "--output-dir", str(tmp_path)],
                           env={"COLUMNS": "60"})
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert flag in result.stderr and repr(value) in result.stderr
    assert not any(tmp_path.iterdir())


def test_unknown_flags_and_commands_are_one_line():
    for args in (["--bogus"], ["bogus"], ["sweep", "--bogus"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.stderr
        assert "bogus" in result.stderr


def test_choices_reach_the_command_as_plain_strings(monkeypatch):
    """Configs are saved as JSON and fingerprinted: the values must be str, not an Enum."""
    import vtkit.sweep

    captured = {}

    class Stop(Exception):
        pass

    def fake_config(**kwargs):
        captured.update(kwargs)
        raise Stop

    monkeypatch.setattr(vtkit.sweep, "SweepConfig", fake_config)
    with pytest.raises(Stop):
        runner.invoke(app, ["sweep", "--conv-mode", "v1", "--scorer", "cls", "--dtype",
                            "bfloat16", "--device", "cuda:1"], catch_exceptions=False)
    names = ("conv_mode", "scorer", "dtype", "device")
    assert {k: captured[k] for k in names} == {
        "conv_mode": "v1", "scorer": "cls", "dtype": "bfloat16", "device": "cuda:1"}
    assert all(type(captured[k]) is str for k in names)
