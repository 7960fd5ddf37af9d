"""The CLI's own contract: choices for fixed-value options, one-line usage errors, lazy imports."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import vtkit.cli
from vtkit.cli.main import COMMANDS, app
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


def _imports(path: Path) -> set[str]:
    """The vtkit modules a source file imports, at the top or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {name for name in names if name.startswith("vtkit.")}


def test_command_modules_never_import_each_other():
    """A command module imports the shared CLI modules and the library; only main wires the
    commands together."""
    cli = Path(vtkit.cli.__file__).parent
    shared = {"vtkit.cli.options", "vtkit.cli.output", "vtkit.cli.progress"}
    commands = {f"vtkit.cli.{path.stem}" for path in cli.glob("*.py")} - shared - {
        "vtkit.cli.main", "vtkit.cli.__init__"}
    assert {"vtkit.cli.sweep", "vtkit.cli.run", "vtkit.cli.bench"} <= commands
    offenders = [f"{path.name} imports {name}" for path in sorted(cli.glob("*.py"))
                 if path.stem != "main" for name in _imports(path) if name in commands]
    assert not offenders, offenders


@pytest.mark.parametrize("command, config", [
    ("extract", "vtkit.extract.ExtractConfig"),
    ("sweep", "vtkit.sweep.SweepConfig"),
    ("run", "vtkit.sweep.SweepConfig"),
    ("run", "vtkit.extract.ExtractConfig"),
    ("run", "vtkit.rank.RankConfig"),
    ("rank", "vtkit.rank.RankConfig"),
    ("prompts", "vtkit.prompts.PromptsConfig"),
    ("bench", "vtkit.bench.BenchConfig"),
    ("cost", "vtkit.cost.CostConfig"),
])
def test_signature_defaults_are_the_config_defaults(command, config):
    """What `vtkit CMD --help` shows as a default is what the stage does when it is not given."""
    module, name = config.rsplit(".", 1)
    fields = {f.name: f.default for f in dataclasses.fields(getattr(importlib.import_module(
        module), name)) if f.default is not dataclasses.MISSING}
    if name == "PromptsConfig":  # its base_dir None reads the question file alone
        del fields["base_dir"]
    parameters = inspect.signature(COMMANDS[command]).parameters
    # --compile's parameter is compile_decoder (compile is a builtin); the configs say compile.
    shared = {p.name.removesuffix("_decoder"): p.default for p in parameters.values()}
    common = sorted(set(fields) & set(shared))
    assert common
    assert {n: shared[n] for n in common} == {n: fields[n] for n in common}


def test_run_has_the_sweep_flags():
    help_text = runner.invoke(app, ["run", "--help"], env={"COLUMNS": "200"}).stdout
    for flag in ("--token-budget", "--compile", "--json", "--keep-attention", "--threshold"):
        assert f" {flag} " in help_text


def test_stage_json_comes_from_the_main_process_only(monkeypatch, capsys):
    from vtkit.cli.output import print_stage_json

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    print_stage_json({"k": 1})
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    print_stage_json({"path": Path("a/b"), "k": 1})
    assert json.loads(capsys.readouterr().out) == {"path": "a/b", "k": 1}


def _json_of(args: list[str]) -> dict:
    """Run a command with --json: stdout must be exactly one JSON document."""
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_extract_sweep_and_run_print_their_results_as_json(tiny_models, demo_scienceqa,
                                                           tmp_path):
    out = tmp_path / "results"
    common = ["--model-path", str(tiny_models["hf"]), "--base-dir", str(demo_scienceqa),
              "--num-samples", "6", "--output-dir", str(out), "--device", "cpu"]
    sweep_flags = ["--tokens", "576,20", "--max-new-tokens", "3", "--keep-attention", "1"]

    extracted = _json_of(["extract", *common])
    images = sum(1 for q in json.loads((demo_scienceqa / "llava_test_CQM-A.json").read_text())[:6]
                 if "image" in q)
    assert extracted["path"] == str(out / "features.h5")
    assert extracted["num_images"] == extracted["num_computed"] == images > 0
    assert extracted["bytes_per_image"] > 0 and extracted["seconds"] > 0
    assert extracted["already_complete"] is False and extracted["random_init"] is False

    swept = _json_of(["sweep", *common, *sweep_flags])
    assert swept["path"] == str(out / "sweep.h5") and swept["already_complete"] is False
    assert swept["prefill_tokens"] > 0
    assert [r["k"] for r in swept["results"]] == [576, 20]
    for r in swept["results"]:
        answers = (out / "answers" / f"k{r['k']}.jsonl").read_text().splitlines()
        assert r["total"] == len(answers) == 6 and r["img_total"] == images
        assert r["accuracy"] == pytest.approx(100.0 * r["correct"] / r["total"])

    ran = _json_of(["run", *common, *sweep_flags])
    assert ran["extract"]["num_computed"] == 0 and ran["extract"]["already_complete"] is True
    assert ran["sweep"]["results"] == swept["results"] and ran["sweep"]["already_complete"]
    assert ran["rank"]["ranks_file"] == str(out / "ranks.json")
    assert ran["rank"]["token_counts"] == [576, 20]
    raw = json.loads((out / "raw_results.json").read_text())
    assert ran["plot"]["accuracies"] == raw["accuracies"]
    assert raw["accuracies"] == [r["accuracy"] for r in swept["results"]]
