"""Options shared by several commands, defined once as typed aliases, and the k grid they give.

The commands' signatures take their defaults from :mod:`vtkit.defaults`, as the stages' config
classes do (the official LLaVA-1.5 ScienceQA protocol: conv mode ``vicuna_v1``, greedy decoding,
the single-prediction prompt on). Environment variables set the defaults of
``--model-path`` (``MODEL_PATH``), ``--base-dir`` (``SCIENCEQA_DIR``) and ``--output-dir``
(``OUTPUT_DIR``); a flag on the command line wins over both.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

import typer

from vtkit.defaults import CAPTURES, DEVICES, DTYPES, EIGENSOLVERS, IMAGE_MODES, SCORERS
from vtkit.errors import UsageError
from vtkit.prompts import CONV_TEMPLATES

# Fixed-value options parse as Literals built from the library's own tables: --help lists the
# values, a bad one is a usage error naming the flag, and the command gets the plain string.
ConvMode = Literal[tuple(CONV_TEMPLATES)]
Scorer = Literal[SCORERS]
ImageMode = Literal[IMAGE_MODES]
Dtype = Literal[DTYPES]
Eigensolver = Literal[EIGENSOLVERS]

ModelPathOpt = Annotated[str, typer.Option(
    "--model-path", envvar="MODEL_PATH",
    help="LLaVA checkpoint: a local directory or a Hugging Face repo id already in the cache "
         "(HF format or the original LLaVA format).")]
ModelBaseOpt = Annotated[str | None, typer.Option(
    "--model-base", help="Base LLM for a LoRA checkpoint (e.g. lmsys/vicuna-7b-v1.5).")]
BaseDirOpt = Annotated[Path, typer.Option(
    "--base-dir", envvar="SCIENCEQA_DIR",
    help="ScienceQA directory: problems.json, pid_splits.json, images/<split>/<pid>/image.png.")]
QuestionFileOpt = Annotated[Path | None, typer.Option(
    "--question-file",
    help="LLaVA question file (CQM-A or QCM-LEA). Default: llava_<split>_CQM-A.json in the base "
         "dir, else built from problems.json.")]
ImageFolderOpt = Annotated[Path | None, typer.Option(
    "--image-folder", help="Folder the question file's image paths are relative to. "
                           "Default: <base-dir>/images/<split>.")]
SplitOpt = Annotated[str, typer.Option("--split", help="ScienceQA split (pid_splits.json key).")]
OutputDirOpt = Annotated[Path, typer.Option(
    "--output-dir", envvar="OUTPUT_DIR", help="Where caches, results and figures go.")]
ConvModeOpt = Annotated[ConvMode, typer.Option(
    "--conv-mode",
    help="Conversation template: vicuna_v1 (official LLaVA-1.5 eval; v1 is its alias) or "
         "llava_v1.")]
TemperatureOpt = Annotated[float, typer.Option(
    "--temperature", min=0.0, help="0 = greedy (official); above 0 samples, seeded by --seed.")]
SinglePredPromptOpt = Annotated[bool, typer.Option(
    "--single-pred-prompt/--no-single-pred-prompt",
    help="Append \"Answer with the option's letter from the given choices directly.\"")]
NumSamplesOpt = Annotated[int, typer.Option(
    "--num-samples", help="Use the first N questions of the split (-1 = all).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for sampling and the random scorer.")]
SeedsOpt = Annotated[str | None, typer.Option(
    "--seeds", help="With --scorer random: comma-separated seeds, e.g. 0,1,2; one complete run "
                    "per seed in OUTPUT_DIR/seed{N}/, all sharing OUTPUT_DIR/features.h5.")]
DtypeOpt = Annotated[Dtype | None, typer.Option(
    "--dtype", help="Weights and activations (default: float16 on CUDA, float32 on CPU).")]


def _check_device(value: str | None) -> str | None:
    """--device is a choice with a family (cuda:N), so it is checked here rather than typed."""
    named = [d for d in DEVICES if d != "cuda:N"]
    if value is None or value in named or re.fullmatch(r"cuda:\d+", value):
        return value
    raise typer.BadParameter(f"{value!r} is not one of {', '.join(map(repr, DEVICES))}")


DeviceOpt = Annotated[str, typer.Option(
    "--device", metavar=f"<{'|'.join(DEVICES)}>", callback=_check_device,
    help="Where the model runs (auto: cuda if there is one, else cpu).")]
RandomInitOpt = Annotated[bool, typer.Option(
    "--random-init", help="Random weights from config.json alone (benchmarks only; recorded in "
                          "every output).")]
BatchSizeOpt = Annotated[int | None, typer.Option(
    "--batch-size", min=1, help="Items per forward pass (default: automatic).")]
ImageModeOpt = Annotated[ImageMode | None, typer.Option(
    "--image-mode", help="pad (LLaVA-1.5 code: pad to square with the CLIP mean colour) or crop "
                         "(resize + centre crop, as llava-hf and the published 66.8).")]
ScorerOpt = Annotated[Scorer, typer.Option(
    "--scorer", help="Importance score: l2 (projected feature norm), cls (CLIP [CLS] attention), "
                     "random (seeded), uniform (spread over the grid); a published method "
                     "before the language model: divprune, vispruner, visionzip; or inside it "
                     "at --prune-layer: fastv (last prompt token's attention), dart (least "
                     "duplicated to pivot tokens) (docs/scorers.md).")]
ImportantRatioOpt = Annotated[float | None, typer.Option(
    "--important-ratio",
    help="vispruner: share of k kept by [CLS] attention, the rest by diversity (default: 0.5 "
         "for k >= 128, 0.75 for k <= 64, linear between, as its README).")]
ContextualRatioOpt = Annotated[float | None, typer.Option(
    "--contextual-ratio",
    help="visionzip: share of k given to merged contextual tokens, the rest dominant ([CLS] "
         "included) (default: 10/64, as its README's 54 + 10).")]
PruneLayerOpt = Annotated[int, typer.Option(
    "--prune-layer", min=1,
    help="fastv/dart: decoder layer from which only the k kept image tokens are seen (layers "
         "before it see all; the signal is layer K-1's).")]
ForceOpt = Annotated[bool, typer.Option(
    "--force", help="Recompute even if an existing cache was made from other inputs.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
MaxNewTokensOpt = Annotated[int, typer.Option(
    "--max-new-tokens", min=1, help="Longest answer to generate (the original uses 1024).")]
ThresholdOpt = Annotated[float, typer.Option(
    "--threshold",
    help="Count singular values above this fraction of the largest (in (0, 1)); the default sits "
         "above float16/bfloat16 rounding noise (docs/rank.md).")]

# The sweep's k values and how it runs them (sweep, run, bench).
MinOpt = Annotated[int, typer.Option("--min", help="Smallest k of the grid.")]
MaxOpt = Annotated[int, typer.Option("--max", help="Largest k of the grid (swept first).")]
StepOpt = Annotated[int, typer.Option("--step", help="Grid step: max, then multiples of step.")]
TokensOpt = Annotated[str | None, typer.Option(
    "--tokens",
    help="Explicit comma-separated k values, e.g. 576,192,128,64,0 (overrides the grid; 0 "
         "keeps no visual token, the floor).")]
KeepAttentionOpt = Annotated[int, typer.Option(
    "--keep-attention", min=0,
    help="Also store the raw k x d captured rows (every --capture and --layers) of the first N "
         "image questions.")]
LayersOpt = Annotated[str, typer.Option(
    "--layers",
    help="Decoder layers whose visual rows are analysed, all in the same prefill: first,last "
         "(the seed's two), all, or comma-separated layer indices (negative from the end; "
         "first/last may be mixed in), e.g. 0,2,-1.")]
CaptureOpt = Annotated[str, typer.Option(
    "--capture",
    help=f"Tensor(s) whose visual rows are analysed, comma-separated, of: {', '.join(CAPTURES)} "
         f"(attn_out: self-attention output after o_proj; attn_heads: o_proj's input, the "
         f"concatenated heads; hidden: the decoder layer's output).")]
TokenBudgetOpt = Annotated[int | None, typer.Option(
    "--token-budget", min=1, help="Prefill tokens per forward (default: from free GPU memory).")]
EigensolverOpt = Annotated[Eigensolver, typer.Option(
    "--eigensolver",
    help=f"Who computes the float64 eigenvalues behind the stored spectra, of: "
         f"{', '.join(EIGENSOLVERS)} (auto: Triton kernels on the GPU in CUDA runs, LAPACK on "
         f"CPU threads otherwise; the values agree to 1e-8 of the largest).")]
ShapeOpt = Annotated[str, typer.Option("--shape", help="Model shape: tiny | llava-1.5-7b.")]
SharePrefixOpt = Annotated[bool, typer.Option(
    "--share-prefix/--no-share-prefix",
    help="Run the prompt tokens every row of a batch begins with (the system prompt) once per "
         "batch, every row attending to their keys and values, instead of once per row.")]
PackOpt = Annotated[bool | None, typer.Option(
    "--pack/--no-pack",
    help="Concatenate a batch's rows into one sequence (flash attention's variable-length "
         "kernel, no padding) instead of left-padding them under a mask. Default: packed on "
         "CUDA in fp16/bf16, padded elsewhere.", show_default=False)]
CompileOpt = Annotated[bool | None, typer.Option(
    "--compile/--no-compile",
    help="torch.compile the decoder's elementwise work (norms, rotary, MLP) for prefill "
         "throughput, before the first batch. Default: on for packed rows on CUDA.",
    show_default=False)]


def split_captures(text: str) -> list[str]:
    """The --capture names as given (comma-separated); the sweep checks and orders them."""
    return [c.strip() for c in text.split(",") if c.strip()]


def resolve_tokens(min_tokens: int, max_tokens: int, step: int, tokens: str | None) -> list[int]:
    """The k values to sweep, from --tokens or from --min/--max/--step."""
    if tokens:
        try:
            values = [int(t) for t in tokens.split(",") if t.strip()]
        except ValueError:
            raise UsageError(
                f"--tokens: expected comma-separated integers, got {tokens!r}") from None
        return values
    from vtkit.pruning import token_grid

    try:
        return token_grid(min_tokens, max_tokens, step)
    except ValueError as error:
        raise UsageError(f"--min/--max/--step: {error}") from None
