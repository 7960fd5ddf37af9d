"""Fixed values and defaults of vtkit's settings, in a module that imports nothing but pathlib.

The stages check their settings against these tables, and the CLI lists them in ``--help`` and
rejects other values while parsing, without loading torch. The config dataclasses of the stages
and the CLI's signatures both take their defaults from here, so the two cannot drift. The
conversation templates, which carry their text, live in :mod:`vtkit.prompts` (itself light).
"""

from pathlib import Path

#: Every `vtkit sweep --scorer` choice (docs/scorers.md).
SCORERS = ("l2", "cls", "random", "uniform", "divprune", "vispruner", "visionzip", "fastv",
           "dart")
#: The scorers whose selection is a prefix of one ranking: `vtkit extract` stores their scores
#: (``scores/NAME``), and budget k keeps the top k in raster order.
RANKING_SCORERS = ("l2", "cls", "random", "uniform", "divprune")
#: Pre-LLM methods whose selection is computed per k from the cached CLIP signals.
PER_K_SCORERS = ("vispruner", "visionzip")
#: The scorers that prune inside the language model, at decoder layer --prune-layer
#: (:mod:`vtkit.inllm`); extract stores no scores for them.
IN_LLM_SCORERS = ("fastv", "dart")
#: The --image-mode values (see :mod:`vtkit.images`).
IMAGE_MODES = ("pad", "crop")
#: The --dtype names (the library also takes torch's aliases, e.g. fp16).
DTYPES = ("float16", "bfloat16", "float32")
#: The --device values; ``cuda:N`` names the GPU of index N.
DEVICES = ("auto", "cpu", "cuda", "cuda:N")

# Defaults of the official LLaVA-1.5 ScienceQA run (docs/protocol.md sections 1, 2 and 5).
#: The checkpoint evaluated when --model-path and MODEL_PATH are not given.
DEFAULT_MODEL = "liuhaotian/llava-v1.5-7b"
#: The ScienceQA folder when --base-dir and SCIENCEQA_DIR are not given (relative to the cwd).
DEFAULT_BASE_DIR = Path("scienceqa")
#: Where caches, results and figures go when --output-dir and OUTPUT_DIR are not given.
DEFAULT_OUTPUT_DIR = Path("pruning_results")
#: Where `vtkit compare` writes its figure and table when --output-dir is not given.
DEFAULT_COMPARE_DIR = Path("pruning_comparison")
#: The ScienceQA split (a key of pid_splits.json); the published numbers are on test.
DEFAULT_SPLIT = "test"
#: Questions of the split to use; -1 takes them all.
DEFAULT_NUM_SAMPLES = -1
#: Seed of sampling (temperature above 0) and of the random scorer.
DEFAULT_SEED = 0
#: Where the model runs: cuda when there is one, else cpu.
DEFAULT_DEVICE = "auto"
#: The importance score that ranks visual tokens: the L2 norm of the projected feature.
DEFAULT_SCORER = "l2"
#: The decoder layer before which fastv and dart prune (both official LLaVA-1.5 scripts use 2).
DEFAULT_PRUNE_LAYER = 2
#: The conversation template of the official LLaVA-1.5 ScienceQA evaluation.
DEFAULT_CONV_MODE = "vicuna_v1"
#: The official evaluation appends the single-prediction instruction to every question.
DEFAULT_SINGLE_PRED_PROMPT = True
#: 0 decodes greedily, as the official evaluation does.
DEFAULT_TEMPERATURE = 0.0
#: The longest answer generated, as in LLaVA's model_vqa_science.py.
DEFAULT_MAX_NEW_TOKENS = 1024
#: Image questions whose raw k x d captured rows the sweep keeps, for rank's float64 check.
DEFAULT_KEEP_ATTENTION = 2
#: The k grid of a full sweep: DEFAULT_MAX_TOKENS (all 576 patches), then every multiple of
#: DEFAULT_STEP below it, down to DEFAULT_MIN_TOKENS (57 values).
DEFAULT_MIN_TOKENS = 20
DEFAULT_MAX_TOKENS = 576
DEFAULT_STEP = 10
#: Relative cut-off for the numerical rank: above float16/bfloat16 rounding noise (docs/rank.md).
DEFAULT_THRESHOLD = 1e-3
#: The tensors whose visual rows the sweep can analyse (--capture): the self-attention output
#: after o_proj (the seed's "attention output"), o_proj's input (the concatenated heads), and
#: the decoder layer's output (residual stream included).
CAPTURES = ("attn_out", "attn_heads", "hidden")
CAPTURE_DESCRIPTIONS = {
    "attn_out": "self-attention output (after o_proj, before the residual add)",
    "attn_heads": "concatenated attention heads (o_proj input)",
    "hidden": "decoder layer output (residual stream)",
}
DEFAULT_CAPTURE = "attn_out"
#: --layers: first,last (the seed's two layers), all, or decoder layer indices (negative from
#: the end), comma-separated.
DEFAULT_LAYERS = "first,last"
#: --eigensolver: who computes the spectra's float64 eigenvalues. auto: the Triton kernels on a
#: CUDA device (vtkit/eigen.py), LAPACK on CPU threads elsewhere.
EIGENSOLVERS = ("auto", "triton", "lapack")
DEFAULT_EIGENSOLVER = "auto"
#: --threshold of vtkit rank may list several; the first is the headline one.

# Defaults of `vtkit bench`.
#: The model shape benchmarked: tiny runs anywhere in seconds.
DEFAULT_BENCH_SHAPE = "tiny"
#: Synthetic image questions in the measured sweep.
DEFAULT_BENCH_QUESTIONS = 32
#: Random weights never stop at EOS: 2 tokens is what LLaVA-1.5 emits on ScienceQA (letter, EOS).
DEFAULT_BENCH_MAX_NEW_TOKENS = 2
#: Questions timed in the seed-style loop (batch 1, vision per k): the median of 20 is stable.
DEFAULT_BENCH_SEED_QUESTIONS = 20
#: Sweep batches --profile runs torch.profiler over (after one warm-up batch).
DEFAULT_BENCH_PROFILE_BATCHES = 2
#: Where the bench writes its model, questions, caches and bench.json.
DEFAULT_BENCH_DIR = Path("bench_results")

# Defaults of `vtkit cost`.
#: The k values of the cost table: the unpruned 576 and the budgets pruning papers quote.
DEFAULT_COST_TOKENS = (576, 448, 320, 192, 128, 64, 32)
#: Timed calls per measure (after the warm-up ones): the median of at least 20 is quoted.
DEFAULT_COST_REPEATS = 20
#: Untimed calls before each measure (kernel autotuning, allocator growth).
DEFAULT_COST_WARMUP = 3
#: Timed batches of the throughput measure (each is a whole batch at the automatic size).
DEFAULT_COST_THROUGHPUT_REPEATS = 5
#: Where the cost table writes cost.json, its figure, and the shape's model configs.
DEFAULT_COST_DIR = Path("cost_results")
