"""The device eigensolver (vtkit/eigen.py, vtkit/eigen_kernels.py) against LAPACK.

On a CUDA machine the Triton kernels run compiled; elsewhere they run in Triton's interpreter
(TRITON_INTERPRET=1, set before the kernels are first imported), so CI checks the very code a
GPU run executes. Reference: torch.linalg.eigvalsh / svdvals in float64 on the CPU.
"""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("triton")

from vtkit import cache, eigen  # noqa: E402
from vtkit.cli.main import app  # noqa: E402
from vtkit.demo import DEMO_MODEL_DIR  # noqa: E402
from vtkit.eigen import gram_spectra, symmetric_eigenvalues, triton_available  # noqa: E402
from vtkit.errors import UsageError  # noqa: E402
from vtkit.sweep import resolve_eigensolver  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_the_kernels_run_here():
    """Off CUDA, in Triton's interpreter (tests/conftest.py sets it before Triton's import)."""
    assert triton_available(DEVICE)


def end_to_end(matrices: list[torch.Tensor]) -> torch.Tensor:
    flat = torch.cat([m.reshape(-1) for m in matrices]).to(DEVICE)
    sizes = torch.tensor([m.shape[0] for m in matrices], dtype=torch.int32, device=DEVICE)
    offsets = torch.tensor(np.concatenate([[0], np.cumsum([m.numel() for m in matrices])[:-1]]),
                           dtype=torch.int64, device=DEVICE)
    return symmetric_eigenvalues(flat, sizes, offsets, int(sizes.max())).cpu()


@pytest.mark.parametrize("tile", [
    None,
    {"ROWS": 4, "COLS": 8, "PANEL": 4, "CHUNK": 8, "WIDE": 4, "num_warps": 1},
    {"ROWS": 8, "COLS": 4, "PANEL": 2, "CHUNK": 4, "WIDE": 8, "num_warps": 1}])
def test_eigenvalues_of_mixed_sizes_match_lapack(tile, monkeypatch):
    """The shipped tile, and small ones: a matrix then spans several row and column tiles,
    panels and vector chunks (in the interpreter: a GPU's matrix products take no side under
    16). 37 is no multiple of any of them."""
    if tile is not None and DEVICE.type == "cuda":
        pytest.skip("tiles under 16 are for the interpreter")
    if tile is not None:
        monkeypatch.setattr(eigen, "TRIDIAGONAL_TILE", tile)
    g = torch.Generator().manual_seed(0)
    matrices = []
    for n in (1, 2, 3, 9, 24, 37):
        # Graded rows: eigenvalues over 18 orders of magnitude, as a deep layer's Gram has.
        x = torch.randn(n, 40, generator=g, dtype=torch.float64)
        x *= torch.logspace(3, -6, n, dtype=torch.float64)[:, None]
        matrices.append(x @ x.T)
    low_rank = torch.randn(12, 3, generator=g, dtype=torch.float64)
    matrices.append(low_rank @ low_rank.T)                       # 9 zero eigenvalues
    matrices.append(torch.diag(torch.tensor([3.0, 1.0, 2.0, 2.0, 0.0], dtype=torch.float64)))
    sym = torch.randn(7, 7, generator=g, dtype=torch.float64)
    matrices.append(sym + sym.T)                                  # indefinite
    values = end_to_end(matrices)
    for i, m in enumerate(matrices):
        n = m.shape[0]
        expected = torch.linalg.eigvalsh(m)
        scale = expected.abs().max()
        torch.testing.assert_close(values[i, :n], expected, rtol=0, atol=1e-14 * scale,
                                   msg=f"matrix {i} ({n} x {n})")
        assert (values[i, n:] == 0).all()


def test_gram_spectra_leave_the_host_ahead_of_the_gpu():
    """Nothing in the device path waits for the GPU: one host value copied from pageable
    memory made the host wait for a whole reduction per chunk, and the GPU then idled behind
    every later launch (docs/performance.md, "Where the host waited")."""
    if DEVICE.type != "cuda":
        pytest.skip("torch's sync debug mode watches CUDA streams")
    assert eigen.kernel_problem(DEVICE) is None          # compiles the kernels first
    blocks = [torch.randn(3, 40, 64, dtype=torch.bfloat16, device=DEVICE),
              torch.randn(2, 17, 64, dtype=torch.bfloat16, device=DEVICE)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        spectra = gram_spectra(blocks)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for block, got in zip(blocks, spectra, strict=True):
        expected = torch.linalg.svdvals(block.cpu().double())
        torch.testing.assert_close(got.cpu().double(), expected, rtol=1e-6,
                                   atol=1e-7 * float(expected.max()))


def test_zero_matrix_has_zero_eigenvalues():
    values = end_to_end([torch.zeros(4, 4, dtype=torch.float64)])
    assert values.abs().max() < 1e-300


@pytest.mark.parametrize("input_bytes", [eigen.GRAM_INPUT_BYTES, 1])
def test_gram_spectra_match_svdvals_across_chunks(input_bytes, monkeypatch):
    """Whole blocks, and (1 byte) every Gram matrix product on one matrix."""
    monkeypatch.setattr(eigen, "GRAM_INPUT_BYTES", input_bytes)
    g = torch.Generator().manual_seed(1)
    blocks = [torch.randn(3, 7, 5, generator=g),          # k > d: the d x d Gram
              torch.randn(2, 4, 9, generator=g),          # k < d: the k x k Gram
              torch.randn(1, 1, 6, generator=g),
              torch.randn(2, 10, 16, generator=g) * torch.logspace(0, -3, 10)[None, :, None],
              torch.randn(0, 6, 8, generator=g)]          # no rows at this k
    blocks = [b.to(torch.bfloat16).to(DEVICE) for b in blocks]
    # A chunk of at most 1,000 bytes: every block but the smallest gets its own launches.
    for chunk_bytes in (1 << 30, 1000):
        spectra = gram_spectra(blocks, chunk_bytes=chunk_bytes)
        for block, got in zip(blocks, spectra, strict=True):
            expected = torch.linalg.svdvals(block.cpu().double())
            assert got.dtype == torch.float32 and got.shape == expected.shape
            if block.shape[0]:
                torch.testing.assert_close(got.cpu().double(), expected, rtol=1e-6,
                                           atol=1e-7 * float(expected.max()))


def test_auto_picks_lapack_on_the_cpu_and_triton_is_refused_there(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_eigensolver("auto", cpu, 64) == "lapack"      # even in the interpreter
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert resolve_eigensolver("auto", cpu, 64) == "lapack"
    assert resolve_eigensolver("lapack", cpu, 64) == "lapack"
    with pytest.raises(UsageError, match="--eigensolver triton"):
        resolve_eigensolver("triton", cpu, 2)


def test_kernels_that_do_not_run_are_refused_or_left_for_lapack(monkeypatch):
    assert eigen.kernel_problem(DEVICE) is None                  # they run here
    monkeypatch.setattr("vtkit.eigen.kernel_problem", lambda device: "ptxas not found")
    monkeypatch.setattr("vtkit.eigen.triton_available", lambda device: True)
    cuda = torch.device("cuda")
    assert resolve_eigensolver("auto", cuda, 32) == "lapack"
    with pytest.raises(UsageError, match="do not run on cuda: ptxas not found"):
        resolve_eigensolver("triton", cuda, 32)
    warnings = []
    reporter = type("R", (), {"warn": lambda self, message: warnings.append(message)})()
    assert resolve_eigensolver("auto", cuda, 32, reporter) == "lapack"
    assert len(warnings) == 1 and "ptxas not found" in warnings[0]


def test_auto_takes_the_kernels_on_cuda_beyond_two_slots():
    cuda = torch.device("cuda")
    assert resolve_eigensolver("auto", cuda, 2) == "lapack"
    assert resolve_eigensolver("lapack", cuda, 64) == "lapack"
    if triton_available(cuda) and eigen.kernel_problem(cuda) is None:   # a GPU with Triton
        assert resolve_eigensolver("auto", cuda, 3) == "triton"
        assert resolve_eigensolver("triton", cuda, 2) == "triton"


def test_sweep_with_the_triton_solver_stores_lapacks_spectra(demo_scienceqa, tmp_path):
    """The same sweep, spectra by the kernels and by LAPACK: same answers, same values, for
    every slot of two captures (the device path stacks the slots of each k into one block)."""
    if DEVICE.type != "cpu":
        pytest.skip("the CPU sweep is what runs the interpreted kernels")
    common = ["--model-path", DEMO_MODEL_DIR, "--base-dir", demo_scienceqa,
              "--num-samples", 4, "--device", "cpu", "--tokens", "40,8", "--max-new-tokens", 2]
    runs = {}
    for solver in ("lapack", "triton"):
        out = tmp_path / solver
        if solver == "lapack":
            args = ["extract", *common[:-4], "--output-dir", out]
        else:
            out.mkdir()
            shutil.copy(tmp_path / "lapack" / cache.FEATURES_FILE, out / cache.FEATURES_FILE)
            args = None
        if args:
            result = CliRunner().invoke(app, [str(a) for a in args])
            assert result.exit_code == 0, result.output
        result = CliRunner().invoke(app, [str(a) for a in [
            "sweep", *common, "--output-dir", out, "--eigensolver", solver,
            "--capture", "attn_out,hidden"]])
        assert result.exit_code == 0, result.output
        runs[solver] = out / cache.SWEEP_FILE
    with h5py.File(runs["lapack"], "r") as a, h5py.File(runs["triton"], "r") as b:
        assert a.attrs["eigensolver"] == "lapack" and b.attrs["eigensolver"] == "triton"
        assert a["answers"].asstr()[:].tolist() == b["answers"].asstr()[:].tolist()
        names = []
        a["spectra"].visit(lambda name: names.append(name)
                           if isinstance(a["spectra"][name], h5py.Dataset) else None)
        assert len(names) == 8                                 # 2 captures x 2 layers x 2 k
        for name in names:
            x, y = a["spectra"][name][:], b["spectra"][name][:]
            assert x.shape == y.shape and x.shape[0] > 0
            np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6 * float(x.max()),
                                       err_msg=name)


def test_chunks_take_the_largest_matrices_first_within_the_cap(monkeypatch):
    chunks = []

    def record(blocks, chunk, out):
        chunks.append(list(chunk))
        for i in chunk:
            out[i] = i

    monkeypatch.setattr(eigen, "_spectra_chunk", record)
    blocks = [torch.zeros(4, k, 64) for k in (8, 40, 20, 40, 8)]
    # Room for exactly the two 40 x 40 blocks with their working vectors.
    cap = 8 * (2 * 4 * 40 ** 2 + 8 * eigen._working_vectors(40) * 40)
    assert eigen.gram_spectra(blocks, chunk_bytes=cap) == [0, 1, 2, 3, 4]
    assert chunks[0] == [1, 3]
    assert sorted(i for chunk in chunks for i in chunk) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="up to"):
        eigen.gram_spectra([torch.zeros(1, eigen.MAX_SIZE + 1, eigen.MAX_SIZE + 1)])


@pytest.mark.parametrize("queue", ["_device_spectra", "_grams_to_host"])
def test_spectra_on_a_stream_of_their_own(monkeypatch, queue):
    """The sweep's spectra (the eigenvalue kernels', or LAPACK's Gram matrices) run beside the
    sweep's next work: the same values as on the sweep's stream, even when the captured rows
    are dropped and their memory is claimed at once by the sweep's stream (their use is
    recorded on the spectra's stream)."""
    if DEVICE.type != "cuda":
        pytest.skip("CUDA streams")
    from vtkit import sweep as sweep_module

    if queue == "_device_spectra":
        assert eigen.kernel_problem(DEVICE) is None
    g = torch.Generator(device=DEVICE).manual_seed(0)
    ks = [7, 12, 7, 30]

    def rows():
        return {("attn_out", layer): torch.randn(4, 30, 64, generator=g, device=DEVICE)
                .to(torch.bfloat16) for layer in (0, 3)}

    pinned = sweep_module._PinnedBuffers(limit=4)
    results = {}
    for on in (False, True):
        g.manual_seed(0)
        captured = rows()
        expected = {(*slot, k): torch.linalg.svdvals(
            block[members, :k].cpu().double()).numpy()
            for slot, block in captured.items()
            for k, members in sweep_module._k_groups(ks).items()}
        monkeypatch.setattr(sweep_module, "SPECTRA_STREAM", on)
        spectra = getattr(sweep_module, queue)(captured, ks, pinned)
        captured.clear()
        claimed = [torch.full((4, 30, 64), float("nan"), dtype=torch.bfloat16, device=DEVICE)
                   for _ in range(4)]
        results[on] = {key: v.copy() for key, v in spectra.values().items()}
        spectra.release()
        del claimed
        assert results[on].keys() == expected.keys()
        for key, got in results[on].items():
            np.testing.assert_allclose(got, expected[key], rtol=1e-5,
                                       atol=1e-6 * float(expected[key].max()), err_msg=str(key))
    for key, got in results[True].items():
        np.testing.assert_array_equal(got, results[False][key])
