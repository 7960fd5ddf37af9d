"""The fault suite: kill -9 at random points, concurrent writers, a full disk or a file-size limit,
an unwritable output dir, a code-running pickle. Each case checks the one-line error and that
nothing finished was lost or mixed (files equal to an uninterrupted run's)."""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from vtkit import cache
from vtkit.cli.main import app
from vtkit.cli.output import handles_errors
from vtkit.extract import FEATURES_FILE, ExtractConfig, extract
from vtkit.sweep import SWEEP_FILE, SweepConfig, sweep

ROOT = Path(__file__).resolve().parents[1]
N = 8
TOKENS = "576,20"


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("VTKIT_DEBUG", None)
    return env


def _extract_cmd(models, data, out) -> list[str]:
    return [sys.executable, "-m", "vtkit", "extract", "--model-path", str(models["hf"]),
            "--base-dir", str(data), "--num-samples", str(N), "--batch-size", "2",
            "--output-dir", str(out), "--device", "cpu"]


def _sweep_cmd(models, data, out, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vtkit", "sweep", "--model-path", str(models["hf"]),
            "--base-dir", str(data), "--num-samples", str(N), "--tokens", TOKENS,
            "--max-new-tokens", "3", "--batch-size", "2", "--output-dir", str(out),
            "--device", "cpu", *extra]


def _run(cmd, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, **kwargs)


def _assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in last, last
    return last


def _datasets(path: Path) -> dict:
    """Every dataset of an HDF5 file, plus the attributes that say what it holds."""
    found = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: found.__setitem__(name, obj[()])
                     if isinstance(obj, h5py.Dataset) else None)
        found["@fingerprint"] = f.attrs["fingerprint"]
        found["@complete"] = bool(f.attrs["complete"])
    return found


def _assert_same_h5(got: Path, expected: Path) -> None:
    a, b = _datasets(got), _datasets(expected)
    assert sorted(a) == sorted(b)
    for name in a:
        assert np.array_equal(a[name], b[name]), name


def _answers(out: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((out / "answers").glob("k*.jsonl"))}


def _temporaries(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if cache.is_temporary(p)]


def _extract_config(models, data, out) -> ExtractConfig:
    """The settings of :func:`_extract_cmd`, for runs in this process."""
    return ExtractConfig(model_path=str(models["hf"]), base_dir=data, num_samples=N,
                         output_dir=out, device="cpu", batch_size=2)


def _sweep_config(models, data, out) -> SweepConfig:
    return SweepConfig(model_path=str(models["hf"]), base_dir=data, num_samples=N,
                       output_dir=out, device="cpu", batch_size=2, max_new_tokens=3,
                       tokens=[int(k) for k in TOKENS.split(",")])


@pytest.fixture(scope="module")
def reference(tiny_models, demo_scienceqa, tmp_path_factory) -> Path:
    """An uninterrupted extract + sweep, in this process."""
    out = tmp_path_factory.mktemp("faults") / "reference"
    extract(_extract_config(tiny_models, demo_scienceqa, out))
    sweep(_sweep_config(tiny_models, demo_scienceqa, out))
    return out


def _kill_when(cmd, watch: Path, pattern: str, parts: int, delay: float) -> bool:
    """Start ``cmd``, SIGKILL it ``delay`` s after ``parts`` files match in ``watch``; whether it
    was killed (rather than finishing first)."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline \
            and len(list(watch.glob(pattern))) < parts:
        time.sleep(0.005)
    time.sleep(delay)
    killed = proc.poll() is None
    proc.kill()
    proc.wait()
    return killed


@pytest.mark.parametrize("stage", ["extract", "sweep"])
def test_sigkill_at_random_points_then_rerun_equals_uninterrupted(stage, tiny_models,
                                                                  demo_scienceqa, reference,
                                                                  tmp_path):
    out = tmp_path / "out"
    rng = random.Random(f"vtkit-faults-{stage}")
    if stage == "extract":
        cmd, parts, pattern, final = (_extract_cmd(tiny_models, demo_scienceqa, out),
                                      out / "features.parts", "part-*.h5", FEATURES_FILE)
    else:
        out.mkdir()
        shutil.copy(reference / FEATURES_FILE, out / FEATURES_FILE)
        cmd, parts, pattern, final = (_sweep_cmd(tiny_models, demo_scienceqa, out),
                                      out / "sweep.parts", "[it]-*.h5", SWEEP_FILE)
    kills = 0
    for attempt in range(3):
        # The first kill comes as the first part appears (so at least one lands); the others
        # wait for one or two more parts than exist, then a random moment more.
        have = len(list(parts.glob(pattern)))
        more, delay = (1, 0.0) if attempt == 0 else (rng.randint(1, 2), rng.uniform(0, 0.3))
        kills += _kill_when(cmd, parts, pattern, have + more, delay)
        if (out / final).exists():
            break
        assert (out / cache.LOCK_FILE).exists()     # the killed run's lock, stale now
    assert kills, "every run finished before it could be killed"
    # The re-run (in this process, to keep the suite fast) takes over the stale lock.
    if stage == "extract":
        extract(_extract_config(tiny_models, demo_scienceqa, out))
    else:
        sweep(_sweep_config(tiny_models, demo_scienceqa, out))
    _assert_same_h5(out / final, reference / final)
    if stage == "sweep":
        assert _answers(out) == _answers(reference)
    assert not _temporaries(out)
    assert not (out / cache.LOCK_FILE).exists()


def test_second_writer_stops_at_once_and_the_first_finishes_correctly(tiny_models,
                                                                       demo_scienceqa,
                                                                       reference, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(reference / FEATURES_FILE, out / FEATURES_FILE)
    first = subprocess.Popen(_sweep_cmd(tiny_models, demo_scienceqa, out), env=_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while first.poll() is None and time.monotonic() < deadline \
                and not list((out / "sweep.parts").glob("[it]-*.h5")):
            time.sleep(0.005)
        # Paused mid-sweep, holding the directory, with finished parts on disk.
        first.send_signal(signal.SIGSTOP)
        assert first.poll() is None, first.stderr.read()
        parts = sorted(p.name for p in (out / "sweep.parts").glob("*.h5"))
        owner = json.loads((out / cache.LOCK_FILE).read_text())
        assert owner["pid"] == first.pid
        # The same settings, and other settings with --force, both at once.
        same, other = (subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True) for cmd in (
            _sweep_cmd(tiny_models, demo_scienceqa, out),
            _sweep_cmd(tiny_models, demo_scienceqa, out, "--conv-mode", "llava_v1", "--force")))
        for proc in (same, other):
            _, stderr = proc.communicate(timeout=300)
            _assert_one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, "",
                                                               stderr),
                                   f"{out} is in use by vtkit (pid {first.pid} on ")
        assert sorted(p.name for p in (out / "sweep.parts").glob("*.h5")) == parts
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0, first.stderr.read()
    _assert_same_h5(out / SWEEP_FILE, reference / SWEEP_FILE)
    assert _answers(out) == _answers(reference)


def test_lock_is_reentrant_and_refuses_another_holder(tmp_path):
    with cache.output_lock(tmp_path), cache.output_lock(tmp_path):
        owner = json.loads((tmp_path / cache.LOCK_FILE).read_text())
        assert owner["pid"] == os.getpid() and owner["host"]
        probe = _run([sys.executable, "-c",
                      "import sys; from vtkit import cache; from vtkit.errors import LockedError\n"
                      "try:\n    with cache.output_lock(sys.argv[1]): pass\n"
                      "except LockedError as e:\n    print(e)", str(tmp_path)])
        assert f"is in use by vtkit (pid {os.getpid()} on " in probe.stdout, probe.stderr
        assert (tmp_path / cache.LOCK_FILE).exists()
    assert not (tmp_path / cache.LOCK_FILE).exists()


def _limit_file_size(limit: int):
    def limit_it():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return limit_it


def test_file_size_limit_is_one_line_and_a_rerun_resumes(tiny_models, demo_scienceqa,
                                                           reference, tmp_path):
    out = tmp_path / "out"
    cmd = _extract_cmd(tiny_models, demo_scienceqa, out)
    merged = (reference / FEATURES_FILE).stat().st_size
    # Too small for any part: the first part fails.
    small = _run(cmd, preexec_fn=_limit_file_size(16_000))
    _assert_one_line_error(small, "cannot write", "features.parts", "File too large",
                           "ulimit -f")
    assert not _temporaries(out)
    # Parts (two images each) fit, the merged file does not: the merge fails, every part stays.
    merge = _run(cmd, preexec_fn=_limit_file_size(int(merged * 0.9)))
    _assert_one_line_error(merge, f"cannot write {out / FEATURES_FILE}", "File too large",
                           "finished parts are kept")
    parts = sorted((out / "features.parts").glob("part-*.h5"))
    assert parts and not (out / FEATURES_FILE).exists() and not _temporaries(out)
    result = extract(_extract_config(tiny_models, demo_scienceqa, out))
    assert result.num_computed == 0      # every part was kept: nothing is computed again
    _assert_same_h5(out / FEATURES_FILE, reference / FEATURES_FILE)
    assert not _temporaries(out)


def test_orphan_temporary_files_do_not_fail_a_rerun(tiny_models, demo_scienceqa, reference,
                                                    tmp_path):
    out = tmp_path / "out"
    (out / "features.parts").mkdir(parents=True)
    orphans = [out / ".features.h5.tmp", out / f".{FEATURES_FILE}.tmp-999999-0a1b2c3d",
               out / "features.parts" / ".part-000000.h5.tmp-999999-0a1b2c3d"]
    for orphan in orphans:
        orphan.write_bytes(b"half a file")
    extract(_extract_config(tiny_models, demo_scienceqa, out))
    _assert_same_h5(out / FEATURES_FILE, reference / FEATURES_FILE)
    assert not _temporaries(out)


#: Runs vtkit as ``nobody`` when started as root: the interpreter may live where nobody cannot
#: read (a pyenv under /root), so vtkit is imported first and the user dropped before it runs.
# Python itself may live where nobody cannot read (here: under /root), so everything the run
# imports is imported before the switch, typer's lazily imported option parsing included.
AS_NOBODY = """import importlib.util, os, sys
import vtkit.cli.main, vtkit.sweep, vtkit.model
if importlib.util.find_spec("typer._adapters"):
    import typer._adapters
if os.geteuid() == 0:
    os.setgid(65534)
    os.setuid(65534)
sys.argv = ["vtkit", *sys.argv[1:]]
vtkit.cli.main.main()
"""


def test_unwritable_output_dir_is_one_line_before_the_model_loads(tiny_models, demo_scienceqa):
    if os.geteuid() != 0 and os.access("/", os.W_OK):
        pytest.skip("this user can write everywhere: no directory is unwritable to it")
    # Inputs every user can read (pytest's own temporary folders are private to their owner).
    shared = Path(tempfile.mkdtemp(prefix="vtkit-faults-"))
    try:
        shutil.copytree(tiny_models["hf"], shared / "model")
        shutil.copytree(demo_scienceqa, shared / "scienceqa")
        out = shared / "readonly"
        out.mkdir()
        for path in [shared, *shared.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        out.chmod(0o555)
        proc = subprocess.run(
            [sys.executable, "-c", AS_NOBODY, "sweep", "--model-path", str(shared / "model"),
             "--base-dir", str(shared / "scienceqa"), "--num-samples", "4", "--tokens", "20",
             "--output-dir", str(out), "--device", "cpu"],
            env={**_env(), "HOME": str(shared)}, capture_output=True, text=True, timeout=300)
        _assert_one_line_error(proc, str(out), "Permission denied")
        assert list(out.iterdir()) == []
    finally:
        shutil.rmtree(shared, ignore_errors=True)


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_running_pickle_is_refused_in_one_line(tiny_models, demo_scienceqa, tmp_path):
    checkpoint = tmp_path / "orig"
    shutil.copytree(tiny_models["orig"], checkpoint)
    shutil.copytree(tiny_models["clip"], tmp_path / tiny_models["clip"].name)
    marker = tmp_path / "code-ran"
    _RunsCode.marker = marker
    shard = sorted(checkpoint.glob("pytorch_model-*.bin"))[-1]
    with open(shard, "wb") as handle:
        pickle.dump({"model.mm_projector.0.weight": _RunsCode()}, handle, protocol=2)
    result = CliRunner().invoke(app, [
        "extract", "--model-path", str(checkpoint), "--base-dir", str(demo_scienceqa),
        "--num-samples", "4", "--output-dir", str(tmp_path / "out"), "--device", "cpu"],
        env={"VTKIT_DEBUG": ""})
    assert not marker.exists()
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(shard) in last and "refused" in last, last


def test_os_errors_reaching_the_funnel_are_one_line(capsys):
    def command():
        raise OSError(errno.EIO, os.strerror(errno.EIO), "results/sweep.h5")

    with pytest.raises(typer.Exit) as exit_info:
        handles_errors(command)()
    assert exit_info.value.exit_code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert "results/sweep.h5" in err and "Input/output error" in err


def test_written_files_get_the_usual_mode(tiny_models, reference):
    expected = cache.FILE_MODE
    for path in [tiny_models["hf"] / "model.safetensors", tiny_models["clip"] / "model.safetensors",
                 reference / FEATURES_FILE, reference / SWEEP_FILE,
                 reference / "answers" / "k20.jsonl"]:
        assert stat.S_IMODE(path.stat().st_mode) == expected, path
