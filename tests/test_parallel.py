"""torchrun with 2 CPU processes (gloo) writes the same files as one process."""

from __future__ import annotations

import os
import subprocess
import sys

import h5py
import numpy as np

N = 12
TOKENS = "576,100,20"


def _stages(prefix: list[str], model: str, base, out) -> None:
    common = ["--model-path", model, "--base-dir", str(base), "--num-samples", str(N),
              "--output-dir", str(out), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for stage in (["extract"], ["sweep", "--tokens", TOKENS, "--max-new-tokens", "4"]):
        subprocess.run(prefix + stage + common, check=True, env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE)


def test_two_ranks_equal_one_process(tiny_models, demo_scienceqa, tmp_path):
    model = str(tiny_models["hf"])
    single, double = tmp_path / "one", tmp_path / "two"
    _stages([sys.executable, "-m", "vtkit"], model, demo_scienceqa, single)
    _stages([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
             "--master-port", "29517", "-m", "vtkit"], model, demo_scienceqa, double)
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
