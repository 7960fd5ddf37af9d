"""Prompt text, conversation templates and chunk-wise tokenization
(docs/protocol.md section 3)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from vtkit.cli.main import app
from vtkit.data import Question, build_question_entries, load_question_file, write_question_file
from vtkit.errors import UsageError
from vtkit.prompts import (
    CONV_TEMPLATES,
    IMAGE_TOKEN_INDEX,
    SINGLE_PRED_PROMPT,
    build_prompt,
    build_prompt_records,
    get_conv_template,
    question_text,
    tokenize_prompt,
)

runner = CliRunner()
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The "
                 "assistant gives helpful, detailed, and polite answers to the user's questions.")
LLAVA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The "
                "assistant gives helpful, detailed, and polite answers to the human's questions.")


@pytest.fixture(scope="module")
def vectors(reference_data) -> list[dict]:
    lines = (reference_data / "vectors" / "prompts_vicuna_v1.jsonl").read_text()
    return [json.loads(line) for line in lines.splitlines()]


@pytest.fixture(scope="module")
def real_questions(reference_data) -> dict[str, Question]:
    path = reference_data / "scienceqa" / "llava_test_CQM-A.json"
    return {q.question_id: q for q in load_question_file(path)}


def test_all_24_vectors_text_and_ids(vectors, real_questions, llama2_tokenizer):
    assert len(vectors) == 24
    for vector in vectors:
        question = real_questions[vector["question_id"]]
        prompt = build_prompt(question, vector["conv_mode"], vector["single_pred_prompt"])
        assert prompt == vector["prompt"], vector["question_id"]
        assert tokenize_prompt(prompt, llama2_tokenizer) == vector["input_ids"], \
            vector["question_id"]


def test_templates_hold_the_original_strings():
    assert CONV_TEMPLATES["vicuna_v1"].system == VICUNA_SYSTEM
    assert CONV_TEMPLATES["v1"] == CONV_TEMPLATES["vicuna_v1"]
    assert CONV_TEMPLATES["llava_v1"].system == LLAVA_SYSTEM
    question = Question("1", "Which?\nA. x\nB. y", None, "A")
    assert build_prompt(question, "llava_v1", False) == (
        f"{LLAVA_SYSTEM} USER: Which?\nA. x\nB. y ASSISTANT:")


def test_unknown_conv_mode_lists_known_modes():
    with pytest.raises(UsageError, match="--conv-mode.*vicuna_v1, v1, llava_v1"):
        get_conv_template("vicuna_v2")


def test_question_text_moves_the_image_first_and_appends_the_instruction():
    qcm_lea = Question("5", "Which?\nContext: N/A\nOptions: (A) x (B) y\n<image>", "5/image.png")
    assert question_text(qcm_lea, False) == "<image>\nWhich?\nContext: N/A\nOptions: (A) x (B) y"
    text_only = Question("6", "  Which?\nA. x  ", None)
    assert question_text(text_only, True) == f"Which?\nA. x\n{SINGLE_PRED_PROMPT}"


def test_image_placeholder_sits_between_two_leading_space_tokens(llama2_tokenizer):
    question = Question("5", "<image>\nWhich?\nA. x\nB. y", "5/image.png")
    ids = tokenize_prompt(build_prompt(question, "vicuna_v1", True), llama2_tokenizer)
    assert ids[0] == llama2_tokenizer.bos_token_id and ids.count(1) == 1
    at = ids.index(IMAGE_TOKEN_INDEX)
    assert ids.count(IMAGE_TOKEN_INDEX) == 1
    assert ids[at - 4:at + 3] == [3148, 1001, 29901, 29871, IMAGE_TOKEN_INDEX, 29871, 13]


class _NoBosTokenizer:
    """Stands in for a tokenizer whose config does not add BOS (transformers 5 pitfall)."""

    bos_token_id = 1

    def __call__(self, text):
        class Encoding:
            input_ids = [100 + len(word) for word in text.split()]
        return Encoding()


def test_bos_is_added_once_even_when_the_tokenizer_does_not():
    ids = tokenize_prompt("a bb<image>ccc<image>", _NoBosTokenizer())
    assert ids == [1, 101, 102, IMAGE_TOKEN_INDEX, 103, IMAGE_TOKEN_INDEX]


def test_records_keep_question_order(llama2_tokenizer):
    questions = [Question("b", "Q1?\nA. x"), Question("a", "<image>\nQ2?\nA. y", "a/image.png")]
    records = build_prompt_records(questions, llama2_tokenizer, "v1", True)
    assert [r.question_id for r in records] == ["b", "a"]
    assert IMAGE_TOKEN_INDEX not in records[0].input_ids
    assert IMAGE_TOKEN_INDEX in records[1].input_ids


# ----------------------------------------------------------------------------- CLI

def test_cli_prompts_reproduces_the_vectors(vectors, real_questions, reference_data, tmp_path):
    wanted = {v["question_id"] for v in vectors}
    entries = [e for e in json.loads(
        (reference_data / "scienceqa/llava_test_CQM-A.json").read_text()) if e["id"] in wanted]
    question_file = write_question_file(entries, tmp_path / "q.json")
    output = tmp_path / "prompts.jsonl"
    # --tokenizer falls back to --model-path.
    result = runner.invoke(app, [
        "prompts", "--question-file", str(question_file), "--output", str(output),
        "--model-path", str(reference_data / "tokenizer/llama2")])
    assert result.exit_code == 0, result.stderr
    records = {r["question_id"]: r for r in map(json.loads, output.read_text().splitlines())}
    assert len(records) == 24
    for vector in vectors:
        record = records[vector["question_id"]]
        assert set(record) == {"question_id", "prompt", "input_ids"}
        assert record["prompt"] == vector["prompt"]
        assert record["input_ids"] == vector["input_ids"]


def test_cli_prompts_seed_setting_llava_v1_qcm_lea(reference_data, tmp_path):
    problem = {"question": "Which?", "choices": ["x", "y"], "answer": 0, "hint": "",
               "image": "image.png", "lecture": "L.", "solution": "S."}
    question_file = write_question_file(
        build_question_entries({"9": problem}, ["9"], "QCM-LEA"), tmp_path / "q.json")
    output = tmp_path / "p.jsonl"
    result = runner.invoke(app, [
        "prompts", "--question-file", str(question_file), "--output", str(output),
        "--tokenizer", str(reference_data / "tokenizer/llama2"), "--conv-mode", "llava_v1",
        "--no-single-pred-prompt"])
    assert result.exit_code == 0, result.stderr
    record = json.loads(output.read_text())
    assert record["prompt"] == (f"{LLAVA_SYSTEM} USER: <image>\nWhich?\nContext: N/A\n"
                                "Options: (A) x (B) y ASSISTANT:")
    assert record["input_ids"].count(IMAGE_TOKEN_INDEX) == 1


def test_cli_prompts_unknown_conv_mode(tmp_path):
    result = runner.invoke(app, ["prompts", "--question-file", str(tmp_path / "q.json"),
                                 "--output", str(tmp_path / "o"), "--conv-mode", "chatml"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: Invalid value for '--conv-mode'")
    assert "'chatml' is not one of 'vicuna_v1', 'v1', 'llava_v1'" in result.stderr


def test_cli_prompts_bad_tokenizer(reference_data, tmp_path):
    result = runner.invoke(app, [
        "prompts", "--question-file", str(reference_data / "scienceqa/llava_test_CQM-A.json"),
        "--output", str(tmp_path / "o"), "--tokenizer", str(tmp_path / "none"),
        "--num-samples", "1"])
    assert result.exit_code == 1
    assert "tokenizer" in result.stderr and str(tmp_path / "none") in result.stderr


def test_cli_prompts_help():
    result = runner.invoke(app, ["prompts", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for flag in ("--question-file", "--tokenizer", "--conv-mode", "--single-pred-prompt",
                 "--num-samples", "--output", "--base-dir", "Example"):
        assert flag in result.stdout
