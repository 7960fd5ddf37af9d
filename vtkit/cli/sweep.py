"""`vtkit sweep`: the pruned LLaVA passes over the token grid."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vtkit.cli.options import (
    DEFAULT_MODEL,
    BaseDirOpt,
    BatchSizeOpt,
    ConvModeOpt,
    DeviceOpt,
    DtypeOpt,
    ForceOpt,
    ImageFolderOpt,
    MaxNewTokensOpt,
    ModelBaseOpt,
    ModelPathOpt,
    NumSamplesOpt,
    OutputDirOpt,
    QuestionFileOpt,
    RandomInitOpt,
    ScorerOpt,
    SeedOpt,
    SinglePredPromptOpt,
    SplitOpt,
    TemperatureOpt,
)
from vtkit.errors import UsageError

MinOpt = Annotated[int, typer.Option("--min", help="Smallest k of the grid.")]
MaxOpt = Annotated[int, typer.Option("--max", help="Largest k of the grid (swept first).")]
StepOpt = Annotated[int, typer.Option("--step", help="Grid step: max, then multiples of step.")]
TokensOpt = Annotated[str | None, typer.Option(
    "--tokens",
    help="Explicit comma-separated k values, e.g. 576,192,128,64 (overrides the grid).")]
KeepAttentionOpt = Annotated[int, typer.Option(
    "--keep-attention", min=0,
    help="Also store the raw k x d attention outputs of the first N image questions.")]
CompileOpt = Annotated[bool, typer.Option(
    "--compile", help="torch.compile the decoder's MLP and norms for prefill throughput.")]
TokenBudgetOpt = Annotated[int | None, typer.Option(
    "--token-budget", min=1, help="Prefill tokens per forward (default: from free GPU memory).")]


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


def sweep(
    model_path: ModelPathOpt = DEFAULT_MODEL,
    model_base: ModelBaseOpt = None,
    base_dir: BaseDirOpt = Path("scienceqa"),
    question_file: QuestionFileOpt = None,
    image_folder: ImageFolderOpt = None,
    split: SplitOpt = "test",
    num_samples: NumSamplesOpt = -1,
    output_dir: OutputDirOpt = Path("pruning_results"),
    min_tokens: MinOpt = 20,
    max_tokens: MaxOpt = 576,
    step: StepOpt = 10,
    tokens: TokensOpt = None,
    scorer: ScorerOpt = "l2",
    conv_mode: ConvModeOpt = "vicuna_v1",
    single_pred_prompt: SinglePredPromptOpt = True,
    temperature: TemperatureOpt = 0.0,
    seed: SeedOpt = 0,
    max_new_tokens: MaxNewTokensOpt = 1024,
    batch_size: BatchSizeOpt = None,
    token_budget: TokenBudgetOpt = None,
    keep_attention: KeepAttentionOpt = 2,
    compile_decoder: CompileOpt = False,
    dtype: DtypeOpt = None,
    device: DeviceOpt = "auto",
    random_init: RandomInitOpt = False,
    force: ForceOpt = False,
) -> None:
    """Keep the top-k visual tokens for every k of the grid and run LLaVA on ScienceQA.

    Reads OUTPUT_DIR/features.h5 from `vtkit extract`; writes OUTPUT_DIR/sweep.h5 and
    OUTPUT_DIR/answers/k{K}.jsonl (LLaVA's answer format). A killed run resumes from its last
    finished batch.

    Example: vtkit sweep --model-path demo/llava-tiny-hf --base-dir demo/scienceqa
    --min 20 --max 576 --step 10
    """
    from vtkit.cli.progress import stage_reporter
    from vtkit.sweep import SweepConfig
    from vtkit.sweep import sweep as run_sweep

    config = SweepConfig(
        model_path=model_path, model_base=model_base, base_dir=base_dir,
        question_file=question_file, image_folder=image_folder, split=split,
        num_samples=num_samples, output_dir=output_dir,
        tokens=resolve_tokens(min_tokens, max_tokens, step, tokens), scorer=scorer,
        conv_mode=conv_mode, single_pred_prompt=single_pred_prompt, temperature=temperature,
        seed=seed, max_new_tokens=max_new_tokens, batch_size=batch_size,
        token_budget=token_budget, keep_attention=keep_attention, compile=compile_decoder,
        dtype=dtype, device=device,
        random_init=random_init, force=force,
    )
    run_sweep(config, stage_reporter())
