"""Model loading in every format, the vision-feature path, convert, random init, tiny checkpoints.

Comparisons across separately loaded models use a 1e-6 tolerance rather than bit equality: on
CPU, weights memory-mapped at different alignments take different SIMD paths, which moves the
last bit. Comparisons within one model (our path vs transformers' stock path) are exact.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vtkit.demo.tiny import (
    TOKENIZER_DIR,
    TOKENIZER_VOCAB_SIZE,
    build_tiny_checkpoints,
    train_tiny_tokenizer,
)
from vtkit.errors import DataError, UsageError
from vtkit.images import preprocess_images
from vtkit.model import (
    convert_checkpoint,
    detect_format,
    load_model,
    original_text_config,
    read_config,
)

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant "
          "gives helpful, detailed, and polite answers to the user's questions.")
PROMPT = (f"{SYSTEM} USER: <image>\nContext: Select the best answer.\nWhich property do these "
          "three objects have in common?\nA. hard\nB. soft\nAnswer with the option's letter from "
          "the given choices directly. ASSISTANT:")
V = TOKENIZER_VOCAB_SIZE  # rows shared by both formats (HF adds <image>, <pad> and padding)
CLOSE = {"rtol": 1e-6, "atol": 1e-6}


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
              for w, h in [(300, 200), (180, 260)]]
    return preprocess_images(images, mode="pad")


@pytest.fixture(scope="module")
def hf_model(tiny_models):
    return load_model(tiny_models["hf"], device="cpu")


@pytest.fixture(scope="module")
def orig_model(tiny_models):
    return load_model(tiny_models["orig"], device="cpu")


def chunk_ids(tokenizer, prompt: str) -> list[list[int]]:
    """LLaVA's tokenizer_image_token: each chunk on its own, one BOS at the very start."""
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
    return [chunks[0]] + [c[1:] if c[:1] == [tokenizer.bos_token_id] else c for c in chunks[1:]]


def next_token_logits(model, pixel_values: torch.Tensor, prompt: str = PROMPT) -> torch.Tensor:
    """Logits after the prompt, image features spliced in as embeddings (works for every format)."""
    before, after = chunk_ids(model.tokenizer, prompt)
    features, _ = model.encode_images(pixel_values)
    image = model.project(features)
    with torch.inference_mode():
        sequence = torch.cat([
            model.embed_tokens(torch.tensor([before] * len(image))), image,
            model.embed_tokens(torch.tensor([after] * len(image)))], dim=1)
        hidden = model.language_model(inputs_embeds=sequence).last_hidden_state
        return model.lm_head(hidden[:, -1])


def test_interface_facts(hf_model, orig_model):
    for model in (hf_model, orig_model):
        assert (model.image_size, model.patch_size, model.num_patches) == (336, 14, 576)
        assert model.vision_feature_layer == -2 and model.image_mode_default == "pad"
        assert model.dtype == torch.float32 and model.device.type == "cpu"
        assert len(model.decoder_layers) == model.num_layers == 2
        assert model.decoder_layers[0].self_attn.o_proj.out_features == model.hidden_size
        assert model.eos_token_id == 2
        assert not model.hf.training
    assert hf_model.identity["format"] == "hf" and orig_model.identity["format"] == "original"
    assert hf_model.pad_token_id == V + 1 and orig_model.pad_token_id == 0  # <pad>, LLaVA's <unk>
    assert hf_model.image_token_id == V
    # the class tokenizer_config.json names, not AutoTokenizer's pick for model_type llava
    for model in (hf_model, orig_model):
        assert type(model.tokenizer).__name__ == "LlamaTokenizer"


def test_features_equal_transformers_stock_path(hf_model, pixels):
    features, cls_attention = hf_model.encode_images(pixels)
    stock = hf_model.hf.get_image_features(pixel_values=pixels)
    assert features.shape == (2, 576, hf_model.vision_hidden_size)
    assert cls_attention.shape == (2, 576)
    assert torch.equal(features, stock.hidden_states[-2][:, 1:])
    assert torch.equal(hf_model.project(features), torch.stack(list(stock.pooler_output)))
    one, _ = hf_model.encode_images(pixels[1:])
    torch.testing.assert_close(one, features[1:], **CLOSE)  # batching changes nothing


def test_hf_and_original_formats_agree(hf_model, orig_model, pixels):
    features_hf, cls_hf = hf_model.encode_images(pixels)
    features_orig, cls_orig = orig_model.encode_images(pixels)
    torch.testing.assert_close(features_orig, features_hf, **CLOSE)
    torch.testing.assert_close(cls_orig, cls_hf, **CLOSE)
    logits_hf = next_token_logits(hf_model, pixels)
    logits_orig = next_token_logits(orig_model, pixels)
    assert logits_orig.shape == (2, V) and logits_hf.shape[1] > V
    torch.testing.assert_close(logits_orig, logits_hf[:, :V], **CLOSE)
    assert (logits_hf[:, V:] == 0).all()  # the added tokens' head rows are zero
    assert logits_hf[0].std() > 0.1 and not torch.allclose(logits_hf[0], logits_hf[1])


def test_spliced_embeddings_match_stock_hf_forward(hf_model, pixels):
    before, after = chunk_ids(hf_model.tokenizer, PROMPT)
    input_ids = torch.tensor([before + [hf_model.image_token_id] * 576 + after])
    with torch.inference_mode():
        stock = hf_model.hf(input_ids=input_ids, pixel_values=pixels[:1]).logits[:, -1]
    torch.testing.assert_close(next_token_logits(hf_model, pixels[:1]), stock, **CLOSE)


def test_cls_attention_matches_eager_attention(tiny_models, hf_model, pixels):
    from transformers import CLIPVisionModel

    eager = CLIPVisionModel.from_pretrained(tiny_models["clip"], attn_implementation="eager")
    with torch.inference_mode():
        attentions = eager(pixels, output_attentions=True).attentions
    # hidden_states[-2] is the output of the second-to-last layer: attentions[-2]
    expected = attentions[-2][:, :, 0, 1:].mean(dim=1)
    _, cls_attention = hf_model.encode_images(pixels)
    torch.testing.assert_close(cls_attention, expected, rtol=1e-5, atol=1e-7)
    self_attention = attentions[-2][:, :, 0, 0].mean(dim=1)
    torch.testing.assert_close(cls_attention.sum(dim=1), 1 - self_attention, rtol=1e-5, atol=1e-6)
    assert cls_attention.dtype == torch.float32
    assert cls_attention.max() > 3 / 576  # far from uniform
    assert not torch.allclose(attentions[-1][:, :, 0, 1:].mean(dim=1), expected, atol=1e-4)


def _write_lora(tmp_path: Path, tiny_models: dict) -> dict[str, Path]:
    """A LLaVA-style LoRA checkpoint on the tiny model, its base LLM, and the merged result.

    Layout as LLaVA's LoRA training saves it: config.json (original format), adapter_config.json
    + adapter weights (peft), non_lora_trainables.bin (the projector, keys
    ``base_model.model.model.mm_projector.*``).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    config = read_config(tiny_models["orig"])
    config["mm_vision_tower"] = str(tiny_models["clip"])  # an absolute tower path this time
    base_dir, lora_dir, merged_dir = (tmp_path / n for n in ("base", "llava-lora", "merged"))
    llm = LlamaForCausalLM.from_pretrained(tiny_models["orig"], config=original_text_config(config))
    llm.save_pretrained(base_dir)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copyfile(tiny_models["orig"] / name, base_dir / name)

    torch.manual_seed(1)
    lora = get_peft_model(llm, LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                        "down_proj"]))
    lora.save_pretrained(lora_dir)
    adapter_config = json.loads((lora_dir / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = "vtkit/tiny-base-llm"
    (lora_dir / "adapter_config.json").write_text(json.dumps(adapter_config))
    (lora_dir / "config.json").write_text(json.dumps(config))
    old = torch.load(next(tiny_models["orig"].glob("*00002*.bin")), weights_only=True)
    projector = {k: v + 0.5 * torch.randn_like(v) for k, v in old.items() if "mm_projector" in k}
    torch.save({f"base_model.model.{k}": v for k, v in projector.items()},
               lora_dir / "non_lora_trainables.bin")

    merged = lora.merge_and_unload()
    merged_dir.mkdir()
    weights = {k: v.clone() for k, v in merged.state_dict().items()} | projector
    torch.save(weights, merged_dir / "pytorch_model.bin")
    (merged_dir / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copyfile(tiny_models["orig"] / name, merged_dir / name)
    return {"base": base_dir, "lora": lora_dir, "merged": merged_dir}


def test_lora_with_model_base_equals_merged_model(tmp_path, tiny_models, orig_model, pixels):
    paths = _write_lora(tmp_path, tiny_models)
    assert detect_format(paths["lora"]) == "lora"
    with pytest.raises(UsageError, match="--model-base.*vtkit/tiny-base-llm"):
        load_model(paths["lora"])
    lora = load_model(paths["lora"], model_base=paths["base"], device="cpu")
    merged = load_model(paths["merged"], device="cpu")
    assert lora.identity["model_base"] == str(paths["base"])
    features, _ = lora.encode_images(pixels)
    torch.testing.assert_close(lora.project(features), merged.project(features), **CLOSE)
    logits = next_token_logits(lora, pixels)
    torch.testing.assert_close(logits, next_token_logits(merged, pixels), **CLOSE)
    assert not torch.allclose(logits, next_token_logits(orig_model, pixels), atol=1e-3)


def test_model_base_is_refused_for_a_complete_checkpoint(tiny_models):
    with pytest.raises(UsageError, match="--model-base"):
        load_model(tiny_models["hf"], model_base=tiny_models["orig"])


def test_convert_round_trip(tmp_path, tiny_models, orig_model, pixels):
    out = convert_checkpoint(tiny_models["orig"], tmp_path / "converted")
    assert detect_format(out) == "hf"
    converted = load_model(out, device="cpu")
    assert converted.image_mode_default == "pad"
    assert converted.tokenizer.convert_tokens_to_ids("<image>") == V
    assert converted.pad_token_id == V + 1 and converted.vocab_size % 64 == 0
    assert chunk_ids(converted.tokenizer, PROMPT) == chunk_ids(orig_model.tokenizer, PROMPT)
    torch.testing.assert_close(converted.encode_images(pixels)[0],
                               orig_model.encode_images(pixels)[0], **CLOSE)
    logits = next_token_logits(converted, pixels)
    torch.testing.assert_close(logits[:, :V], next_token_logits(orig_model, pixels), **CLOSE)
    source = json.loads((out / "config.json").read_text())["vtkit_converted_from"]
    assert source["format"] == "original"
    assert source["weights_sha256"] == orig_model.identity["weights_sha256"]
    with pytest.raises(UsageError, match="DST"):
        convert_checkpoint(tiny_models["orig"], out)


def test_random_init_is_recorded_and_seeded(tiny_models, hf_model):
    first = load_model(tiny_models["hf"], random_init=True, seed=1, device="cpu")
    again = load_model(tiny_models["hf"], random_init=True, seed=1, device="cpu")
    other = load_model(tiny_models["orig"], random_init=True, seed=2, device="cpu")
    assert first.identity["random_init"] is True and first.identity["seed"] == 1
    assert hf_model.identity["random_init"] is False
    assert first.identity["weights_sha256"] != hf_model.identity["weights_sha256"]
    assert first.identity["weights_sha256"] == again.identity["weights_sha256"]
    assert torch.equal(first.lm_head.weight, again.lm_head.weight)
    assert not torch.equal(first.lm_head.weight, hf_model.lm_head.weight)
    assert other.identity["format"] == "original" and other.num_patches == 576


def test_missing_paths_are_named(tmp_path, tiny_models):
    with pytest.raises(DataError, match="nowhere/llava"):
        load_model(tmp_path / "nowhere" / "llava")
    with pytest.raises(DataError, match="nobody/no-such-model"):
        detect_format("nobody/no-such-model")
    broken = tmp_path / "orig-without-tower"
    shutil.copytree(tiny_models["orig"], broken)
    config = read_config(broken)
    config["mm_vision_tower"] = "../no-such-clip"
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(DataError, match="no-such-clip"):
        load_model(broken)
    with pytest.raises(UsageError, match="--dtype"):
        load_model(tiny_models["hf"], dtype="float8")


def test_formats_are_told_apart_by_architectures(tmp_path, tiny_models):
    assert detect_format(tiny_models["hf"]) == "hf"
    assert detect_format(tiny_models["orig"]) == "original"
    assert read_config(tiny_models["orig"])["model_type"] == "llava"  # same as the HF format's
    plain = tmp_path / "llama"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(DataError, match="not a LLaVA checkpoint"):
        detect_format(plain)


def test_cached_repo_id_loads_offline(tmp_path, tiny_models, monkeypatch):
    from huggingface_hub import constants

    snapshot = tmp_path / "models--vtkit--llava-tiny-hf" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_models["hf"], snapshot)
    (tmp_path / "models--vtkit--llava-tiny-hf" / "refs").mkdir()
    (tmp_path / "models--vtkit--llava-tiny-hf" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert detect_format("vtkit/llava-tiny-hf") == "hf"
    model = load_model("vtkit/llava-tiny-hf", device="cpu")
    assert model.identity["model_path"] == "vtkit/llava-tiny-hf"


def test_tiny_checkpoints_are_small_and_deterministic(tmp_path, tiny_models):
    again = build_tiny_checkpoints(tmp_path, seed=0)
    total = sum(f.stat().st_size for d in tiny_models.values() for f in d.iterdir())
    assert total < 4_000_000
    for kind in ("hf", "clip"):
        digest = [hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()
                  for d in (tiny_models[kind], again[kind])]
        assert digest[0] == digest[1]
    assert read_config(tiny_models["orig"])["mm_vision_tower"] == "../clip-vit-tiny-patch14-336"


def test_tiny_tokenizer_is_reproducible_and_tokenizes_prompts(tmp_path, hf_model, orig_model):
    trained = train_tiny_tokenizer(tmp_path / "tokenizer")
    assert (trained / "tokenizer.model").read_bytes() == (TOKENIZER_DIR /
                                                          "tokenizer.model").read_bytes()
    tokenizer = orig_model.tokenizer
    before, after = chunk_ids(tokenizer, PROMPT)
    space = tokenizer.convert_tokens_to_ids("▁")
    assert before[0] == tokenizer.bos_token_id and tokenizer.bos_token_id not in after
    # as with Llama-2 (29871 on both sides of the image): "USER: " ends, "\n..." starts with "▁"
    assert before[-1] == space and after[:2] == [space, tokenizer.convert_tokens_to_ids("<0x0A>")]
    assert tokenizer.unk_token_id not in before + after
    assert len(before) + len(after) < len(PROMPT) / 2  # word-sized pieces, not bytes
    assert tokenizer.decode(after) == PROMPT.split("<image>")[1]
    odd = "naïve 東京 ☃"  # byte fallback: any text encodes, nothing becomes <unk>
    assert tokenizer.unk_token_id not in tokenizer(odd).input_ids
    assert tokenizer.decode(tokenizer(odd).input_ids, skip_special_tokens=True) == odd
    assert chunk_ids(hf_model.tokenizer, PROMPT) == [before, after]


def test_convert_command(tmp_path, tiny_models):
    from typer.testing import CliRunner

    from vtkit.cli.main import app

    runner = CliRunner()
    result = runner.invoke(app, ["convert", str(tiny_models["hf"]), str(tmp_path / "out"),
                                 "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["source"]["format"] == "hf"
    assert detect_format(tmp_path / "out") == "hf"
    missing = runner.invoke(app, ["convert", str(tmp_path / "absent"), str(tmp_path / "x")])
    assert missing.exit_code == 1 and "absent" in missing.stderr
