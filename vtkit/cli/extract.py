"""`vtkit extract`: cache the CLIP features and importance scores of every image question."""

from __future__ import annotations

from vtkit.cli.options import (
    BaseDirOpt,
    BatchSizeOpt,
    DeviceOpt,
    DtypeOpt,
    ForceOpt,
    ImageFolderOpt,
    ImageModeOpt,
    JsonOpt,
    ModelBaseOpt,
    ModelPathOpt,
    NumSamplesOpt,
    OutputDirOpt,
    QuestionFileOpt,
    RandomInitOpt,
    SeedOpt,
    SplitOpt,
)
from vtkit.cli.output import print_stage_json
from vtkit.defaults import (
    DEFAULT_BASE_DIR,
    DEFAULT_DEVICE,
    DEFAULT_MODEL,
    DEFAULT_NUM_SAMPLES,
    DEFAULT_OUTPUT_DIR,
    DEFAULT_SEED,
    DEFAULT_SPLIT,
)


def extract(
    model_path: ModelPathOpt = DEFAULT_MODEL,
    model_base: ModelBaseOpt = None,
    base_dir: BaseDirOpt = DEFAULT_BASE_DIR,
    question_file: QuestionFileOpt = None,
    image_folder: ImageFolderOpt = None,
    split: SplitOpt = DEFAULT_SPLIT,
    num_samples: NumSamplesOpt = DEFAULT_NUM_SAMPLES,
    output_dir: OutputDirOpt = DEFAULT_OUTPUT_DIR,
    image_mode: ImageModeOpt = None,
    batch_size: BatchSizeOpt = None,
    dtype: DtypeOpt = None,
    device: DeviceOpt = DEFAULT_DEVICE,
    random_init: RandomInitOpt = False,
    seed: SeedOpt = DEFAULT_SEED,
    force: ForceOpt = False,
    json_output: JsonOpt = False,
) -> None:
    """Run the vision tower once per image question and cache features + importance scores.

    Writes OUTPUT_DIR/features.h5 (layout: docs/cache.md). Re-running with the same inputs does
    nothing; a killed run resumes; other inputs are refused unless --force. --json prints the
    table's numbers as one JSON document on stdout.

    Example: vtkit extract --model-path demo/llava-tiny-hf --base-dir demo/scienceqa
    """
    from vtkit.cli.progress import stage_reporter
    from vtkit.extract import ExtractConfig
    from vtkit.extract import extract as run_extract

    config = ExtractConfig(
        model_path=model_path, model_base=model_base, base_dir=base_dir,
        question_file=question_file, image_folder=image_folder, split=split,
        num_samples=num_samples, output_dir=output_dir, image_mode=image_mode,
        batch_size=batch_size, dtype=dtype, device=device, random_init=random_init, seed=seed,
        force=force,
    )
    reporter = stage_reporter()
    result = run_extract(config, reporter)
    reporter.table("vtkit extract", ["cache", "images", "computed now", "MB per image", "seconds"],
                   [[str(result.path), result.num_images, result.num_computed,
                     result.bytes_per_image / 1e6, result.seconds]])
    if json_output:
        print_stage_json(result)
