"""`vtkit run`: all four stages in one go, with the single-script version's flags."""

from __future__ import annotations

from vtkit.cli.options import (
    BaseDirOpt,
    BatchSizeOpt,
    CaptureOpt,
    CompileOpt,
    ContextualRatioOpt,
    ConvModeOpt,
    DeviceOpt,
    DtypeOpt,
    EigensolverOpt,
    ForceOpt,
    ImageFolderOpt,
    ImageModeOpt,
    ImportantRatioOpt,
    JsonOpt,
    KeepAttentionOpt,
    LayersOpt,
    MaxNewTokensOpt,
    MaxOpt,
    MinOpt,
    ModelBaseOpt,
    ModelPathOpt,
    NumSamplesOpt,
    OutputDirOpt,
    PackOpt,
    PruneLayerOpt,
    QuestionFileOpt,
    RandomInitOpt,
    ScorerOpt,
    SeedOpt,
    SeedsOpt,
    SharePrefixOpt,
    SinglePredPromptOpt,
    SplitOpt,
    StepOpt,
    TemperatureOpt,
    ThresholdOpt,
    TokenBudgetOpt,
    TokensOpt,
    resolve_tokens,
    split_captures,
)
from vtkit.cli.output import print_json, rank_json
from vtkit.defaults import (
    DEFAULT_BASE_DIR,
    DEFAULT_CAPTURE,
    DEFAULT_CONV_MODE,
    DEFAULT_DEVICE,
    DEFAULT_EIGENSOLVER,
    DEFAULT_KEEP_ATTENTION,
    DEFAULT_LAYERS,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_MAX_TOKENS,
    DEFAULT_MIN_TOKENS,
    DEFAULT_MODEL,
    DEFAULT_NUM_SAMPLES,
    DEFAULT_OUTPUT_DIR,
    DEFAULT_PRUNE_LAYER,
    DEFAULT_SCORER,
    DEFAULT_SEED,
    DEFAULT_SINGLE_PRED_PROMPT,
    DEFAULT_SPLIT,
    DEFAULT_STEP,
    DEFAULT_TEMPERATURE,
    DEFAULT_THRESHOLD,
)


def run(
    model_path: ModelPathOpt = DEFAULT_MODEL,
    model_base: ModelBaseOpt = None,
    base_dir: BaseDirOpt = DEFAULT_BASE_DIR,
    question_file: QuestionFileOpt = None,
    image_folder: ImageFolderOpt = None,
    split: SplitOpt = DEFAULT_SPLIT,
    num_samples: NumSamplesOpt = DEFAULT_NUM_SAMPLES,
    output_dir: OutputDirOpt = DEFAULT_OUTPUT_DIR,
    min_tokens: MinOpt = DEFAULT_MIN_TOKENS,
    max_tokens: MaxOpt = DEFAULT_MAX_TOKENS,
    step: StepOpt = DEFAULT_STEP,
    tokens: TokensOpt = None,
    scorer: ScorerOpt = DEFAULT_SCORER,
    important_ratio: ImportantRatioOpt = None,
    contextual_ratio: ContextualRatioOpt = None,
    prune_layer: PruneLayerOpt = DEFAULT_PRUNE_LAYER,
    conv_mode: ConvModeOpt = DEFAULT_CONV_MODE,
    single_pred_prompt: SinglePredPromptOpt = DEFAULT_SINGLE_PRED_PROMPT,
    temperature: TemperatureOpt = DEFAULT_TEMPERATURE,
    seed: SeedOpt = DEFAULT_SEED,
    seeds: SeedsOpt = None,
    max_new_tokens: MaxNewTokensOpt = DEFAULT_MAX_NEW_TOKENS,
    image_mode: ImageModeOpt = None,
    batch_size: BatchSizeOpt = None,
    token_budget: TokenBudgetOpt = None,
    keep_attention: KeepAttentionOpt = DEFAULT_KEEP_ATTENTION,
    layers: LayersOpt = DEFAULT_LAYERS,
    eigensolver: EigensolverOpt = DEFAULT_EIGENSOLVER,
    capture: CaptureOpt = DEFAULT_CAPTURE,
    compile_decoder: CompileOpt = None,
    share_prefix: SharePrefixOpt = True,
    pack: PackOpt = None,
    threshold: ThresholdOpt = DEFAULT_THRESHOLD,
    dtype: DtypeOpt = None,
    device: DeviceOpt = DEFAULT_DEVICE,
    random_init: RandomInitOpt = False,
    force: ForceOpt = False,
    json_output: JsonOpt = False,
) -> None:
    """Run extract, sweep, rank and plot in one go (the model is loaded once).

    --json prints the four stages' results as one JSON document on stdout. For the random
    scorer, --seeds 0,1,2 extracts once and runs sweep, rank and plot once per seed into
    OUTPUT_DIR/seed{N}/ (--json: one document per seed, in a list).

    Example (the single-script version's settings): vtkit run --model-path
    liuhaotian/llava-v1.5-7b --base-dir ScienceQA --conv-mode llava_v1 --temperature 0.2
    --question-file ScienceQA/llava_test_QCM-LEA.json
    """
    from vtkit.cli.progress import stage_reporter
    from vtkit.extract import ExtractConfig
    from vtkit.pipeline import run_pipeline, run_seeds
    from vtkit.plot import PlotConfig
    from vtkit.rank import RankConfig
    from vtkit.sweep import SweepConfig, parse_seeds

    common = dict(model_path=model_path, model_base=model_base, base_dir=base_dir,
                  question_file=question_file, image_folder=image_folder, split=split,
                  num_samples=num_samples, output_dir=output_dir, dtype=dtype, device=device,
                  random_init=random_init, force=force)
    extract_config = ExtractConfig(**common, image_mode=image_mode, batch_size=batch_size,
                                   seed=seed)
    sweep_config = SweepConfig(
        **common, tokens=resolve_tokens(min_tokens, max_tokens, step, tokens), scorer=scorer,
        important_ratio=important_ratio, contextual_ratio=contextual_ratio,
        prune_layer=prune_layer,
        conv_mode=conv_mode, single_pred_prompt=single_pred_prompt, temperature=temperature,
        seed=seed, max_new_tokens=max_new_tokens, batch_size=batch_size,
        token_budget=token_budget, keep_attention=keep_attention, layers=layers,
        eigensolver=eigensolver,
        captures=split_captures(capture), compile=compile_decoder, share_prefix=share_prefix,
        pack=pack)
    rank_config = RankConfig(output_dir=output_dir, threshold=threshold)
    stages = (extract_config, sweep_config, rank_config, PlotConfig(output_dir=output_dir))
    if seeds is not None:
        results = run_seeds(*stages[:2], parse_seeds(seeds), *stages[2:],
                            reporter=stage_reporter())
    else:
        results = [run_pipeline(*stages, reporter=stage_reporter())]
    if json_output and results[0].ranked is not None:   # the main process alone ranks, plots
        documents = [{"extract": r.extracted, "sweep": r.swept, "rank": rank_json(r.ranked),
                      "plot": r.plotted.to_json()} for r in results]
        print_json(documents if seeds is not None else documents[0])
