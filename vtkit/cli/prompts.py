"""`vtkit prompts`: write the exact prompt text and token ids the model will see."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vtkit.cli.options import (
    BaseDirOpt,
    ConvModeOpt,
    ModelPathOpt,
    NumSamplesOpt,
    QuestionFileOpt,
    SinglePredPromptOpt,
    SplitOpt,
)
from vtkit.cli.output import console
from vtkit.defaults import (
    DEFAULT_BASE_DIR,
    DEFAULT_CONV_MODE,
    DEFAULT_MODEL,
    DEFAULT_NUM_SAMPLES,
    DEFAULT_SINGLE_PRED_PROMPT,
    DEFAULT_SPLIT,
)

TokenizerOpt = Annotated[str | None, typer.Option(
    "--tokenizer", help="Tokenizer directory or cached repo id. Default: --model-path.")]
OutputOpt = Annotated[Path, typer.Option(
    "--output", "-o", help="JSON lines file to write: question_id, prompt, input_ids.")]


def prompts(
    output: OutputOpt,
    question_file: QuestionFileOpt = None,
    tokenizer: TokenizerOpt = None,
    model_path: ModelPathOpt = DEFAULT_MODEL,
    base_dir: BaseDirOpt = DEFAULT_BASE_DIR,
    split: SplitOpt = DEFAULT_SPLIT,
    conv_mode: ConvModeOpt = DEFAULT_CONV_MODE,
    single_pred_prompt: SinglePredPromptOpt = DEFAULT_SINGLE_PRED_PROMPT,
    num_samples: NumSamplesOpt = DEFAULT_NUM_SAMPLES,
) -> None:
    """Write, per question, the full prompt and its token ids (the image as -200), so you can
    check what the model sees.

    One JSON object per line: question_id, prompt (system prompt included), input_ids.
    Without --question-file the questions come from --base-dir as in the other stages.

    Example: vtkit prompts --question-file scienceqa/llava_test_CQM-A.json --output p.jsonl
    """
    from vtkit.prompts import PromptsConfig, write_prompts

    config = PromptsConfig(
        tokenizer=tokenizer or model_path, output=output, question_file=question_file,
        base_dir=base_dir, split=split, conv_mode=conv_mode,
        single_pred_prompt=single_pred_prompt, num_samples=num_samples,
    )
    records = write_prompts(config)
    console.print(f"wrote {len(records)} prompts to {output}", highlight=False)
