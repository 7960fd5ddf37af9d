"""Shared fixtures: the real ScienceQA files and tokenizer from ../shared, the tiny checkpoints
and the demo ScienceQA folder (each built once per test session)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VTKIT_SHARED_DIR", ROOT.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared reference data (real ScienceQA questions, Llama-2 tokenizer, vectors)."""
    if not (SHARED / "data").is_dir():
        pytest.fail(f"shared reference data not found at {SHARED} (set VTKIT_SHARED_DIR)")
    return SHARED


@pytest.fixture(scope="session")
def llama2_tokenizer(shared_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(shared_dir / "data" / "tokenizer" / "llama2")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict:
    """Tiny LLaVA checkpoints in both formats: {"hf": Path, "orig": Path, "clip": Path}."""
    from vtkit.tiny import build_tiny_checkpoints

    return build_tiny_checkpoints(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="session")
def demo_scienceqa(tmp_path_factory) -> Path:
    """A small synthetic ScienceQA folder in the real layout."""
    from vtkit.demo import write_demo_scienceqa

    return write_demo_scienceqa(tmp_path_factory.mktemp("demo") / "scienceqa", seed=0)
