"""`vtkit demo`: the embedded default, a demo ScienceQA folder and the tiny LLaVA checkpoints;
with --train, trains that demo model."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from vtkit.cli.options import BatchSizeOpt, DeviceOpt, JsonOpt, SeedOpt
from vtkit.cli.output import console, print_json
from vtkit.defaults import DEFAULT_DEVICE, DEFAULT_SEED
from vtkit.demo import DEMO_N_TEST, write_demo

DemoOutputOpt = Annotated[Path, typer.Option("--output", help="Folder to write the demo into.")]
TestSizeOpt = Annotated[int, typer.Option("--n-test", min=1, help="Number of test problems.")]
TrainOpt = Annotated[bool, typer.Option(
    "--train", help="Train the demo model instead of copying the shipped one (minutes on a GPU, "
                    "hours on a CPU); writes it into the demo folder with its training.json.")]
StepsOpt = Annotated[int, typer.Option(
    "--steps", min=1, help="Training: optimiser steps (at most, with --time-budget).")]
LrOpt = Annotated[float, typer.Option("--lr", min=0.0, help="Training: peak learning rate.")]
TrainSizeOpt = Annotated[int | None, typer.Option(
    "--n-train", min=1, help="Training: cycle through the first N problems of the demo's train "
                             "split (default: new problems for every batch).")]
EvalSizeOpt = Annotated[int, typer.Option(
    "--n-eval", min=0, help="Training: test problems for the final measurement (0: skip).")]
TimeBudgetOpt = Annotated[float | None, typer.Option(
    "--time-budget", min=1.0,
    help="Training: seconds to train; the step count is fixed once warm-up is timed "
         "(recorded in training.json).")]
ExplainOpt = Annotated[float, typer.Option(
    "--explain-fraction", min=0.0, max=1.0,
    help="Training: share of each batch in the explained format (QCM-LEA: lecture, solution, "
         "then the letter), the rest in the evaluation's.")]
AuxWeightOpt = Annotated[float, typer.Option(
    "--aux-weight", min=0.0,
    help="Training: weight of the patch probe's loss (what each visual token shows), next to "
         "the answer loss; 0 trains on the answer alone.")]
WorkersOpt = Annotated[int | None, typer.Option(
    "--workers", min=0, help="Training: data-loading processes (default: 0 on CPU, up to 14 "
                             "on CUDA).")]


def demo(output: DemoOutputOpt = Path("demo"), seed: SeedOpt = DEFAULT_SEED,
         n_test: TestSizeOpt = DEMO_N_TEST, train: TrainOpt = False,
         device: DeviceOpt = DEFAULT_DEVICE,
         steps: StepsOpt = 6000, batch_size: BatchSizeOpt = None, lr: LrOpt = 1e-3,
         n_train: TrainSizeOpt = None, n_eval: EvalSizeOpt = 1000,
         time_budget: TimeBudgetOpt = None, explain_fraction: ExplainOpt = 0.0,
         aux_weight: AuxWeightOpt = 1.0, workers: WorkersOpt = None,
         json_output: JsonOpt = False) -> None:
    """Write the demo: DIR/scienceqa (synthetic ScienceQA in the real layout) and the demo model,
    a tiny LLaVA trained on that task, as DIR/llava-tiny-hf (HF format, with its training.json)
    and DIR/llava-tiny-orig (original LLaVA format). Deterministic for a seed.

    With --train, trains the demo model from the seed instead (the training flags) and writes
    only its checkpoints into DIR, with training.json next to the HF one, after measuring it on
    --n-eval test problems; `make demo-model` does that and installs the result as the model
    that vtkit ships.

    Examples: vtkit demo --output demo;
    vtkit demo --train --device cuda --time-budget 300 --output demo-model
    """
    if train:
        from vtkit.cli.progress import RichReporter
        from vtkit.demo.train import TrainConfig, train_demo_model

        config = TrainConfig(output_dir=output, seed=seed, steps=steps, lr=lr, n_train=n_train,
                             n_eval=n_eval, device=device, time_budget=time_budget,
                             explain_fraction=explain_fraction, aux_weight=aux_weight,
                             workers=workers,
                             command=shlex.join(["vtkit", *sys.argv[1:]]))
        if batch_size is not None:
            config.batch_size = batch_size
        result = train_demo_model(config, RichReporter())
        paths = result.paths
        evaluation = result.record["evaluation"]
        if evaluation:
            console.print(f"test accuracy (l2, {evaluation['questions']} questions): "
                          + ", ".join(f"k={k}: {v:.1f}%"
                                      for k, v in evaluation["accuracy"].items()),
                          highlight=False)
    else:
        paths = write_demo(output, seed=seed, n_test=n_test)
    if json_output:
        print_json({name: str(path) for name, path in paths.items()})
    for name, path in paths.items():
        console.print(f"{name:>16}: {path}", highlight=False)
