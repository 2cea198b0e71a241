"""A prepared folder, as `tropd prepare` writes it and `distill` and `evaluate` read it.

    manifest.json    what was prepared from what: source and its fingerprint, tokenizer name and hash,
                     settings, the count after every stage, file hashes, the content `fingerprint`, and
                     the teacher drafts' settings and state when there are drafts
    train.jsonl      training prompts in the order `distill` first reads them, one JSON object a line:
                     id, prompt or messages, answer (when known), source, meta, prompt_text, prompt_ids
    eval.jsonl       held-out prompts in the same form (`tropd evaluate --benchmark custom --data` reads it)
    drafts/          shard-00000.jsonl, ...: one teacher response per training prompt, in train.jsonl's order

`distill` reads train.jsonl pass after pass: the first pass in file order, each later pass in an order
shuffled from train.seed and the pass number, so the prompts of any step are a pure function of the
configuration and the step.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from tropd_cli.data.rows import tokenizer_fingerprint
from tropd_cli.errors import TropdError

MANIFEST = "manifest.json"
TRAIN = "train.jsonl"
EVAL = "eval.jsonl"
DRAFTS = "drafts"
FORMAT = "tropd-prepared"
FORMAT_VERSION = 1


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.jsonl"


@dataclass
class PreparedFolder:
    """An existing prepared folder and its manifest."""

    path: Path
    manifest: dict[str, Any]
    _rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def open(cls, path: str | Path) -> PreparedFolder:
        """Read a prepared folder's manifest; anything else is a one-line user error."""
        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise TropdError(f"{path} is not a folder written by `tropd prepare` (no {MANIFEST})")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise TropdError(f"{manifest_path} is not valid JSON; prepare the folder again") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise TropdError(f"{manifest_path} is not the manifest of a prepared folder")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise TropdError(f"{path} has prepared-folder format {manifest.get('format_version')}; this tropd "
                             f"reads format {FORMAT_VERSION}: prepare it again")
        return cls(path, manifest)

    def rows(self, split: str = "train") -> list[dict[str, Any]]:
        """The rows of train.jsonl or eval.jsonl, read once per folder object."""
        if split not in self._rows:
            file = self.path / (TRAIN if split == "train" else EVAL)
            if not file.is_file():
                raise TropdError(f"{self.path} has no {file.name}; prepare the folder again")
            self._rows[split] = [json.loads(line) for line in file.read_text(encoding="utf-8").split("\n") if line]
        return self._rows[split]

    def train_prompt_ids(self) -> list[list[int]]:
        return [row["prompt_ids"] for row in self.rows("train")]

    def check_tokenizer(self, tokenizer: PreTrainedTokenizerBase, name: str) -> None:
        """The prompts' token ids are only valid for the tokenizer that made them."""
        prepared, current = self.manifest["tokenizer"], tokenizer_fingerprint(tokenizer)
        if current != prepared["sha256"]:
            raise TropdError(f"{self.path} was prepared with another tokenizer (that of {prepared['name']}, sha256 "
                             f"{prepared['sha256'][:12]}) than the student's ({name}, sha256 {current[:12]}); "
                             f"prepare it again with this preset")

    @property
    def drafts(self) -> dict[str, Any] | None:
        """The teacher drafts' settings and state, or None when the folder has none."""
        return self.manifest.get("drafts")

    def shard_path(self, index: int) -> Path:
        return self.path / DRAFTS / shard_name(index)


def pass_order(count: int, seed: int, pass_index: int) -> list[int]:
    """The order of one pass over `count` prompts: file order first, then a shuffle per pass."""
    order = list(range(count))
    if pass_index > 0:
        random.Random(seed * 1_000_003 + pass_index).shuffle(order)
    return order


def prepared_batches(prompts: list[list[int]], per_step: int, seed: int, start_step: int = 0
                     ) -> Iterator[list[list[int]]]:
    """Endless batches of `per_step` prompts from step `start_step` on; a batch may span two passes."""
    position = start_step * per_step
    current, order = -1, []
    while True:
        batch = []
        for _ in range(per_step):
            pass_index, offset = divmod(position, len(prompts))
            if pass_index != current:
                current, order = pass_index, pass_order(len(prompts), seed, pass_index)
            batch.append(prompts[order[offset]])
            position += 1
        yield batch
