"""torchrun with 2 CPU processes (gloo) writes the same files as one process."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import h5py
import numpy as np

N = 12
TOKENS = "576,100,20"


def _stages(prefix: list[str], model: str, base, out) -> str:
    """Extract, then sweep; the sweep's printed output."""
    common = ["--model-path", model, "--base-dir", str(base), "--num-samples", str(N),
              "--output-dir", str(out), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "300"}
    for stage in (["extract"], ["sweep", "--tokens", TOKENS, "--max-new-tokens", "4"]):
        done = subprocess.run(prefix + stage + common, check=True, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return done.stdout


def _tokens(line: str) -> int:
    return int(re.search(r"batches, ([0-9,]+) tokens", line).group(1).replace(",", ""))


def test_two_ranks_equal_one_process(tiny_models, demo_scienceqa, tmp_path):
    model = str(tiny_models["hf"])
    single, double = tmp_path / "one", tmp_path / "two"
    alone = _stages([sys.executable, "-m", "vtkit"], model, demo_scienceqa, single)
    shared = _stages([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                      "--master-port", "29517", "-m", "vtkit"], model, demo_scienceqa, double)
    # Rank 0 reports each rank's batches; their tokens are the single process's, split (each
    # batch computes the shared system prompt once, so the sums differ by a few prompts).
    ranks = re.findall(r"^rank (\d): batches .*$", shared, re.MULTILINE)
    assert ranks == ["0", "1"], shared
    lines = [line for line in shared.splitlines() if line.startswith("rank ")]
    one = [line for line in alone.splitlines() if line.startswith("batches ")]
    assert "waiting for the other ranks" in shared and "rank " not in alone
    assert all(_tokens(line) > 0 for line in lines)
    assert abs(sum(map(_tokens, lines)) - _tokens(one[0])) < 0.02 * _tokens(one[0])
    assert max(map(_tokens, lines)) < 0.6 * _tokens(one[0])
    assert not (double / "features.parts").exists() and not (double / "sweep.parts").exists()
    with h5py.File(single / "features.h5") as a, h5py.File(double / "features.h5") as b:
        assert a.attrs["fingerprint"] == b.attrs["fingerprint"]
        assert a["question_ids"][:].tolist() == b["question_ids"][:].tolist()
        np.testing.assert_allclose(a["features"][:], b["features"][:], rtol=1e-5, atol=1e-6)
    with h5py.File(single / "sweep.h5") as a, h5py.File(double / "sweep.h5") as b:
        assert a.attrs["fingerprint"] == b.attrs["fingerprint"]
        assert a["answers"][:].tolist() == b["answers"][:].tolist()
        assert np.array_equal(a["correct"][:], b["correct"][:])
        last = int(a.attrs["layers"][-1])
        for name in ("spectra/attn_out/layer0/k20", f"spectra/attn_out/layer{last}/k576"):
            np.testing.assert_allclose(a[name][:], b[name][:], rtol=1e-4, atol=1e-5)
        # Raw matrices are stored in float16: other batches may round the last bit otherwise.
        np.testing.assert_allclose(a["attention/attn_out/layer0/k100"][:],
                                   b["attention/attn_out/layer0/k100"][:], rtol=2e-3, atol=2e-3)
    assert (single / "answers" / "k100.jsonl").read_text() == \
        (double / "answers" / "k100.jsonl").read_text()


def test_a_rank_leaves_its_process_group_at_exit(monkeypatch):
    """A process that joined torchrun's group leaves it at exit (NCCL warns of leaked
    resources otherwise, after every multi-GPU run)."""
    import atexit

    import vtkit.parallel as parallel

    joined, left, at_exit = [], [], []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(parallel.dist, "is_initialized", lambda: bool(joined) and not left)
    monkeypatch.setattr(parallel.dist, "init_process_group", joined.append)
    monkeypatch.setattr(parallel.dist, "destroy_process_group", lambda: left.append(True))
    monkeypatch.setattr(atexit, "register", at_exit.append)
    workers = parallel.init_workers("cpu")
    assert (workers.rank, workers.world_size, joined) == (1, 2, ["gloo"])
    assert left == [] and len(at_exit) == 1
    at_exit[0]()
    assert left == [True]
    at_exit[0]()                                  # once only, whoever left first
    assert left == [True]
