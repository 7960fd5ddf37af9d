"""Shared fixtures: the real reference data in tests/data (ScienceQA question file and splits,
the Llama-2 tokenizer, prompt/id vectors; tests/data/README.md gives their sources), the tiny
checkpoints and the demo ScienceQA folder (each built once per test session).

Without a GPU, Triton (when installed) runs in its interpreter: the device eigensolver's kernels
are tested on the CPU. The setting must precede Triton's import, so it is made here.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="session")
def reference_data() -> Path:
    """tests/data: real ScienceQA questions and splits, the Llama-2 tokenizer, prompt vectors."""
    return DATA


@pytest.fixture(scope="session")
def llama2_tokenizer(reference_data):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(reference_data / "tokenizer" / "llama2")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict:
    """Tiny LLaVA checkpoints in both formats: {"hf": Path, "orig": Path, "clip": Path}."""
    from vtkit.demo.tiny import build_tiny_checkpoints

    return build_tiny_checkpoints(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="session")
def demo_scienceqa(tmp_path_factory) -> Path:
    """A small synthetic ScienceQA folder in the real layout."""
    from vtkit.demo import write_demo_scienceqa

    return write_demo_scienceqa(tmp_path_factory.mktemp("demo") / "scienceqa", seed=0)
