"""`vtkit demo`: the embedded default, a demo ScienceQA folder and the tiny LLaVA checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vtkit.cli.options import SeedOpt
from vtkit.cli.output import console
from vtkit.demo import write_demo

DemoOutputOpt = Annotated[Path, typer.Option("--output", help="Folder to write the demo into.")]
TestSizeOpt = Annotated[int, typer.Option("--n-test", min=1, help="Number of test problems.")]


def demo(output: DemoOutputOpt = Path("demo"), seed: SeedOpt = 0,
         n_test: TestSizeOpt = 60) -> None:
    """Write the demo: DIR/scienceqa (synthetic ScienceQA in the real layout) and the tiny LLaVA
    checkpoints DIR/llava-tiny-hf (HF format) and DIR/llava-tiny-orig (original LLaVA format).

    Deterministic for a seed. Example: vtkit demo --output demo
    """
    paths = write_demo(output, seed=seed, n_test=n_test)
    for name, path in paths.items():
        console.print(f"{name:>16}: {path}", highlight=False)
