"""`vtkit run`: all four stages in one go, with the single-script version's flags."""

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
    ImageModeOpt,
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
from vtkit.cli.sweep import KeepAttentionOpt, MaxOpt, MinOpt, StepOpt, TokensOpt, resolve_tokens
from vtkit.defaults import DEFAULT_THRESHOLD

ThresholdOpt = Annotated[float, typer.Option(
    "--threshold", help="Rank threshold relative to the largest singular value.")]


def run(
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
    image_mode: ImageModeOpt = None,
    batch_size: BatchSizeOpt = None,
    keep_attention: KeepAttentionOpt = 2,
    threshold: ThresholdOpt = DEFAULT_THRESHOLD,
    dtype: DtypeOpt = None,
    device: DeviceOpt = "auto",
    random_init: RandomInitOpt = False,
    force: ForceOpt = False,
) -> None:
    """Run extract, sweep, rank and plot in one go (the model is loaded once).

    Example (the single-script version's settings): vtkit run --model-path
    liuhaotian/llava-v1.5-7b --base-dir ScienceQA --conv-mode llava_v1 --temperature 0.2
    --question-file ScienceQA/llava_test_QCM-LEA.json
    """
    from vtkit.cli.progress import stage_reporter
    from vtkit.extract import ExtractConfig
    from vtkit.pipeline import run_pipeline
    from vtkit.plot import PlotConfig
    from vtkit.rank import RankConfig
    from vtkit.sweep import SweepConfig

    common = dict(model_path=model_path, model_base=model_base, base_dir=base_dir,
                  question_file=question_file, image_folder=image_folder, split=split,
                  num_samples=num_samples, output_dir=output_dir, dtype=dtype, device=device,
                  random_init=random_init, force=force)
    extract_config = ExtractConfig(**common, image_mode=image_mode, batch_size=batch_size,
                                   seed=seed)
    sweep_config = SweepConfig(
        **common, tokens=resolve_tokens(min_tokens, max_tokens, step, tokens), scorer=scorer,
        conv_mode=conv_mode, single_pred_prompt=single_pred_prompt, temperature=temperature,
        seed=seed, max_new_tokens=max_new_tokens, batch_size=batch_size,
        keep_attention=keep_attention)
    rank_config = RankConfig(output_dir=output_dir, threshold=threshold)
    run_pipeline(extract_config, sweep_config, rank_config, PlotConfig(output_dir=output_dir),
                 reporter=stage_reporter())
