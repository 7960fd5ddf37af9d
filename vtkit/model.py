"""Loading LLaVA in every common form into one small interface, :class:`LlavaModel`.

Three checkpoint formats (docs/protocol.md section 6), all loaded into an in-memory
``transformers.LlavaForConditionalGeneration`` so the rest of vtkit sees one model:

- ``hf``: transformers' own LLaVA format (``llava-hf/llava-1.5-7b-hf``).
- ``original``: the LLaVA repository's format (``liuhaotian/llava-v1.5-7b``): a
  ``LlavaLlamaForCausalLM`` config, Llama weights plus ``model.mm_projector.{0,2}``, and a separate
  CLIP checkpoint named by ``mm_vision_tower``. Mapped onto transformers' classes without the
  ``llava`` package.
- ``lora``: an original-format LoRA checkpoint (``*-lora``: ``adapter_config.json``, the adapter,
  ``non_lora_trainables.bin``) applied to a base LLM given as ``model_base`` and merged.

Formats are told apart by ``architectures`` / ``mm_vision_tower`` (and ``adapter_config.json``),
never by ``model_type``, which both formats set to ``llava``. A path is a local directory or a
Hugging Face repo id already in the cache (looked up with ``local_files_only``, so
``HF_HUB_OFFLINE=1`` is fine).

Everything that depends on where transformers keeps things (``model.model.vision_tower``,
``model.model.language_model``, the CLIP encoder layers, checkpoint key names) lives in this
module and nowhere else.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import math
import re
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from vtkit.cache import set_file_modes, write_json_atomic
from vtkit.data import IMAGE_TOKEN
from vtkit.errors import DataError, UsageError
from vtkit.images import CLIP_MEAN, CLIP_STD

FORMATS = ("hf", "original", "lora")

#: Key prefix of the projector's two linears in original-format weights.
ORIGINAL_PROJECTOR_PREFIX = "model.mm_projector."
_ORIGINAL_PROJECTOR_NAMES = {"0": "linear_1", "2": "linear_2"}

#: The padding token llava-hf adds to the tokenizer after IMAGE_TOKEN; the vocabulary is then
#: padded to a multiple of 64 (32000 -> 32064 for LLaVA-1.5).
PAD_TOKEN = "<pad>"
VOCAB_MULTIPLE = 64

_DTYPES = {
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}

# Vision config of openai/clip-vit-large-patch14-336, so --random-init of an original-format
# checkpoint works from its config.json alone when the CLIP checkpoint is not on this machine.
_KNOWN_VISION_CONFIGS = {
    "openai/clip-vit-large-patch14-336": dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
        layer_norm_eps=1e-5),
}

# Fields of an original LLaVA config that describe its Llama language model.
_LLAMA_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings",
    "initializer_range", "rms_norm_eps", "pretraining_tp", "tie_word_embeddings", "rope_theta",
    "rope_scaling", "rope_parameters", "attention_bias", "attention_dropout", "mlp_bias",
    "bos_token_id", "eos_token_id", "pad_token_id", "use_cache",
)

# Weights checksum: per file its name, size, and this many bytes from each end.
_CHECKSUM_EDGE_BYTES = 4 << 20
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_NOT_WEIGHTS = ("training_args.bin",)

# transformers' GenerationConfig defaults, which generate() uses where a checkpoint's
# generation_config.json says nothing.
DEFAULT_TOP_K = 50
DEFAULT_TOP_P = 1.0


# --------------------------------------------------------------------------------------------
# Device and dtype


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; anything else must be a usable device."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, not {device!r}") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: CUDA is not available on this machine")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) here")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None`` -> float16 on CUDA (as the original evaluation) and float32 on CPU."""
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise UsageError(f"--dtype must be float16, bfloat16 or float32, not {dtype!r}")
    return _DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports, progress bars and deprecation notes about checkpoint
    configs (e.g. ``rope_scaling: null`` in original LLaVA configs); vtkit reports itself."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


# --------------------------------------------------------------------------------------------
# Finding checkpoints and telling formats apart

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def resolve_checkpoint_dir(path: str | Path, flag: str = "--model-path") -> Path:
    """A checkpoint directory: ``path`` itself, or the cached snapshot of repo id ``path``.

    Only local files are used (``local_files_only``), so this works offline. A path that is
    neither is a :class:`DataError` naming it.
    """
    local = Path(path).expanduser()
    if local.is_dir():
        return local.absolute()
    if local.exists():
        raise DataError(f"{flag} {path}: is a file, not a checkpoint directory")
    text = str(path)
    if _REPO_ID.fullmatch(text) and not text.endswith((".", "..")):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(text, local_files_only=True))
        except Exception:  # noqa: BLE001 - any failure means "not in the cache"
            pass
    from huggingface_hub.constants import HF_HUB_CACHE

    raise DataError(f"{flag} {path}: no such directory, and no such repo in the Hugging Face "
                    f"cache ({HF_HUB_CACHE})")


def read_config(checkpoint_dir: Path) -> dict[str, Any]:
    """The checkpoint's ``config.json`` as a dict (:class:`DataError` if missing or broken)."""
    path = checkpoint_dir / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{checkpoint_dir}: no config.json, so not a model checkpoint") from None
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: cannot read it: {error}") from None


def _format_of(checkpoint_dir: Path, config: dict[str, Any]) -> str:
    architectures = config.get("architectures") or []
    if (checkpoint_dir / "adapter_config.json").is_file():
        return "lora"
    if "LlavaForConditionalGeneration" in architectures:
        return "hf"
    if "LlavaLlamaForCausalLM" in architectures or "mm_vision_tower" in config:
        other = [a for a in architectures if a != "LlavaLlamaForCausalLM"]
        if other:
            raise DataError(f"{checkpoint_dir}: architecture {other[0]} is not supported "
                            "(original-format LLaVA must be LlavaLlamaForCausalLM)")
        return "original"
    if not architectures and "vision_config" in config and "text_config" in config:
        return "hf"
    raise DataError(f"{checkpoint_dir}: not a LLaVA checkpoint (architectures "
                    f"{architectures or 'missing'}, no mm_vision_tower)")


def detect_format(path: str | Path) -> str:
    """``"hf"``, ``"original"`` or ``"lora"`` for a checkpoint directory or cached repo id.

    ``lora``: an ``adapter_config.json`` is present. ``hf``: ``architectures`` names
    ``LlavaForConditionalGeneration``. ``original``: ``architectures`` names
    ``LlavaLlamaForCausalLM`` or the config has ``mm_vision_tower``. Anything else is a
    :class:`DataError`.
    """
    checkpoint_dir = resolve_checkpoint_dir(path)
    return _format_of(checkpoint_dir, read_config(checkpoint_dir))


def resolve_vision_tower(name: str, checkpoint_dir: Path) -> Path:
    """The CLIP checkpoint directory an original config's ``mm_vision_tower`` names.

    An absolute path is used as given. A relative one is tried against the checkpoint directory
    first (so a checkpoint and its tower can move together), then against the working directory
    (what the original code does), then as a repo id in the Hugging Face cache.
    """
    given = Path(name).expanduser()
    candidates = [given] if given.is_absolute() else [checkpoint_dir / given, given]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.absolute()
    try:
        return resolve_checkpoint_dir(name, flag="mm_vision_tower")
    except DataError:
        raise DataError(f"vision tower {name!r} (mm_vision_tower in {checkpoint_dir}/config.json) "
                        "not found: not a directory next to the checkpoint or here, and not in "
                        "the Hugging Face cache") from None


# --------------------------------------------------------------------------------------------
# Identity: what the loaded model is, for cache fingerprints


def weight_files(checkpoint_dir: Path) -> list[Path]:
    """The files that determine a checkpoint's weights: ``config.json`` and weight files."""
    files = [p for p in checkpoint_dir.iterdir()
             if p.is_file() and p.suffix in _WEIGHT_SUFFIXES and p.name not in _NOT_WEIGHTS]
    config = checkpoint_dir / "config.json"
    return sorted(files + ([config] if config.is_file() else []), key=lambda p: p.name)


def weights_checksum(files: Iterable[tuple[str, Path]]) -> str:
    """A cheap but real checksum of weight files: sha256 over, per file in the order given,
    its label, its size, and its first and last 4 MiB (all of it when smaller than 8 MiB).

    Reading a few MiB per shard keeps this instant for 7B checkpoints, yet a different or
    re-saved checkpoint (other size, header, or tensors at either end) changes it.
    """
    digest = hashlib.sha256()
    for label, path in files:
        size = path.stat().st_size
        digest.update(f"{label}\0{size}\0".encode())
        with open(path, "rb") as handle:
            if size <= 2 * _CHECKSUM_EDGE_BYTES:
                digest.update(handle.read())
            else:
                digest.update(handle.read(_CHECKSUM_EDGE_BYTES))
                handle.seek(size - _CHECKSUM_EDGE_BYTES)
                digest.update(handle.read(_CHECKSUM_EDGE_BYTES))
    return digest.hexdigest()


#: The fields of ``identity`` that decide a model's outputs. The path it was loaded from is not
#: one: ``demo/m``, ``./demo/m/``, an absolute path or a symlink to it are the same model.
IDENTITY_KEYS = ("format", "weights_sha256", "random_init", "seed")

# Files that decide how a tokenizer splits text (transformers reads these names).
_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt")


def model_key(identity: dict[str, Any]) -> dict[str, Any]:
    """What a cache compares to tell models apart: format, weights checksum (which covers a LoRA
    base and an original checkpoint's CLIP tower), random init and its seed."""
    return {k: identity.get(k) for k in IDENTITY_KEYS}


def tokenizer_checksum(directory: Path) -> str:
    """sha256 over the tokenizer files of a checkpoint directory (name and bytes of each)."""
    digest = hashlib.sha256()
    for name in _TOKENIZER_FILES:
        path = directory / name
        if path.is_file():
            digest.update(f"{name}\0{path.stat().st_size}\0".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _labelled(role: str, checkpoint_dir: Path) -> list[tuple[str, Path]]:
    return [(f"{role}/{p.name}", p) for p in weight_files(checkpoint_dir)]


def random_init_checksum(config: dict[str, Any], seed: int, device: torch.device) -> str:
    """Identity of random weights: sha256 of the config, the seed and the device type (the CPU
    and CUDA generators give different numbers for one seed)."""
    text = json.dumps({"config": config, "seed": seed, "device_type": device.type},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Original-format configs


def _check_original_config(checkpoint_dir: Path, config: dict[str, Any]) -> None:
    """Refuse original-format variants that transformers' LLaVA cannot represent."""
    problems = {
        "mm_projector_type": (config.get("mm_projector_type", "linear"), ("mlp2x_gelu",)),
        "mm_vision_select_feature": (config.get("mm_vision_select_feature", "patch"), ("patch",)),
        "mm_patch_merge_type": (config.get("mm_patch_merge_type", "flat"), ("flat",)),
        "mm_use_im_start_end": (config.get("mm_use_im_start_end", False), (False,)),
        "mm_use_im_patch_token": (config.get("mm_use_im_patch_token", False), (False,)),
    }
    for field, (value, allowed) in problems.items():
        if value not in allowed:
            raise DataError(f"{checkpoint_dir}: {field} = {value!r} is not supported (LLaVA-1.5 "
                            f"uses {allowed[0]!r})")
    if "mm_vision_tower" not in config:
        raise DataError(f"{checkpoint_dir}/config.json has no mm_vision_tower")


def original_text_config(config: dict[str, Any]):
    """The ``LlamaConfig`` of an original LLaVA config (its Llama fields, none of the mm_ ones)."""
    from transformers import LlamaConfig

    # None-valued fields (rope_scaling: null) are left to the defaults; passing them warns.
    return LlamaConfig(**{k: config[k] for k in _LLAMA_FIELDS if config.get(k) is not None})


def _vision_config_for(name: str, checkpoint_dir: Path, *, allow_builtin: bool):
    """The CLIPVisionConfig of ``mm_vision_tower`` and its directory (None for a built-in one)."""
    from transformers import CLIPVisionConfig

    try:
        clip_dir = resolve_vision_tower(name, checkpoint_dir)
    except DataError:
        if allow_builtin and name in _KNOWN_VISION_CONFIGS:
            return CLIPVisionConfig(**_KNOWN_VISION_CONFIGS[name]), None
        raise
    with _quiet_transformers():
        return CLIPVisionConfig.from_pretrained(clip_dir), clip_dir


def _llava_config(text_config, vision_config, *, vision_feature_layer: int, image_token_id: int,
                  image_aspect_ratio: str | None):
    from transformers import LlavaConfig

    config = LlavaConfig(
        vision_config=vision_config, text_config=text_config, image_token_index=image_token_id,
        projector_hidden_act="gelu", vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="default", multimodal_projector_bias=True,
        image_seq_length=(vision_config.image_size // vision_config.patch_size) ** 2,
    )
    if image_aspect_ratio is not None:
        config.image_aspect_ratio = image_aspect_ratio
    return config


def _original_llava_config(checkpoint_dir: Path, config: dict[str, Any], *, allow_builtin: bool):
    """LlavaConfig, CLIP directory (or None) for an original-format config.

    The ``<image>`` token id is set to the vocabulary size, the id that adding the token gives;
    it has no row in the embedding table until :func:`convert_checkpoint` adds one, so feed such
    a model ``inputs_embeds``, not ``input_ids`` with image tokens.
    """
    vision_config, clip_dir = _vision_config_for(config["mm_vision_tower"], checkpoint_dir,
                                                 allow_builtin=allow_builtin)
    text_config = original_text_config(config)
    llava_config = _llava_config(
        text_config, vision_config,
        vision_feature_layer=int(config.get("mm_vision_select_layer", -2)),
        image_token_id=text_config.vocab_size,
        image_aspect_ratio=config.get("image_aspect_ratio"))
    return llava_config, clip_dir


# --------------------------------------------------------------------------------------------
# Reading original-format weights


def _checkpoint_shards(checkpoint_dir: Path) -> list[Path]:
    """Weight shards of a transformers-style checkpoint (index file first, else the files)."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = checkpoint_dir / index_name
        if index.is_file():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [checkpoint_dir / name for name in names]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (checkpoint_dir / single).is_file():
            return [checkpoint_dir / single]
    raise DataError(f"{checkpoint_dir}: no weights (model.safetensors, pytorch_model.bin or an "
                    "index of shards)")


def _read_tensors(files: Iterable[Path], prefix: str) -> dict[str, torch.Tensor]:
    """All tensors whose key starts with ``prefix`` in safetensors or torch files."""
    found: dict[str, torch.Tensor] = {}
    for path in files:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    if key.startswith(prefix):
                        found[key] = handle.get_tensor(key)
        else:
            state = load_torch_file(path, mmap=True)
            found.update({k: v for k, v in state.items() if k.startswith(prefix)})
    return found


def load_torch_file(path: Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    """A torch ``.bin`` state dict, unpickled with ``weights_only=True``: a file that holds
    anything but tensors and plain containers (which could run code) is refused."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except pickle.UnpicklingError:
        raise DataError(f"{path}: refused to load: it holds Python objects besides tensors, and "
                        "unpickling them could run code; use a safetensors copy of the weights "
                        "or one from a source you trust, re-saved as a plain state dict") from None
    except (RuntimeError, EOFError, ValueError) as error:
        if mmap and "mmap" in str(error):     # a legacy (non-zip) torch file cannot be mapped
            return load_torch_file(path)
        raise DataError(f"{path}: not a readable torch weights file "
                        f"({' '.join(str(error).split())[:200]})") from None


@contextlib.contextmanager
def _refusing_pickles(*directories: Path) -> Iterator[None]:
    """transformers unpickles ``.bin`` files with ``weights_only=True`` too, and refuses the same
    files; find the refused one, so the message can name it."""
    import pickle

    try:
        yield
    except pickle.UnpicklingError:
        for directory in directories:
            for path in sorted(Path(directory).glob("*.bin")):
                load_torch_file(path, mmap=True)    # raises the DataError naming the file
        raise DataError(f"{', '.join(map(str, directories))}: refused to load a weights file that "
                        "holds Python objects besides tensors (unpickling them could run "
                        "code)") from None


def _projector_state(tensors: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    """``model.mm_projector.{0,2}.*`` -> the ``linear_{1,2}.*`` names of transformers' projector."""
    state = {}
    for key, value in tensors.items():
        index, _, param = key.removeprefix(ORIGINAL_PROJECTOR_PREFIX).partition(".")
        if index not in _ORIGINAL_PROJECTOR_NAMES:
            raise DataError(f"{source}: unexpected projector weight {key} (expected a "
                            "Linear-GELU-Linear mm_projector)")
        state[f"{_ORIGINAL_PROJECTOR_NAMES[index]}.{param}"] = value
    if not state:
        raise DataError(f"{source}: no {ORIGINAL_PROJECTOR_PREFIX}* weights")
    return state


def read_non_lora_trainables(lora_dir: Path) -> dict[str, torch.Tensor]:
    """``non_lora_trainables.bin`` with LLaVA's key clean-up: strip a leading ``base_model.``,
    then a leading ``model.`` when keys start ``model.model.``."""
    path = lora_dir / "non_lora_trainables.bin"
    if not path.is_file():
        raise DataError(f"{lora_dir}: no non_lora_trainables.bin (LLaVA LoRA checkpoints keep the "
                        "projector there)")
    state = load_torch_file(path)
    state = {k.removeprefix("base_model."): v for k, v in state.items()}
    if any(k.startswith("model.model.") for k in state):
        state = {k.removeprefix("model."): v for k, v in state.items()}
    return state


def _lora_base_hint(lora_dir: Path) -> str:
    try:
        config = json.loads((lora_dir / "adapter_config.json").read_text())
        base = config.get("base_model_name_or_path")
    except (OSError, ValueError):
        base = None
    return f"the adapter was trained on {base}" if base else "its adapter_config.json names no base"


# --------------------------------------------------------------------------------------------
# The interface the rest of vtkit sees


def clip_layers(hf) -> tuple[nn.Module, list[nn.Module]]:
    """The CLIP vision model of a transformers LLaVA (embeddings, pre-layernorm, encoder) and
    its encoder layers."""
    tower = hf.model.vision_tower
    core = getattr(tower, "vision_model", tower)  # transformers < 5 nested it one deeper
    return core, list(core.encoder.layers)


def feature_layer_index(layer: int, num_layers: int) -> int:
    """Index into CLIP's hidden_states of ``vision_feature_layer`` = ``layer`` (0 = embeddings,
    i = output of encoder layer i-1)."""
    index = layer if layer >= 0 else num_layers + 1 + layer
    if not 1 <= index <= num_layers:
        raise DataError(f"vision_feature_layer {layer} selects no encoder layer of a "
                        f"{num_layers}-layer CLIP")
    return index


class VisionSignals(NamedTuple):
    """What :meth:`LlavaModel.vision_signals` returns (shapes in its docstring)."""

    features: torch.Tensor
    cls_attention: torch.Tensor
    cls_feature: torch.Tensor
    keys: torch.Tensor


class LlavaModel:
    """A loaded LLaVA model: tokenizer, vision features, projector, embeddings, decoder, head.

    ``hf`` is the wrapped ``transformers.LlavaForConditionalGeneration`` (eval mode, no grads).
    Attributes: ``tokenizer``, ``device``, ``dtype``, ``identity`` (model_path, model_base,
    checkpoint_dir, format, weights_sha256, tokenizer_sha256, random_init, dtype, and seed for
    random weights), ``sampling`` (top_k, top_p of its generation config), ``image_size``,
    ``patch_size``, ``num_patches`` (576 for 336/14), ``image_mean``, ``image_std``,
    ``image_mode_default``, ``vision_feature_layer`` (-2), ``hidden_size`` (LM width),
    ``num_layers`` (decoder layers), ``vision_hidden_size``, ``vocab_size`` (rows of the
    embedding table), ``image_token_id``.
    """

    def __init__(self, hf, tokenizer, identity: dict[str, Any], *, image_mean: tuple[float, ...],
                 image_std: tuple[float, ...], image_mode_default: str) -> None:
        hf.eval()
        hf.requires_grad_(False)
        self.hf = hf
        self.tokenizer = tokenizer
        self.identity = identity
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        self.image_mode_default = image_mode_default
        parameter = next(hf.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        config = hf.config
        vision = config.vision_config
        if config.vision_feature_select_strategy != "default" or not isinstance(
                config.vision_feature_layer, int):
            raise DataError("only LLaVA-1.5's vision features are supported (one CLIP layer, CLS "
                            f"dropped); this config has vision_feature_layer "
                            f"{config.vision_feature_layer!r}, select strategy "
                            f"{config.vision_feature_select_strategy!r}")
        self.image_size, self.patch_size = vision.image_size, vision.patch_size
        self.num_patches = (self.image_size // self.patch_size) ** 2
        self.vision_feature_layer = config.vision_feature_layer
        self.vision_hidden_size = vision.hidden_size
        self.hidden_size = config.text_config.hidden_size
        self.num_layers = config.text_config.num_hidden_layers
        self.vocab_size = self.embed_tokens.num_embeddings
        self.image_token_id = config.image_token_id
        self.sampling = {"top_k": DEFAULT_TOP_K, "top_p": DEFAULT_TOP_P}
        self._cache_argument: str | None = None

    def __repr__(self) -> str:
        return (f"LlavaModel({self.identity['model_path']!r}, format={self.identity['format']}, "
                f"dtype={dtype_name(self.dtype)}, device={self.device})")

    # Where transformers 5 keeps the parts (the one place that knows).
    @property
    def vision_tower(self) -> nn.Module:
        return self.hf.model.vision_tower

    @property
    def projector(self) -> nn.Module:
        return self.hf.model.multi_modal_projector

    @property
    def language_model(self) -> nn.Module:
        """The Llama decoder (``LlamaModel``: embed_tokens, layers, norm; no head)."""
        return self.hf.model.language_model

    @property
    def lm_head(self) -> nn.Module:
        return self.hf.lm_head

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.language_model.embed_tokens

    @property
    def decoder_layers(self) -> list[nn.Module]:
        """Decoder layers; ``decoder_layers[i].self_attn.o_proj`` outputs the attention block."""
        return list(self.language_model.layers)

    @property
    def eos_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        if eos is None:
            eos = self.hf.config.text_config.eos_token_id
        return int(eos[0] if isinstance(eos, (list, tuple)) else eos)

    @property
    def pad_token_id(self) -> int:
        """The tokenizer's pad id, else EOS, else 0 (padded positions are masked anyway)."""
        pad = self.tokenizer.pad_token_id
        if pad is not None:
            return int(pad)
        try:
            return self.eos_token_id
        except TypeError:
            return 0

    @torch.inference_mode()
    def encode_images(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP features and [CLS] attention for a batch of preprocessed images: the first two
        of :meth:`vision_signals`."""
        signals = self.vision_signals(pixel_values)
        return signals.features, signals.cls_attention

    @torch.inference_mode()
    def vision_signals(self, pixel_values: torch.Tensor) -> VisionSignals:
        """What the CLIP layer ``vision_feature_layer`` gives for a batch of preprocessed images.

        ``features`` [B, N, Dv] (model dtype): its hidden state (hidden_states[-2]: no
        post-layernorm), CLS dropped, as ``get_image_features`` selects it before the projector;
        ``cls_attention`` [B, N] (float32): its [CLS] -> patch attention averaged over heads;
        ``cls_feature`` [B, Dv] (model dtype): its [CLS] hidden state; ``keys`` [B, N, Dh]
        (float32): its patch keys (k_proj of the layer-normed input) averaged over heads, as
        VisionZip uses them. SDPA returns no weights, so the attention row is recomputed from
        that layer's layer-normed input and its q/k projections: softmax over all tokens
        including CLS, then the CLS column dropped (a row sums to 1 minus CLS's attention to
        itself). Layers after the feature layer are not run.
        """
        core, layers = clip_layers(self.hf)
        index = feature_layer_index(self.vision_feature_layer, len(layers))
        hidden = core.embeddings(pixel_values.to(self.device, self.dtype))
        hidden = core.pre_layrnorm(hidden)
        for layer in layers[:index - 1]:
            hidden = _run_clip_layer(layer, hidden)
        feature_layer = layers[index - 1]
        cls_attention, keys = _cls_attention(feature_layer, hidden)
        hidden = _run_clip_layer(feature_layer, hidden)
        return VisionSignals(hidden[:, 1:], cls_attention, hidden[:, 0], keys[:, 1:])

    @torch.inference_mode()
    def project(self, features: torch.Tensor) -> torch.Tensor:
        """The multimodal projector (Linear-GELU-Linear): [B, N, Dv] -> [B, N, hidden_size]."""
        return self.projector(features.to(self.device, self.dtype))

    def compile_decoder(self) -> None:
        """``torch.compile`` the decoder layers' MLP and RMSNorm (dynamic shapes).

        Fuses their elementwise work for prefill throughput. Attention stays eager, so the
        hooks on ``o_proj`` work as before. The classes' forwards are compiled once for all
        layers (the modules are inputs of one graph, not one graph per layer).
        """
        layer = self.decoder_layers[0]
        for module in (layer.mlp, layer.input_layernorm, layer.post_attention_layernorm):
            cls = type(module)
            if not getattr(cls.forward, "_vtkit_compiled", False):
                cls.forward = torch.compile(cls.forward, dynamic=True)
                cls.forward._vtkit_compiled = True

    def new_cache(self):
        """An empty KV cache for :meth:`run_decoder` (transformers' ``DynamicCache``; a cache
        with room for the decode steps measured slower on the sweep's 2-token answers,
        docs/performance.md)."""
        from transformers import DynamicCache

        return DynamicCache()

    def run_decoder(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                    position_ids: torch.Tensor, cache) -> torch.Tensor:
        """The language model over embeddings, extending ``cache``: last hidden states [B, L, D].

        transformers renamed the cache argument (``past_key_values`` -> ``cache``) within 5.x;
        the name this version takes is looked up once.
        """
        if self._cache_argument is None:
            params = inspect.signature(self.language_model.forward).parameters
            self._cache_argument = "cache" if "cache" in params else "past_key_values"
        out = self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  position_ids=position_ids, use_cache=True,
                                  **{self._cache_argument: cache})
        return out.last_hidden_state


def _run_clip_layer(layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    output = layer(hidden, None)
    return output[0] if isinstance(output, tuple) else output


def _cls_attention(layer: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] -> token attention [B, T-1] (CLS column dropped, mean over heads) and keys averaged
    over heads [B, T, Dh] (float32), of one CLIP encoder layer given its input [B, T, D]."""
    attention = layer.self_attn
    normed = layer.layer_norm1(hidden)
    batch, tokens, width = normed.shape
    heads = attention.num_heads
    head_dim = width // heads
    query = attention.q_proj(normed[:, :1]).view(batch, 1, heads, head_dim).transpose(1, 2)
    keys = attention.k_proj(normed).view(batch, tokens, heads, head_dim).transpose(1, 2)
    # float32 like the eager attention's softmax; [B, H, 1, T]
    scores = torch.matmul(query.float(), keys.float().transpose(-1, -2)) * attention.scale
    return scores.softmax(dim=-1).mean(dim=1)[:, 0, 1:], keys.float().mean(dim=1)


# --------------------------------------------------------------------------------------------
# Loading


def load_tokenizer(path: str | Path):
    """The tokenizer of a checkpoint directory (or cached repo id).

    Loads the class that ``tokenizer_config.json`` names (``LlamaTokenizer`` for LLaVA and
    Llama-2) instead of letting ``AutoTokenizer`` choose from ``config.json``: for
    ``model_type: llava`` transformers 5.17's AutoTokenizer builds a generic tokenizer from a
    bare ``tokenizer.model`` without Llama's leading-space handling, and the ids then differ from
    the official ones (no 29871 around the image).
    """
    import transformers

    directory = resolve_checkpoint_dir(path, flag="tokenizer")
    settings = directory / "tokenizer_config.json"
    name = json.loads(settings.read_text()).get("tokenizer_class") if settings.is_file() else None
    tokenizer_class = getattr(transformers, name, None) if name else None
    if not hasattr(tokenizer_class, "from_pretrained"):
        tokenizer_class = transformers.AutoTokenizer
    try:
        with _quiet_transformers():
            return tokenizer_class.from_pretrained(directory)
    except (OSError, ValueError, TypeError) as error:
        raise DataError(f"{directory}: cannot load its tokenizer: {error}") from None


def _image_processor_settings(directory: Path | None) -> tuple[tuple, tuple]:
    """``image_mean`` / ``image_std`` from a ``preprocessor_config.json``, else CLIP's."""
    if directory is not None and (directory / "preprocessor_config.json").is_file():
        settings = json.loads((directory / "preprocessor_config.json").read_text())
        return (tuple(settings.get("image_mean", CLIP_MEAN)),
                tuple(settings.get("image_std", CLIP_STD)))
    return CLIP_MEAN, CLIP_STD


def _image_mode_default(config: dict[str, Any], fmt: str) -> str:
    """``pad`` when the config says ``image_aspect_ratio: pad``. Without the field an original
    checkpoint crops (the original code pads only when told to), while an HF one pads (the
    LLaVA-1.5 setting, docs/protocol.md section 4; llava-hf configs carry no such field)."""
    ratio = config.get("image_aspect_ratio")
    if ratio is None:
        return "pad" if fmt == "hf" else "crop"
    return "pad" if ratio == "pad" else "crop"


def _assemble(config, vision_tower: nn.Module, causal_lm: nn.Module,
              projector_state: dict[str, torch.Tensor], device: torch.device,
              dtype: torch.dtype):
    """Build a LlavaForConditionalGeneration around already-loaded parts, without copies."""
    from transformers import LlavaForConditionalGeneration
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = vision_tower
    model.model.language_model = causal_lm.model
    model.lm_head = causal_lm.lm_head
    projector = LlavaMultiModalProjector(config)
    try:
        projector.load_state_dict(projector_state)
    except RuntimeError as error:
        raise DataError(f"projector weights do not fit the config: {error}") from None
    model.model.multi_modal_projector = projector.to(device=device, dtype=dtype)
    model.config.text_config = causal_lm.config
    model.config.vision_config = vision_tower.config
    leftover = [name for name, t in [*model.named_parameters(), *model.named_buffers()]
                if t.is_meta]
    if leftover:
        raise RuntimeError(f"parts of the assembled model were never loaded: {leftover[:5]}")
    return model


def _load_original(checkpoint_dir: Path, config: dict[str, Any], device: torch.device,
                   dtype: torch.dtype, base_dir: Path | None):
    """Original-format (or, with ``base_dir``, LoRA) LLaVA mapped onto transformers' classes."""
    from transformers import CLIPVisionModel, LlamaForCausalLM

    _check_original_config(checkpoint_dir, config)
    llava_config, clip_dir = _original_llava_config(checkpoint_dir, config, allow_builtin=False)
    placement = {"dtype": dtype, "device_map": {"": str(device)}}
    with _quiet_transformers(), _refusing_pickles(clip_dir, base_dir or checkpoint_dir):
        vision_tower = CLIPVisionModel.from_pretrained(clip_dir, **placement)
        causal_lm = LlamaForCausalLM.from_pretrained(
            base_dir or checkpoint_dir, config=llava_config.text_config, **placement)
    if base_dir is None:
        shards = _checkpoint_shards(checkpoint_dir)
        projector_state = _projector_state(_read_tensors(shards, ORIGINAL_PROJECTOR_PREFIX),
                                           checkpoint_dir)
    else:
        projector_state = _apply_lora(causal_lm, checkpoint_dir)
        causal_lm = _merge_lora(causal_lm, checkpoint_dir)
    model = _assemble(llava_config, vision_tower, causal_lm, projector_state, device, dtype)
    return model, clip_dir


def _apply_lora(causal_lm: nn.Module, lora_dir: Path) -> dict[str, torch.Tensor]:
    """Load ``non_lora_trainables.bin`` into the base LLM; return the projector part.

    Vision-tower keys are ignored, as LLaVA's loader ignores them (its tower is loaded from
    ``mm_vision_tower`` afterwards).
    """
    state = read_non_lora_trainables(lora_dir)
    projector = {k: v for k, v in state.items() if k.startswith(ORIGINAL_PROJECTOR_PREFIX)}
    rest = {k: v for k, v in state.items()
            if not k.startswith((ORIGINAL_PROJECTOR_PREFIX, "model.vision_tower."))}
    if rest:
        reference = causal_lm.state_dict()
        unknown = [k for k in rest if k not in reference]
        if unknown:
            raise DataError(f"{lora_dir}/non_lora_trainables.bin: weights that fit no part of the "
                            f"model: {', '.join(unknown[:5])}")
        with torch.no_grad():
            for key, value in rest.items():
                reference[key].copy_(value)
    return _projector_state(projector, lora_dir / "non_lora_trainables.bin")


def _merge_lora(causal_lm: nn.Module, lora_dir: Path) -> nn.Module:
    from peft import PeftModel

    with _quiet_transformers(), _refusing_pickles(lora_dir):
        try:
            adapted = PeftModel.from_pretrained(causal_lm, str(lora_dir))
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            raise DataError(f"{lora_dir}: cannot apply the LoRA adapter: {error}") from None
        return adapted.merge_and_unload()


def _load_hf(checkpoint_dir: Path, device: torch.device, dtype: torch.dtype):
    from transformers import LlavaForConditionalGeneration

    with _quiet_transformers(), _refusing_pickles(checkpoint_dir):
        try:
            return LlavaForConditionalGeneration.from_pretrained(
                checkpoint_dir, dtype=dtype, device_map={"": str(device)})
        except (OSError, ValueError) as error:
            raise DataError(f"{checkpoint_dir}: cannot load the model: {error}") from None


def _random_model(config, seed: int, device: torch.device, dtype: torch.dtype):
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    with torch.device(device), _quiet_transformers():
        return LlavaForConditionalGeneration._from_config(config, dtype=dtype)


def _base_dir_for(fmt: str, model_path, model_base, checkpoint_dir: Path) -> Path | None:
    """The base LLM's directory: required for a LoRA checkpoint, refused for any other."""
    if fmt == "lora":
        if model_base is None:
            raise UsageError(f"{model_path} is a LoRA checkpoint: pass --model-base with its base "
                             f"LLM ({_lora_base_hint(checkpoint_dir)})")
        return resolve_checkpoint_dir(model_base, flag="--model-base")
    if model_base is not None:
        raise UsageError(f"--model-base is only for LoRA checkpoints; {model_path} is a complete "
                         f"{fmt}-format checkpoint")
    return None


def _build_weights(fmt: str, checkpoint_dir: Path, config: dict[str, Any], base_dir: Path | None,
                   random_init: bool, seed: int, device: torch.device, dtype: torch.dtype):
    """(the HF LLaVA module, the CLIP directory of an original checkpoint or None, the weights
    checksum): random weights from the configs alone, or the checkpoint's own."""
    clip_dir = None
    if random_init:
        if fmt == "hf":
            from transformers import LlavaConfig

            with _quiet_transformers():
                llava_config = LlavaConfig.from_pretrained(checkpoint_dir)
        else:
            _check_original_config(checkpoint_dir, config)
            llava_config, clip_dir = _original_llava_config(checkpoint_dir, config,
                                                            allow_builtin=True)
        return (_random_model(llava_config, seed, device, dtype), clip_dir,
                random_init_checksum(config, seed, device))
    if fmt == "hf":
        return (_load_hf(checkpoint_dir, device, dtype), None,
                weights_checksum(_labelled("model", checkpoint_dir)))
    hf, clip_dir = _load_original(checkpoint_dir, config, device, dtype, base_dir)
    files = _labelled("model", checkpoint_dir) + _labelled("vision", clip_dir)
    if base_dir is not None:
        files += _labelled("base", base_dir)
    return hf, clip_dir, weights_checksum(files)


def load_model(model_path: str | Path, model_base: str | Path | None = None, *,
               random_init: bool = False, dtype: str | torch.dtype | None = None,
               device: str | torch.device = "auto", seed: int = 0) -> LlavaModel:
    """Load a LLaVA checkpoint of any supported format as a :class:`LlavaModel`.

    ``model_path``: a directory or a cached repo id. ``model_base``: the base LLM of a LoRA
    checkpoint (required for LoRA, refused otherwise). ``random_init``: build the model from
    ``config.json`` alone with random weights drawn after ``torch.manual_seed(seed)`` (for
    benchmarks; recorded in ``identity``). ``dtype``: default float16 on CUDA, float32 on CPU.
    ``device``: ``auto`` = CUDA when available. Weights load straight onto the device in the
    target dtype.
    """
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    checkpoint_dir = resolve_checkpoint_dir(model_path)
    config = read_config(checkpoint_dir)
    fmt = _format_of(checkpoint_dir, config)
    base_dir = _base_dir_for(fmt, model_path, model_base, checkpoint_dir)
    hf, clip_dir, checksum = _build_weights(fmt, checkpoint_dir, config, base_dir, random_init,
                                            seed, device, dtype)

    tokenizer_dir = base_dir if base_dir is not None else checkpoint_dir
    identity = {
        "model_path": str(model_path),
        "model_base": None if model_base is None else str(model_base),
        # Where the files were found, for information (the fingerprints use model_key).
        "checkpoint_dir": str(checkpoint_dir.resolve()),
        "format": fmt,
        "weights_sha256": checksum,
        "tokenizer_sha256": tokenizer_checksum(tokenizer_dir),
        "random_init": bool(random_init),
        "dtype": dtype_name(dtype),
    }
    if random_init:
        identity["seed"] = seed
    mean, std = _image_processor_settings(checkpoint_dir if fmt == "hf" else clip_dir)
    tokenizer = load_tokenizer(tokenizer_dir)
    model = LlavaModel(hf, tokenizer, identity, image_mean=mean, image_std=std,
                       image_mode_default=_image_mode_default(config, fmt))
    # A LoRA checkpoint's language model, and so its generation config, is the base's.
    model.sampling = sampling_defaults(tokenizer_dir)
    return model


def sampling_defaults(checkpoint_dir: Path) -> dict[str, Any]:
    """``top_k`` and ``top_p`` as ``generate()`` resolves them when sampling: the checkpoint's
    ``generation_config.json``, else transformers' GenerationConfig defaults (50 and 1.0)."""
    path = checkpoint_dir / "generation_config.json"
    settings: dict[str, Any] = {}
    if path.is_file():
        try:
            settings = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise DataError(f"{path}: cannot read it: {error}") from None
    top_k, top_p = settings.get("top_k"), settings.get("top_p")
    return {"top_k": DEFAULT_TOP_K if top_k is None else int(top_k),
            "top_p": DEFAULT_TOP_P if top_p is None else float(top_p)}


def checkpoint_num_patches(model_path: str | Path) -> int:
    """Visual tokens per image, ``(image_size // patch_size) ** 2``, from the checkpoint's
    configs alone (no weights are read), so a bad k is refused before the model loads."""
    checkpoint_dir = resolve_checkpoint_dir(model_path)
    config = read_config(checkpoint_dir)
    if _format_of(checkpoint_dir, config) == "hf":
        from transformers import LlavaConfig

        with _quiet_transformers():
            vision = LlavaConfig.from_pretrained(checkpoint_dir).vision_config
    else:
        if "mm_vision_tower" not in config:
            raise DataError(f"{checkpoint_dir}/config.json has no mm_vision_tower")
        vision, _ = _vision_config_for(config["mm_vision_tower"], checkpoint_dir,
                                       allow_builtin=True)
    return (vision.image_size // vision.patch_size) ** 2


def checkpoint_num_layers(model_path: str | Path) -> int | None:
    """Decoder layers of the language model, from the checkpoint's configs alone, so a bad
    --layers is refused before the model loads; None when config.json does not say."""
    checkpoint_dir = resolve_checkpoint_dir(model_path)
    config = read_config(checkpoint_dir)
    if _format_of(checkpoint_dir, config) == "hf":
        from transformers import LlavaConfig

        with _quiet_transformers():
            return LlavaConfig.from_pretrained(checkpoint_dir).text_config.num_hidden_layers
    layers = config.get("num_hidden_layers")
    return int(layers) if layers is not None else None


# --------------------------------------------------------------------------------------------
# Converting to the HF format


def padded_vocab_size(num_tokens: int, multiple: int = VOCAB_MULTIPLE) -> int:
    return int(math.ceil(num_tokens / multiple) * multiple)


def _add_llava_hf_tokens(tokenizer) -> None:
    """Add ``<image>`` and ``<pad>`` (in that order, as llava-hf) where missing; pad = ``<pad>``."""
    from tokenizers import AddedToken

    vocab = tokenizer.get_vocab()
    if IMAGE_TOKEN not in vocab:
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)],
                             special_tokens=True)
    if PAD_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    else:
        tokenizer.pad_token = PAD_TOKEN


def _grow_vocab(model: LlavaModel, rows: int) -> None:
    """Grow the embedding table and head to ``rows``: new embeddings are the mean embedding, new
    head rows are zero (so the added tokens never get a logit above an ordinary one's zero)."""
    embed, head = model.embed_tokens, model.lm_head
    old = embed.weight.data
    if rows <= old.shape[0]:
        return
    tied = head.weight is embed.weight
    grown = torch.empty((rows, old.shape[1]), dtype=old.dtype, device=old.device)
    grown[:old.shape[0]] = old
    grown[old.shape[0]:] = old.float().mean(dim=0).to(old.dtype)
    embed.weight = nn.Parameter(grown, requires_grad=False)
    embed.num_embeddings = rows
    if tied:
        head.weight = embed.weight
    else:
        head_grown = torch.zeros((rows, old.shape[1]), dtype=head.weight.dtype,
                                 device=head.weight.device)
        head_grown[:head.weight.shape[0]] = head.weight.data
        head.weight = nn.Parameter(head_grown, requires_grad=False)
    head.out_features = rows
    model.hf.config.text_config.vocab_size = rows
    model.vocab_size = rows


def write_processor_configs(directory: Path, *, image_size: int, patch_size: int,
                            mean: Iterable[float] = CLIP_MEAN,
                            std: Iterable[float] = CLIP_STD) -> None:
    """``preprocessor_config.json`` + ``processor_config.json`` as llava-hf ships them."""
    preprocessor = {
        "crop_size": {"height": image_size, "width": image_size}, "do_center_crop": True,
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": list(mean), "image_processor_type": "CLIPImageProcessor",
        "image_std": list(std), "processor_class": "LlavaProcessor", "resample": 3,
        "rescale_factor": 1 / 255, "size": {"shortest_edge": image_size},
    }
    processor = {
        "image_token": IMAGE_TOKEN, "num_additional_image_tokens": 1, "patch_size": patch_size,
        "processor_class": "LlavaProcessor", "vision_feature_select_strategy": "default",
    }
    write_json_atomic(directory / "preprocessor_config.json", preprocessor)
    write_json_atomic(directory / "processor_config.json", processor)


def _stored_dtype(checkpoint_dir: Path, config: dict[str, Any]) -> torch.dtype:
    """The dtype a checkpoint was saved in (its config's ``dtype``/``torch_dtype``), else fp32."""
    name = config.get("dtype") or config.get("torch_dtype") or config.get(
        "text_config", {}).get("dtype") or "float32"
    return _DTYPES.get(str(name), torch.float32)


def convert_checkpoint(src: str | Path, dst: str | Path,
                       model_base: str | Path | None = None) -> Path:
    """Save any supported checkpoint as an HF-format one in ``dst`` and return ``dst``.

    Writes the LlavaForConditionalGeneration config and safetensors weights (in the dtype the
    source was stored in), the tokenizer with ``<image>`` and ``<pad>`` added as llava-hf does
    (embedding table padded to a multiple of 64; the new head rows are zero), and the processor
    configs. ``image_aspect_ratio`` and the source's identity are kept in ``config.json``.
    :func:`load_model` on ``dst`` gives the same features and logits as on ``src``.
    """
    dst = Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise UsageError(f"DST {dst} already exists and is not an empty directory")
    source_dir = resolve_checkpoint_dir(src, flag="SRC")
    dtype = _stored_dtype(source_dir, read_config(source_dir))
    model = load_model(src, model_base, dtype=dtype, device="cpu")
    tokenizer = model.tokenizer
    _add_llava_hf_tokens(tokenizer)
    _grow_vocab(model, padded_vocab_size(len(tokenizer)))
    config = model.hf.config
    config.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config.text_config.pad_token_id = tokenizer.pad_token_id
    config.image_aspect_ratio = "pad" if model.image_mode_default == "pad" else "square"
    config.vtkit_converted_from = {k: model.identity[k] for k in
                                   ("model_path", "model_base", "format", "weights_sha256")}
    dst.mkdir(parents=True, exist_ok=True)
    with _quiet_transformers():
        model.hf.save_pretrained(dst)
        tokenizer.save_pretrained(dst)
    set_file_modes(dst)
    write_processor_configs(dst, image_size=model.image_size, patch_size=model.patch_size,
                            mean=model.image_mean, std=model.image_std)
    return dst


# --------------------------------------------------------------------------------------------
# Original-layout state dicts (for writing original-format checkpoints, e.g. the tiny ones)


def original_layout_state_dicts(hf) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split an in-memory LlavaForConditionalGeneration into original-format state dicts.

    Returns ``(llava_weights, clip_weights)``: ``llava_weights`` with the original LLaVA keys
    (``model.layers.*``, ``model.embed_tokens.weight``, ``model.norm.weight``,
    ``lm_head.weight``, ``model.mm_projector.{0,2}.*``) and ``clip_weights`` with the keys of a
    CLIPVisionModel checkpoint as OpenAI's CLIP repos store them (``vision_model.*``).
    """
    weights = {f"model.{k}": v for k, v in hf.model.language_model.state_dict().items()}
    weights["lm_head.weight"] = hf.lm_head.weight
    numbers = {name: index for index, name in _ORIGINAL_PROJECTOR_NAMES.items()}
    for key, value in hf.model.multi_modal_projector.state_dict().items():
        layer, _, param = key.partition(".")
        weights[f"{ORIGINAL_PROJECTOR_PREFIX}{numbers[layer]}.{param}"] = value
    clip = {(k if k.startswith("vision_model.") else f"vision_model.{k}"): v
            for k, v in hf.model.vision_tower.state_dict().items()}
    return weights, clip
