"""`vtkit convert`: save any supported LLaVA checkpoint once in the HF format."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vtkit.cli.options import JsonOpt, ModelBaseOpt
from vtkit.cli.output import console, print_json

SrcArg = Annotated[str, typer.Argument(
    help="Checkpoint to convert: a directory or a cached repo id (HF, original or LoRA format).",
    show_default=False)]
DstArg = Annotated[Path, typer.Argument(
    help="New directory for the HF-format checkpoint (must not exist or be empty).",
    show_default=False)]


def convert(src: SrcArg, dst: DstArg, model_base: ModelBaseOpt = None,
            json_output: JsonOpt = False) -> None:
    """Save a LLaVA checkpoint in transformers' HF format, once, so later
    loads are plain and fast.

    SRC may be in the HF format, the original LLaVA format (with the CLIP
    tower its mm_vision_tower names) or a LoRA checkpoint (with
    --model-base; merged). DST gets the config, safetensors weights in the
    source's dtype, the tokenizer with <image> and <pad> added as llava-hf
    does, and the processor configs. Loading DST gives the same features
    and logits as SRC.

    Example: vtkit convert liuhaotian/llava-v1.5-7b llava-v1.5-7b-converted
    """
    from vtkit.model import convert_checkpoint, read_config

    console.print(f"converting {src} to the HF format in {dst} ...", highlight=False)
    out = convert_checkpoint(src, dst, model_base)
    if json_output:
        print_json({"dst": str(out), "source": read_config(out).get("vtkit_converted_from")})
    console.print(f"wrote the HF-format checkpoint to {out}", highlight=False)
