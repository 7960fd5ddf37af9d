"""`vtkit sweep`: the pruned LLaVA passes over the token grid."""

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
    TokenBudgetOpt,
    TokensOpt,
    resolve_tokens,
    split_captures,
)
from vtkit.cli.output import print_stage_json
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
)


def sweep(
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
    batch_size: BatchSizeOpt = None,
    token_budget: TokenBudgetOpt = None,
    keep_attention: KeepAttentionOpt = DEFAULT_KEEP_ATTENTION,
    layers: LayersOpt = DEFAULT_LAYERS,
    eigensolver: EigensolverOpt = DEFAULT_EIGENSOLVER,
    capture: CaptureOpt = DEFAULT_CAPTURE,
    compile_decoder: CompileOpt = None,
    share_prefix: SharePrefixOpt = True,
    pack: PackOpt = None,
    dtype: DtypeOpt = None,
    device: DeviceOpt = DEFAULT_DEVICE,
    random_init: RandomInitOpt = False,
    force: ForceOpt = False,
    json_output: JsonOpt = False,
) -> None:
    """Keep the top-k visual tokens for every k of the grid and run LLaVA on ScienceQA.

    Reads OUTPUT_DIR/features.h5 from `vtkit extract`; writes OUTPUT_DIR/sweep.h5 and
    OUTPUT_DIR/answers/k{K}.jsonl (LLaVA's answer format). A killed run resumes from its last
    finished batch. --json prints the per-k accuracies as one JSON document on stdout.

    --layers picks the decoder layers (first,last; all; or indices) and --capture the tensors
    (attn_out, attn_heads, hidden; comma-separated) whose visual rows' spectra are stored.
    --tokens may hold 0 (no visual token). For the random scorer, --seeds 0,1,2 sweeps once per
    seed into OUTPUT_DIR/seed{N}/ (rank and plot each; compare them with `vtkit compare`).

    Example: vtkit sweep --model-path demo/llava-tiny-hf --base-dir demo/scienceqa
    --min 20 --max 576 --step 10 --layers all --capture attn_out,hidden
    """
    from vtkit.cli.progress import stage_reporter
    from vtkit.sweep import SweepConfig, parse_seeds, sweep_seeds
    from vtkit.sweep import sweep as run_sweep

    config = SweepConfig(
        model_path=model_path, model_base=model_base, base_dir=base_dir,
        question_file=question_file, image_folder=image_folder, split=split,
        num_samples=num_samples, output_dir=output_dir,
        tokens=resolve_tokens(min_tokens, max_tokens, step, tokens), scorer=scorer,
        important_ratio=important_ratio, contextual_ratio=contextual_ratio,
        prune_layer=prune_layer,
        conv_mode=conv_mode, single_pred_prompt=single_pred_prompt, temperature=temperature,
        seed=seed, max_new_tokens=max_new_tokens, batch_size=batch_size,
        token_budget=token_budget, keep_attention=keep_attention, layers=layers,
        eigensolver=eigensolver,
        captures=split_captures(capture), compile=compile_decoder, share_prefix=share_prefix,
        pack=pack,
        dtype=dtype, device=device,
        random_init=random_init, force=force,
    )
    if seeds is not None:
        results = sweep_seeds(config, parse_seeds(seeds), stage_reporter())
        if json_output:
            print_stage_json(results)
        return
    result = run_sweep(config, stage_reporter())
    if json_output:
        print_stage_json(result)
