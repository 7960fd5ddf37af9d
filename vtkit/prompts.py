"""What the model sees: conversation templates, prompt text and token ids
(docs/protocol.md section 3).

The text follows LLaVA's ``model_vqa_science.py`` and ``conversation.py``; the ids follow
``tokenizer_image_token`` in ``mm_utils.py``: the prompt is cut at ``<image>``, each piece is
tokenized on its own, and the image placeholder ``IMAGE_TOKEN_INDEX`` (-200) goes between them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vtkit.data import IMAGE_TOKEN, Question, first_questions, load_question_file, select_questions
from vtkit.defaults import (
    DEFAULT_CONV_MODE,
    DEFAULT_NUM_SAMPLES,
    DEFAULT_SINGLE_PRED_PROMPT,
    DEFAULT_SPLIT,
)
from vtkit.errors import DataError, UsageError

#: LLaVA's placeholder id for the image in input_ids; the model splices the visual tokens there.
IMAGE_TOKEN_INDEX = -200
SINGLE_PRED_PROMPT = "Answer with the option's letter from the given choices directly."


@dataclass(frozen=True)
class Conversation:
    """A LLaVA conversation template with separator style "two" (the LLaVA-1.5 templates).

    Rendered for one user turn: ``system + sep``, ``USER: message + sep``, then ``ASSISTANT:``
    (the empty assistant turn the model completes; no trailing space). ``sep2`` closes
    assistant turns, so generation stops at it.
    """

    name: str
    system: str
    roles: tuple[str, str]
    sep: str = " "
    sep2: str = "</s>"

    def prompt(self, message: str) -> str:
        user, assistant = self.roles
        return f"{self.system}{self.sep}{user}: {message}{self.sep}{assistant}:"


# Strings as in LLaVA's llava/conversation.py (conv_vicuna_v1, conv_llava_v1).
_VICUNA_V1 = Conversation(
    name="vicuna_v1",
    system="A chat between a curious user and an artificial intelligence assistant. "
           "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    roles=("USER", "ASSISTANT"),
)
_LLAVA_V1 = Conversation(
    name="llava_v1",
    system="A chat between a curious human and an artificial intelligence assistant. "
           "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    roles=("USER", "ASSISTANT"),
)

#: ``--conv-mode`` values; ``v1`` is LLaVA's alias of ``vicuna_v1``.
CONV_TEMPLATES: dict[str, Conversation] = {
    "vicuna_v1": _VICUNA_V1,
    "v1": _VICUNA_V1,
    "llava_v1": _LLAVA_V1,
}


def get_conv_template(mode: str) -> Conversation:
    """The template for ``--conv-mode``; an unknown mode is a UsageError listing the known ones."""
    try:
        return CONV_TEMPLATES[mode]
    except KeyError:
        raise UsageError(f"unknown --conv-mode {mode!r}; known: "
                         f"{', '.join(CONV_TEMPLATES)}") from None


def question_text(question: Question, single_pred_prompt: bool) -> str:
    """The user message: LLaVA's ``qs`` (also its ``cur_prompt``, the "prompt" of answer files).

    ``<image>`` is removed from the human turn wherever it was and, for image questions, put
    first on its own line; the single-prediction instruction goes on a last line.
    """
    text = question.text.replace(IMAGE_TOKEN, "").strip()
    if question.has_image:
        text = f"{IMAGE_TOKEN}\n{text}"
    if single_pred_prompt:
        text = f"{text}\n{SINGLE_PRED_PROMPT}"
    return text


def build_prompt(question: Question, conv_mode: str, single_pred_prompt: bool) -> str:
    """The full prompt text: system prompt, user turn and the open assistant turn."""
    return get_conv_template(conv_mode).prompt(question_text(question, single_pred_prompt))


def tokenize_prompt(prompt: str, tokenizer: Any) -> list[int]:
    """Token ids of ``prompt`` with ``IMAGE_TOKEN_INDEX`` where ``<image>`` was.

    Each piece between ``<image>`` markers is tokenized on its own, as LLaVA does: the
    SentencePiece tokenizer then puts its leading-space token (29871 for Llama) at the start of
    every piece, and the model was trained on exactly those ids, so tokenizing the whole string
    once would feed it a different sequence. Only one BOS is kept, at the very start; it is
    added if the tokenizer did not add one (transformers 5 drops BOS for some tokenizer configs).
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    ids: list[int] = [] if bos is None else [bos]
    for index, chunk in enumerate(prompt.split(IMAGE_TOKEN)):
        chunk_ids = list(tokenizer(chunk).input_ids)
        if bos is not None and chunk_ids[:1] == [bos]:
            chunk_ids = chunk_ids[1:]
        if index > 0:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(chunk_ids)
    return ids


@dataclass(frozen=True)
class PromptRecord:
    """One line of ``vtkit prompts`` output: what the model sees for one question."""

    question_id: str
    prompt: str
    input_ids: list[int]


def build_prompt_records(questions: Sequence[Question], tokenizer: Any, conv_mode: str,
                         single_pred_prompt: bool) -> list[PromptRecord]:
    """Prompt text and token ids for each question, in order."""
    get_conv_template(conv_mode)
    records = []
    for question in questions:
        prompt = build_prompt(question, conv_mode, single_pred_prompt)
        records.append(PromptRecord(question.question_id, prompt,
                                    tokenize_prompt(prompt, tokenizer)))
    return records


@dataclass
class PromptsConfig:
    """What ``vtkit prompts`` needs: where the questions and tokenizer are, how to render."""

    tokenizer: str
    output: Path
    question_file: Path | None = None
    base_dir: Path | None = None
    split: str = DEFAULT_SPLIT
    conv_mode: str = DEFAULT_CONV_MODE
    single_pred_prompt: bool = DEFAULT_SINGLE_PRED_PROMPT
    num_samples: int = DEFAULT_NUM_SAMPLES


def write_prompts(config: PromptsConfig) -> list[PromptRecord]:
    """Render and tokenize the selected questions and write them as JSON lines.

    Each line: ``{"question_id", "prompt", "input_ids"}`` (the image as -200). Questions come
    from ``question_file``, else from the base dir as :func:`vtkit.data.select_questions`
    resolves them (images are not needed and not checked).
    """
    get_conv_template(config.conv_mode)
    if config.question_file is not None:
        questions = first_questions(load_question_file(config.question_file),
                                    config.num_samples)
    elif config.base_dir is not None:
        questions = select_questions(config.base_dir, split=config.split,
                                     num_samples=config.num_samples,
                                     check_images=False).questions
    else:
        raise UsageError("give --question-file, or --base-dir (or SCIENCEQA_DIR)")
    if not questions:
        raise DataError(f"no questions in {config.question_file}")
    from vtkit.model import load_tokenizer  # heavy import; only commands that tokenize pay it

    tokenizer = load_tokenizer(config.tokenizer)
    records = build_prompt_records(questions, tokenizer, config.conv_mode,
                                   config.single_pred_prompt)
    output = Path(config.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    from vtkit.cache import write_text_atomic

    write_text_atomic(output, "".join(json.dumps(asdict(record)) + "\n" for record in records))
    return records
