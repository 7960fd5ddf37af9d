"""Tiny LLaVA checkpoints that vtkit builds itself: the embedded demo model and the test fixtures.

They have the shape family of LLaVA-1.5 (a CLIP tower at 336 px with 14 px patches, so 576
visual tokens; features from the penultimate CLIP layer; a Linear-GELU-Linear projector; a small
Llama decoder) and a small Llama-style sentencepiece tokenizer, so every code path that real
checkpoints take runs on them in seconds on a CPU. :func:`build_tiny_checkpoints` writes the same
random weights in both checkpoint formats vtkit reads:

- ``llava-tiny-hf/``: transformers' ``LlavaForConditionalGeneration`` format (llava-hf style:
  an ``<image>`` and a ``<pad>`` token added to the tokenizer, vocabulary padded to a multiple
  of 64, processor configs);
- ``llava-tiny-orig/``: the original LLaVA layout (``LlavaLlamaForCausalLM`` config with the
  ``mm_*`` fields, ``model.*`` / ``lm_head`` / ``model.mm_projector.{0,2}`` weights in two
  ``pytorch_model-*.bin`` shards with an index, the plain sentencepiece tokenizer);
- ``clip-vit-tiny-patch14-336/``: the vision tower as a ``CLIPVisionModel`` checkpoint (keys
  ``vision_model.*`` like the OpenAI CLIP checkpoints), named by the original config's
  ``mm_vision_tower`` as ``../clip-vit-tiny-patch14-336`` (resolved against the checkpoint
  directory, so the three folders can move together).

The tokenizer in ``vtkit/assets/tiny-tokenizer/`` was made once by :func:`train_tiny_tokenizer`
(byte fallback, so any text encodes) and is copied into each checkpoint.
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch

from vtkit import cache

#: Where the tiny tokenizer lives inside the package.
TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "assets" / "tiny-tokenizer"
#: Sentencepiece vocabulary of the tiny tokenizer (259 of it are <unk>, <s>, </s> and 256 bytes).
TOKENIZER_VOCAB_SIZE = 1024
#: Folder names written by :func:`build_tiny_checkpoints`.
HF_DIRNAME = "llava-tiny-hf"
ORIG_DIRNAME = "llava-tiny-orig"
CLIP_DIRNAME = "clip-vit-tiny-patch14-336"

# The vicuna_v1 / llava_v1 system prompts, the ScienceQA instruction, and ScienceQA-like
# questions: what the tiny tokenizer is trained on, so prompts split into word-sized pieces.
_CORPUS = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions.",
    "A chat between a curious human and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the human's questions.",
    "USER: What is shown in the image? ASSISTANT: The image shows a map of the United States.",
    "Answer with the option's letter from the given choices directly.",
    "Context: Select the best answer.",
    "Context: The diagram below shows a solution with one solute. Each solute particle is "
    "represented by a green ball.",
    "Context: People can use the engineering-design process to develop solutions to problems.",
    "Context: Read the text about an animal. Then answer the question below.",
    "Context: This passage describes the weather in a city. Read the passage and answer the "
    "question.",
    "Context: Figure: Death Valley. Death Valley is a desert in California.",
    "Context: Two magnets are placed as shown. Hint: Magnets that attract pull together. "
    "Magnets that repel push apart.",
    "Context: N/A",
    "Which of the following could Gordon's test show?",
    "Which word would you find on a dictionary page with the following guide words?",
    "Which tense does the sentence use?",
    "Which of these states is farthest north?",
    "Which animal's mouth is also adapted for tearing through meat?",
    "Which property do these three objects have in common?",
    "Which solution has a higher concentration of green particles?",
    "Will these magnets attract or repel each other?",
    "What is the capital of Washington?",
    "What information supports the conclusion that Kate inherited this trait?",
    "Is a pencil a solid, a liquid, or a gas?",
    "Does this passage describe the weather or the climate?",
    "Identify the question that Gordon's experiment can best answer.",
    "Think about the magnetic force between the magnets in each pair. Which of the following "
    "statements is true?",
    "Select the bird below. Select the fish below. Select the amphibian below.",
    "Complete the sentence so that it uses personification.",
    "Which figure of speech is used in this text?",
    "How long is a blue whale? Select the best estimate.",
    "What kind of sentence is this? Is this a run-on sentence?",
    "Compare the motion of two cars. Which car was moving at a higher speed?",
    "Options: (A) Solution A (B) Solution B (C) neither; their concentrations are the same",
    "A. attract",
    "B. repel",
    "A. Arizona",
    "B. Ohio",
    "C. Maine",
    "D. Oregon",
    "E. Florida",
    "A. solid",
    "B. liquid",
    "C. gas",
    "A. the weather",
    "B. the climate",
    "A. hard",
    "B. soft",
    "C. stretchy",
    "D. bumpy",
    "A. Olympia",
    "B. Seattle",
    "C. Spokane",
    "D. Tacoma",
    "A. 25 meters",
    "B. 25 centimeters",
    "C. 25 kilometers",
    "A. true",
    "B. false",
    "The answer is A. The answer is B. The answer is C. The answer is D. The answer is E.",
    "Answer: The answer is A.",
    "Lecture: A solution is made up of two or more substances that are completely mixed. In a"
    " solution, solute particles are mixed into a solvent.",
    "Lecture: Magnets can pull or push on other magnets without touching them. When magnets "
    "attract, they pull together. When magnets repel, they push apart.",
    "Lecture: Scientists sort animals with similar traits into groups. This is called "
    "classification.",
    "Lecture: Weather is what the atmosphere is like at a certain place and time. Climate is "
    "the pattern of weather in a certain place.",
    "Lecture: An organism's common name is the name that people normally call the organism.",
    "Lecture: A material is a type of matter. Wood, glass, metal, and plastic are common "
    "materials.",
    "Lecture: Offspring phenotypes: dominant or recessive? How do you determine an organism's"
    " phenotype?",
    "Lecture: The temperature of a substance depends on the average kinetic energy of the "
    "particles in the substance.",
    "Solution: Look at each animal's mouth. The tiger has a mouth with sharp teeth, which is "
    "adapted for tearing through meat.",
    "Solution: To find the answer, look at the map. Maine is farthest north. Arizona is "
    "farthest south.",
    "Solution: The solution on the right has more solute particles in the same volume, so its"
    " concentration is higher.",
    "The kinetic energy of the particles in a sample of matter increases as the temperature "
    "increases.",
    "Plants make their own food through photosynthesis. They use water, carbon dioxide, and "
    "energy from sunlight.",
    "The map below shows the states and the ocean. Look at the picture and read the question.",
    "Grade 1 grade 2 grade 3 grade 4 grade 5 grade 6 grade 7 grade 8 grade 9 grade 10 grade "
    "11 grade 12",
    "natural science, social science, language science, physics, chemistry, biology, "
    "geography, economics, civics, history, writing, grammar, vocabulary, punctuation, "
    "capitalization, verbs, figurative language",
    "In 1776, the Declaration of Independence was signed; 13 colonies, 50 states, 7 "
    "continents, 5 oceans.",
    "Earth, Mars, Venus, Jupiter, the Sun, the Moon: 3.14 kg, 100 mL, 20 degrees Celsius, 68 "
    "degrees Fahrenheit.",
    "\"Hello!\" said the girl. Why? Because (it rained) [again] - and {then} it stopped; 'yes' "
    "/ 'no' * # @ & % $ + = < > _ ~",
)


def train_tiny_tokenizer(out_dir: Path = TOKENIZER_DIR, corpus: Iterable[str] | None = None,
                         vocab_size: int = TOKENIZER_VOCAB_SIZE) -> Path:
    """Train the tiny Llama-style sentencepiece tokenizer and write it to ``out_dir``.

    Writes ``tokenizer.model`` and a ``tokenizer_config.json`` that sets ``add_bos_token`` (as
    Llama-2 checkpoints ship it; without it transformers 5 adds no BOS). The trainer settings
    follow Llama's (BPE, byte fallback, digits split, no normalisation, a dummy prefix space, ids
    0/1/2 = <unk>/<s>/</s>); one thread and a fixed corpus make the result deterministic.
    Returns ``out_dir``.
    """
    import sentencepiece as spm

    lines = [line for line in (corpus if corpus is not None else _CORPUS) if line]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, allow_whitespace_only_pieces=True,
        character_coverage=1.0, hard_vocab_limit=False, num_threads=1, unk_id=0, bos_id=1,
        eos_id=2, pad_id=-1, minloglevel=2,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache.write_bytes_atomic(out_dir / "tokenizer.model", model.getvalue())
    _write_json(out_dir / "tokenizer_config.json", _llama_tokenizer_config(pad_token=None))
    return out_dir


def _llama_tokenizer_config(pad_token: str | None) -> dict:
    """A tokenizer_config.json as Llama-2 / LLaVA-1.5 checkpoints ship it."""
    return {
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": pad_token, "legacy": False,
        "tokenizer_class": "LlamaTokenizer", "model_max_length": 2048,
        "clean_up_tokenization_spaces": False,
    }


def tiny_config(*, text_hidden_size: int = 64, text_layers: int = 2, text_heads: int = 4,
                text_intermediate_size: int = 176, vision_hidden_size: int = 32,
                vision_layers: int = 3, vision_heads: int = 2, vision_intermediate_size: int = 64,
                image_size: int = 336, patch_size: int = 14,
                tokenizer_vocab_size: int = TOKENIZER_VOCAB_SIZE,
                max_position_embeddings: int = 2048):
    """The HF ``LlavaConfig`` of a tiny LLaVA (defaults: the test/demo checkpoints).

    As in llava-hf, ``<image>`` and ``<pad>`` get the two ids after the sentencepiece vocabulary
    and the text vocabulary is padded to a multiple of 64; the vision features come from the
    penultimate CLIP layer (CLS dropped) and the projector is Linear-GELU-Linear with biases.
    ``image_aspect_ratio`` is ``pad``, as in LLaVA-1.5.
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    from vtkit.model import padded_vocab_size

    image_token_id, pad_token_id = tokenizer_vocab_size, tokenizer_vocab_size + 1
    text = LlamaConfig(
        vocab_size=padded_vocab_size(tokenizer_vocab_size + 2), hidden_size=text_hidden_size,
        intermediate_size=text_intermediate_size, num_hidden_layers=text_layers,
        num_attention_heads=text_heads, num_key_value_heads=text_heads, hidden_act="silu",
        max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=pad_token_id)
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden_size, intermediate_size=vision_intermediate_size,
        num_hidden_layers=vision_layers, num_attention_heads=vision_heads, image_size=image_size,
        patch_size=patch_size, projection_dim=vision_hidden_size, hidden_act="quick_gelu",
        layer_norm_eps=1e-5)
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=image_token_id,
        projector_hidden_act="gelu", vision_feature_layer=-2,
        vision_feature_select_strategy="default", multimodal_projector_bias=True,
        image_seq_length=(image_size // patch_size) ** 2, tie_word_embeddings=False)
    config.image_aspect_ratio = "pad"
    return config


def random_tiny_model(config, seed: int = 0):
    """A LlavaForConditionalGeneration with weights drawn from ``seed`` alone (float32, CPU).

    The weights do not depend on transformers' initialisers: parameters are filled in name
    order, matrices with std 1/sqrt(fan_in), norms near 1, biases near 0, so activations stay
    O(1) and attention patterns are far from uniform. Head rows of the added tokens (``<image>``,
    ``<pad>``, vocabulary padding) are zero, so they never win over an ordinary token by chance.
    """
    from transformers import LlavaForConditionalGeneration

    from vtkit.model import _quiet_transformers

    with _quiet_transformers():
        model = LlavaForConditionalGeneration(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            noise = torch.randn(parameter.shape, generator=generator)
            if name.endswith("bias"):
                value = 0.02 * noise
            elif parameter.ndim == 1 and "class_embedding" not in name:
                value = 1.0 + 0.1 * noise
            elif parameter.ndim == 1 or "embed" in name:
                value = noise
            else:
                value = noise / parameter[0].numel() ** 0.5
            parameter.copy_(value)
        model.lm_head.weight[config.image_token_id:] = 0.0
    return model.eval()


def build_tiny_checkpoints(out_dir: Path, seed: int = 0, config=None) -> dict[str, Path]:
    """Write the random tiny LLaVA in both checkpoint formats plus its CLIP tower under ``out_dir``.

    Returns ``{"hf": out_dir/llava-tiny-hf, "orig": out_dir/llava-tiny-orig,
    "clip": out_dir/clip-vit-tiny-patch14-336}``. Same ``seed`` and ``config`` (default
    :func:`tiny_config`), same files (see :func:`save_tiny_checkpoints`).
    """
    return save_tiny_checkpoints(random_tiny_model(config or tiny_config(), seed), out_dir)


def save_tiny_checkpoints(model, out_dir: Path) -> dict[str, Path]:
    """Write an in-memory tiny LLaVA (random or trained) in both checkpoint formats plus its CLIP
    tower under ``out_dir``, in the dtype its weights have, with the tiny tokenizer.

    Returns ``{"hf": ..., "orig": ..., "clip": ...}`` as :func:`build_tiny_checkpoints`. Both
    formats hold the same weights (the original one without the rows of the two added tokens),
    so they load to identical features and logits.
    """
    from safetensors.torch import save_file

    from vtkit.model import (
        _quiet_transformers,
        dtype_name,
        original_layout_state_dicts,
        write_processor_configs,
    )

    out_dir = Path(out_dir)
    config = model.config
    paths = {"hf": out_dir / HF_DIRNAME, "orig": out_dir / ORIG_DIRNAME,
             "clip": out_dir / CLIP_DIRNAME}
    for path in paths.values():
        path.mkdir(parents=True, exist_ok=True)
    vision = config.vision_config
    sp_vocab = config.image_token_id
    dtype = dtype_name(next(model.parameters()).dtype)

    with _quiet_transformers():
        model.save_pretrained(paths["hf"])
    cache.set_file_modes(paths["hf"])
    _copy_tokenizer(paths["hf"], _llava_hf_tokenizer_config(sp_vocab))
    write_processor_configs(paths["hf"], image_size=vision.image_size,
                            patch_size=vision.patch_size)

    weights, clip_weights = original_layout_state_dicts(model)
    clip_weights = {k: v.contiguous() for k, v in clip_weights.items()}
    with cache.atomic_path(paths["clip"] / "model.safetensors") as tmp:
        save_file(clip_weights, str(tmp), metadata={"format": "pt"})
    _write_json(paths["clip"] / "config.json",
                {"architectures": ["CLIPVisionModel"], **vision.to_dict(),
                 "model_type": "clip_vision_model"})
    write_processor_configs(paths["clip"], image_size=vision.image_size,
                            patch_size=vision.patch_size)
    (paths["clip"] / "processor_config.json").unlink()

    _write_original(paths["orig"], weights, config, sp_vocab, dtype)
    return paths


def _write_original(directory: Path, weights: dict[str, torch.Tensor], config,
                    sp_vocab: int, dtype: str = "float32") -> None:
    """The original LLaVA layout: two .bin shards (projector in the last, as LLaVA saves it)."""
    text, vision = config.text_config, config.vision_config
    weights = {k: (v[:sp_vocab] if k in ("model.embed_tokens.weight", "lm_head.weight") else v)
               .clone().contiguous() for k, v in weights.items()}
    first = {k: v for k, v in weights.items() if k.startswith(("model.embed_tokens.",
                                                                "model.layers.0."))}
    second = {k: v for k, v in weights.items() if k not in first}
    shards = {"pytorch_model-00001-of-00002.bin": first,
              "pytorch_model-00002-of-00002.bin": second}
    for name, shard in shards.items():
        with cache.atomic_path(directory / name) as tmp:
            torch.save(shard, tmp)
    _write_json(directory / "pytorch_model.bin.index.json", {
        "metadata": {"total_size": sum(v.numel() * v.element_size() for v in weights.values())},
        "weight_map": {k: name for name, shard in shards.items() for k in sorted(shard)},
    })
    _write_json(directory / "config.json", {
        "_name_or_path": "vtkit/llava-tiny", "architectures": ["LlavaLlamaForCausalLM"],
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "freeze_mm_mlp_adapter": False,
        "hidden_act": text.hidden_act, "hidden_size": text.hidden_size,
        "image_aspect_ratio": "pad", "initializer_range": 0.02,
        "intermediate_size": text.intermediate_size,
        "max_position_embeddings": text.max_position_embeddings,
        "mm_hidden_size": vision.hidden_size, "mm_patch_merge_type": "flat",
        "mm_projector_lr": None, "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False, "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch", "mm_vision_select_layer": config.vision_feature_layer,
        "mm_vision_tower": f"../{CLIP_DIRNAME}", "model_type": "llava",
        "num_attention_heads": text.num_attention_heads,
        "num_hidden_layers": text.num_hidden_layers,
        "num_key_value_heads": text.num_key_value_heads, "pretraining_tp": 1,
        "rms_norm_eps": text.rms_norm_eps, "rope_scaling": None, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "tokenizer_model_max_length": 2048,
        "tokenizer_padding_side": "right", "torch_dtype": dtype,
        "transformers_version": "4.31.0", "tune_mm_mlp_adapter": False,
        "use_cache": True, "use_mm_proj": True, "vocab_size": sp_vocab,
    })
    # LLaVA-1.5 ships the plain Llama tokenizer with pad = <unk>.
    _copy_tokenizer(directory, _llama_tokenizer_config(pad_token="<unk>"))


def _llava_hf_tokenizer_config(sp_vocab: int) -> dict:
    """llava-hf's tokenizer config: the Llama one plus <image> and <pad> as added tokens."""
    def added(content: str) -> dict:
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False, "special": True}

    config = _llama_tokenizer_config(pad_token="<pad>")
    config["added_tokens_decoder"] = {
        "0": added("<unk>"), "1": added("<s>"), "2": added("</s>"),
        str(sp_vocab): added("<image>"), str(sp_vocab + 1): added("<pad>"),
    }
    return config


def _copy_tokenizer(directory: Path, tokenizer_config: dict) -> None:
    with cache.atomic_path(directory / "tokenizer.model") as tmp:
        shutil.copyfile(TOKENIZER_DIR / "tokenizer.model", tmp)
    _write_json(directory / "tokenizer_config.json", tokenizer_config)


def _write_json(path: Path, document: dict) -> None:
    cache.write_json_atomic(path, document, indent=2)


def write_config_checkpoint(directory: Path, config) -> Path:
    """A checkpoint directory with no weights: config, the tiny tokenizer, processor configs.

    ``load_model(directory, random_init=True)`` builds it with random weights; ``vtkit bench``
    uses this for model shapes far too big to ship (e.g. the LLaVA-1.5-7B shape).
    """
    from vtkit.model import _quiet_transformers, write_processor_configs

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with _quiet_transformers():
        config.save_pretrained(directory)
    _copy_tokenizer(directory, _llava_hf_tokenizer_config(TOKENIZER_VOCAB_SIZE))
    vision = config.vision_config
    write_processor_configs(directory, image_size=vision.image_size, patch_size=vision.patch_size)
    return directory
