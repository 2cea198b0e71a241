"""What a `--model` spec names, and loading it for evaluation.

A spec is a hub id, `toylab:teacher` / `toylab:student`, a model folder, a PEFT adapter folder (its base
model comes from adapter_config.json and the adapter is merged for generation), or a tropd run folder
(its final model is `student/`). Weights, adapters and tokenizers load through `tropd_cli.models`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tropd_cli.errors import TropdError
from tropd_cli.models import TOYLAB_PREFIX
from tropd_cli.runfolder import RunFolder

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")


@dataclass(frozen=True)
class ModelSource:
    """Where a spec's weights, adapter and tokenizer come from."""

    spec: str
    model: str
    tokenizer: str
    adapter: str | None = None


def resolve_model_source(spec: str) -> ModelSource:
    """Classify a model spec; local folders without weights or without a tokenizer are user errors."""
    if spec.startswith(TOYLAB_PREFIX) or not Path(spec).is_dir():
        if spec.startswith(("/", "./", "../")):
            raise TropdError(f"model folder '{spec}' does not exist")
        return ModelSource(spec, spec, spec)
    folder = Path(spec)
    run = RunFolder(folder)
    if not _has_weights(folder) and _has_weights(run.student):
        folder = run.student  # a tropd run folder
    adapter_config = folder / "adapter_config.json"
    if adapter_config.is_file():
        base = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
        if not base:
            raise TropdError(f"adapter folder '{spec}' names no base_model_name_or_path in adapter_config.json")
        tokenizer = str(folder) if _has_tokenizer(folder) else base
        if Path(tokenizer).is_dir() and not _has_tokenizer(Path(tokenizer)):
            raise TropdError(f"neither adapter folder '{spec}' nor its base '{base}' holds a tokenizer")
        return ModelSource(spec, base, tokenizer, adapter=str(folder))
    if not (folder / "config.json").is_file():
        raise TropdError(f"'{spec}' is not a model folder (no config.json), adapter folder or tropd run folder")
    if not _has_tokenizer(folder):
        raise TropdError(f"model folder '{folder}' has no tokenizer ({' or '.join(TOKENIZER_FILES)}); "
                         f"save one with tokenizer.save_pretrained")
    return ModelSource(spec, str(folder), str(folder))


def _has_weights(folder: Path) -> bool:
    return (folder / "config.json").is_file() or (folder / "adapter_config.json").is_file()


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)
