"""Normalised prompt rows and their chat formatting.

Whatever the source, a prompt becomes one `PromptRow`: `prompt` (a user message) or `messages` (a
conversation cut after its last user turn), an optional `answer`, the `source` file or dataset and
`meta` (where it was read). `format_rows` renders each row with the student's chat template (a system
message first when one is configured and the row has none; `enable_thinking` when asked and the template
reads it) and tokenizes it; the row's `id` is a hash of that exact text, so the same prompt always gets the
same id and exact duplicates share one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

from tropd_cli.data.records import RawRecord
from tropd_cli.errors import TropdError


@dataclass(frozen=True)
class FieldMap:
    """Which record keys hold the prompt (or the conversation) and the gold answer."""

    prompt: str | None = None
    answer: str | None = None
    messages: str | None = None
    answer_required: bool = False  # the user named the answer field, so every record must have it


@dataclass
class PromptRow:
    """One prompt, normalised; `prompt_text`/`prompt_ids` and `id` are filled by `format_rows`."""

    prompt: str | None
    messages: list[dict[str, str]] | None
    answer: str | None
    source: str
    meta: dict[str, Any]
    where: str = ""
    id: str = ""
    prompt_text: str = ""
    prompt_ids: list[int] = field(default_factory=list)

    def is_empty(self) -> bool:
        return not (self.prompt or self.messages)

    def chat(self, system_prompt: str) -> list[dict[str, str]]:
        """The conversation the template renders: the system prompt first when the row has none."""
        turns = list(self.messages) if self.messages is not None else [{"role": "user", "content": self.prompt}]
        if system_prompt and not any(turn["role"] == "system" for turn in turns):
            turns.insert(0, {"role": "system", "content": system_prompt})
        return turns

    def to_json(self) -> dict[str, Any]:
        """The row as written in train.jsonl / eval.jsonl (fixed key order)."""
        row: dict[str, Any] = {"id": self.id}
        if self.messages is not None:
            row["messages"] = self.messages
        else:
            row["prompt"] = self.prompt
        if self.answer is not None:
            row["answer"] = self.answer
        row.update(source=self.source, meta=self.meta, prompt_text=self.prompt_text, prompt_ids=self.prompt_ids)
        return row


def resolve_fields(prompt: str | None, answer: str | None, messages: str | None,
                   first: RawRecord | None) -> FieldMap:
    """The field map: the user's choice, else `prompt` or `messages` and `answer` when the first record has
    them."""
    if prompt is not None and messages is not None:
        raise TropdError("--prompt-field and --messages-field exclude each other; pass one of them")
    if first is None:
        return FieldMap(prompt or ("prompt" if messages is None else None), answer, messages, answer is not None)
    if prompt is None and messages is None:
        if "prompt" in first.values:
            prompt = "prompt"
        elif "messages" in first.values:
            messages = "messages"
        else:
            raise TropdError(f"{first.where}: missing field 'prompt'; {_has(first)} (choose one with "
                             f"--prompt-field or --messages-field)")
    if answer is None:
        return FieldMap(prompt, "answer" if "answer" in first.values else None, messages, False)
    return FieldMap(prompt, answer, messages, True)


def _has(record: RawRecord) -> str:
    return f"the record has: {', '.join(map(str, record.values))}" if record.values else "the record has no fields"


def normalise(records: list[RawRecord], fields: FieldMap) -> list[PromptRow]:
    """Every record as a row (empty prompts included: the pipeline counts and drops them)."""
    return [normalise_record(record, fields) for record in records]


def normalise_record(record: RawRecord, fields: FieldMap) -> PromptRow:
    values, where = record.values, record.where
    key = fields.messages or fields.prompt
    assert key is not None
    if key not in values:
        hint = "--messages-field" if fields.messages else "--prompt-field"
        raise TropdError(f"{where}: missing field '{key}'; {_has(record)} (choose another with {hint})")
    prompt, messages = None, None
    if fields.messages:
        messages = _messages(values[key], key, where)
    else:
        prompt = _text(values[key], key, where)
    answer = None
    if fields.answer is not None:
        if fields.answer not in values and fields.answer_required:
            raise TropdError(f"{where}: missing field '{fields.answer}'; {_has(record)} (choose another with "
                             f"--answer-field)")
        answer = _answer(values.get(fields.answer))
    meta: dict[str, Any] = {"row": record.row}
    if "id" in values and values["id"] is not None and "id" not in (key, fields.answer):
        meta["source_id"] = str(values["id"])
    return PromptRow(prompt, messages, answer, record.source, meta, where)


def _text(value: Any, key: str, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise TropdError(f"{where}: field '{key}' must be text, got {type(value).__name__}")
    return value


def _answer(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float, bool)):
        return str(value)
    return json.dumps(value, ensure_ascii=False)


def _messages(value: Any, key: str, where: str) -> list[dict[str, str]]:
    """A conversation of {role, content} turns, cut after its last user turn (a trailing assistant reply
    is what the student will generate, not part of the prompt)."""
    if value is None or value == "":
        return []
    if isinstance(value, str):  # CSV cells hold the conversation as JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise TropdError(f"{where}: field '{key}' must be a list of {{role, content}} turns, got text that "
                             f"is not JSON") from None
    if not isinstance(value, list) or not all(
            isinstance(turn, dict) and isinstance(turn.get("role"), str) and isinstance(turn.get("content"), str)
            for turn in value):
        raise TropdError(f"{where}: field '{key}' must be a list of {{role, content}} turns with text content")
    turns = [{"role": turn["role"], "content": turn["content"]} for turn in value]
    users = [i for i, turn in enumerate(turns) if turn["role"] == "user"]
    if turns and not users:
        raise TropdError(f"{where}: field '{key}' has no user turn")
    return turns[:users[-1] + 1] if users else []


def template_reads_thinking(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the chat template reads `enable_thinking` (Qwen3-style hybrid reasoning templates do)."""
    return "enable_thinking" in str(tokenizer.chat_template or "")


def format_rows(rows: list[PromptRow], tokenizer: PreTrainedTokenizerBase, system_prompt: str,
                thinking: bool | None, tokenizer_name: str) -> None:
    """Fill `prompt_text`, `prompt_ids` and `id` of every row, in place.

    With a chat template: the template's text ending with the assistant header, tokenized without added
    special tokens (the template writes them). Without one: the plain prompt (the system prompt, if any,
    and a blank line before it), tokenized as the tokenizer does by default (a BOS where it adds one).
    """
    kwargs = {"enable_thinking": thinking} if thinking is not None and template_reads_thinking(tokenizer) else {}
    has_template = bool(tokenizer.chat_template)
    for row in rows:
        if has_template:
            row.prompt_text = tokenizer.apply_chat_template(row.chat(system_prompt), add_generation_prompt=True,
                                                            tokenize=False, **kwargs)
        elif row.messages is not None:
            raise TropdError(f"{row.where}: the tokenizer of {tokenizer_name} has no chat template to format "
                             f"a conversation; map a plain prompt with --prompt-field")
        else:
            row.prompt_text = f"{system_prompt}\n\n{row.prompt}" if system_prompt else str(row.prompt)
        row.id = hashlib.sha256(row.prompt_text.encode()).hexdigest()[:16]
    texts = [row.prompt_text for row in rows]
    encoded = tokenizer(texts, add_special_tokens=not has_template)["input_ids"] if texts else []
    for row, ids in zip(rows, encoded):
        row.prompt_ids = list(ids)


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of what decides a prompt's token ids: the tokenizer's full specification (vocabulary,
    merges, normalizer, pre-tokenizer, added tokens; padding and truncation state left out), its special
    tokens and its chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("padding", None)
        spec.pop("truncation", None)
    else:
        spec = {"vocab": sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])}
    spec["special_tokens"] = tokenizer.special_tokens_map
    spec["chat_template"] = tokenizer.chat_template
    return hashlib.sha256(json.dumps(spec, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
