"""`tropd prepare`: turn a dataset into a prepared folder that `distill` and `evaluate` read.

Stages, each counted in the manifest: read the records (local files and folders, a hub dataset, or a
prompt generator such as the toy lab's), drop empty prompts, format each with the student's chat template
and drop those longer than `data.max_prompt_tokens`, drop exact duplicates (same formatted text, first
kept), and split.
Files and hub datasets split with a shuffle seeded by `data.seed` (train.seed when unset): the first
`round(n * data.eval_fraction)` shuffled prompts go to eval.jsonl in source order, the rest to train.jsonl
in shuffled order, the order `distill` first reads them. A prompt generator's name (`--data toylab`)
records the stream `distill` draws from it for the same seed (the toy lab's: train.steps x
rollout.prompts_per_step training prompts by default) in its order, repeats included (the generator draws
with replacement), and puts the draws of the generator's own held-out split in eval.jsonl: `distill` then
trains on exactly the prompts, and so gives exactly the metrics, of the built-in run.

Everything is computed in memory before anything is written: a bad record leaves no output. The folder is
written atomically. Running the same command again into its own folder resumes instead of failing: the
prompts are kept (same manifest) and only missing teacher-draft shards are generated; a folder holding
anything else needs --overwrite, which starts over.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from tropd_cli import __version__
from tropd_cli.config import RunConfig
from tropd_cli.data import is_generator
from tropd_cli.data.drafts import data_seed, draft_settings, generate_drafts
from tropd_cli.data.generators import get_generator
from tropd_cli.data.prepared import EVAL, FORMAT, FORMAT_VERSION, MANIFEST, TRAIN, PreparedFolder
from tropd_cli.data.records import read_source
from tropd_cli.data.rows import (
    PromptRow,
    format_rows,
    normalise,
    resolve_fields,
    template_reads_thinking,
    tokenizer_fingerprint,
)
from tropd_cli.engine.vllm_engine import vllm_absent
from tropd_cli.errors import TropdError
from tropd_cli.files import OwnedFolder, atomic_write_text, check_output_path, writing
from tropd_cli.models import load_tokenizer

SAMPLE_ROWS = 3


@dataclass
class PrepareRequest:
    """What the command line asks for; the configuration supplies everything else."""

    data: str
    out: Path | None = None
    split: str | None = None
    subset: str | None = None
    prompt_field: str | None = None
    answer_field: str | None = None
    messages_field: str | None = None
    system_prompt: str | None = None  # overrides data.system_prompt
    teacher_drafts: bool = False
    dry_run: bool = False
    overwrite: bool = False
    backend: str | None = None  # what samples the drafts: hf, vllm or server (default teacher.backend)


@dataclass
class PreparedData:
    """The prepared content, in memory: rows, file texts and manifest."""

    train: list[PromptRow]
    eval: list[PromptRow]
    files: dict[str, str]
    manifest: dict[str, Any]


def prepare(config: RunConfig, request: PrepareRequest, preset: str = "PRESET",
            console: Console | None = None) -> PreparedData:
    """Prepare `request.data` for `config`'s student; write the folder (and drafts) unless a dry run."""
    console = console or Console()
    if request.backend is not None and request.backend not in ("hf", "vllm", "server"):
        raise TropdError(f"--backend must be hf, vllm or server, got {request.backend!r}")
    if request.backend is not None and not request.teacher_drafts:
        raise TropdError("--backend chooses what samples the teacher drafts; add --teacher-drafts")
    drafted_by = request.backend or config.teacher.backend
    if request.teacher_drafts and drafted_by == "server" and not config.teacher.url:
        raise TropdError("--backend server asks the teacher's server for the drafts: set teacher.url "
                         "(--set teacher.url=http://HOST:PORT)")
    if request.teacher_drafts and drafted_by == "vllm":
        missing = vllm_absent("--backend vllm" if request.backend else "teacher.backend=vllm")
        if missing:
            raise TropdError(missing)
    if request.out is None and not request.dry_run:
        raise TropdError("pass --out DIR for the prepared folder (or --dry-run to only look)")
    out = request.out
    if out is not None:
        check_output_path(out)  # a file in the way fails before any work; emptiness below
    prepared = build(config, request)
    counts_table(console, prepared.manifest)
    if request.dry_run:
        dry_run_report(console, config, request, prepared)
        return prepared
    assert out is not None
    with OwnedFolder(out, "prepare") as output:
        _write(config, request, prepared, output, preset, console)
    return prepared


def _write(config: RunConfig, request: PrepareRequest, prepared: PreparedData, output: OwnedFolder, preset: str,
           console: Console) -> None:
    """Keep the same prompts or write them whole, then the teacher drafts, holding the folder's lock."""
    out = output.target
    existing = _existing_manifest(out)
    manifest = prepared.manifest
    if existing is not None and not request.overwrite and _without_drafts(existing) == manifest:
        output.lock_in_place()
        say(console, f"{out} already holds these prompts (fingerprint {manifest['fingerprint'][:16]}); keeping them")
        if existing.get("drafts") is not None:
            manifest["drafts"] = existing["drafts"]
    else:
        output.claim(request.overwrite)
        output.replace(lambda folder: _fill_folder(folder, prepared))
    if request.teacher_drafts:
        wanted = draft_settings(config, len(prepared.train), request.backend)
        _check_drafts_resumable(out, manifest.get("drafts"), wanted)
        if manifest.get("drafts") is None:
            manifest["drafts"] = {**wanted, "complete": False}
            _write_manifest(out, manifest)
        manifest["drafts"] = generate_drafts(config, PreparedFolder(out, manifest), console,  # as just written
                                             request.backend)
        _write_manifest(out, manifest)
    say(console, f"prepared folder: {out}  ({len(prepared.train)} train, {len(prepared.eval)} eval, fingerprint "
                 f"{manifest['fingerprint'][:16]})")
    say(console, f"use it with: tropd distill --preset {preset} --set data.prompts={out}")


def build(config: RunConfig, request: PrepareRequest) -> PreparedData:
    """Read, normalise, format, filter, deduplicate and split; the files and manifest, in memory."""
    data = config.data
    seed = data_seed(config)
    system_prompt = data.system_prompt if request.system_prompt is None else request.system_prompt
    tokenizer = load_tokenizer(config.student.model, config.student.trust_remote_code)
    generated = is_generator(request.data)
    if generated:
        if request.split is not None or request.subset is not None:
            raise TropdError(f"--split and --subset choose part of a hub dataset; {request.data} generates its "
                             "prompts")
        rows, source = get_generator(request.data).prepare_rows(config, seed)
        label = request.data
    else:
        source_data = read_source(request.data, request.split, request.subset)
        records = source_data.records
        fields = resolve_fields(request.prompt_field, request.answer_field, request.messages_field,
                                records[0] if records else None)
        rows = normalise(records, fields)
        label = source_data.label
        source = {"data": request.data, "kind": source_data.kind, "split": request.split, "subset": request.subset,
                  "files": source_data.files, "fields": {"prompt": fields.prompt, "messages": fields.messages,
                                                         "answer": fields.answer},
                  "fingerprint": source_data.fingerprint}
    counts = {"read": len(rows)}
    rows = [row for row in rows if not row.is_empty()]
    counts["non_empty"] = len(rows)
    format_rows(rows, tokenizer, system_prompt, data.thinking, config.student.model)
    rows = [row for row in rows if len(row.prompt_ids) <= data.max_prompt_tokens]
    counts["within_max_prompt_tokens"] = len(rows)
    dedupe = data.dedupe if data.dedupe is not None else not generated
    if dedupe:
        rows = drop_duplicates(rows)
    counts["deduplicated"] = len(rows)
    if generated:
        train = [row for row in rows if not row.meta["held_out"]]
        held_out = [row for row in rows if row.meta["held_out"]]
    else:
        train, held_out = split_rows(rows, data.eval_fraction, seed)
    if data.max_train_prompts:
        train = train[:data.max_train_prompts]  # a prefix of the shuffled order: still a seeded sample
    counts.update(train=len(train), eval=len(held_out))
    settings: dict[str, Any] = {"system_prompt": system_prompt, "thinking": data.thinking,
                                "max_prompt_tokens": data.max_prompt_tokens, "dedupe": dedupe,
                                "eval_fraction": data.eval_fraction, "seed": seed,
                                "max_train_prompts": data.max_train_prompts}
    if not train:
        raise TropdError(f"no training prompts left from {label} ({describe_counts(counts, settings)}); "
                         f"{_empty_hint(counts)}")
    files = {name: "".join(json.dumps(row.to_json(), ensure_ascii=False) + "\n" for row in part)
             for name, part in ((TRAIN, train), (EVAL, held_out))}
    hashes = {name: hashlib.sha256(text.encode()).hexdigest() for name, text in files.items()}
    lengths = [len(row.prompt_ids) for row in train + held_out]
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tropd_version": __version__,
        "fingerprint": hashlib.sha256("".join(f"{name} {digest}\n" for name, digest in hashes.items())
                                      .encode()).hexdigest(),
        "source": source,
        "tokenizer": {"name": config.student.model, "sha256": tokenizer_fingerprint(tokenizer),
                      "chat_template": bool(tokenizer.chat_template),
                      "reads_thinking": template_reads_thinking(tokenizer)},
        "settings": settings,
        "counts": counts,
        "prompt_tokens": {"max": max(lengths), "mean": round(sum(lengths) / len(lengths), 2)},
        "files": hashes,
    }
    return PreparedData(train, held_out, files, manifest)


def drop_duplicates(rows: list[PromptRow]) -> list[PromptRow]:
    """The rows whose formatted prompt text was not seen before (the first of each duplicate is kept)."""
    seen: set[str] = set()
    unique = []
    for row in rows:
        if row.prompt_text not in seen:
            seen.add(row.prompt_text)
            unique.append(row)
    return unique


def split_rows(rows: list[PromptRow], eval_fraction: float, seed: int) -> tuple[list[PromptRow], list[PromptRow]]:
    """Seeded split: shuffled training rows, and round(n * eval_fraction) held-out rows in source order."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = round(len(rows) * eval_fraction)
    return [rows[i] for i in order[held:]], [rows[i] for i in sorted(order[:held])]


def stage_labels(settings: dict[str, Any]) -> dict[str, str]:
    """How the counts of the manifest read in tables and messages."""
    return {"read": "read", "non_empty": "non-empty",
            "within_max_prompt_tokens": f"within {settings['max_prompt_tokens']} prompt tokens",
            "deduplicated": "unique" if settings["dedupe"] else "duplicates kept", "train": "train", "eval": "eval"}


def describe_counts(counts: dict[str, int], settings: dict[str, Any]) -> str:
    """`3 read, 3 non-empty, 0 within 8 prompt tokens, ...`"""
    labels = stage_labels(settings)
    return ", ".join(f"{count} {labels[stage]}" for stage, count in counts.items())


def _empty_hint(counts: dict[str, int]) -> str:
    if counts["read"] == 0:
        return "the source has no records"
    if counts["non_empty"] == 0:
        return "every prompt is empty; check --prompt-field or --messages-field"
    if counts["within_max_prompt_tokens"] == 0:
        return "every prompt is too long; raise data.max_prompt_tokens"
    return "every prompt went to eval; lower data.eval_fraction"


def counts_table(console: Console, manifest: dict[str, Any]) -> None:
    table = Table(title="prepare")
    table.add_column("stage")
    table.add_column("prompts", justify="right")
    labels = stage_labels(manifest["settings"])
    for stage, count in manifest["counts"].items():
        table.add_row(labels[stage], str(count))
    console.print(table)


def dry_run_report(console: Console, config: RunConfig, request: PrepareRequest, prepared: PreparedData) -> None:
    """A few training rows and what a real run would write; nothing is written."""
    table = Table(title=f"first {min(SAMPLE_ROWS, len(prepared.train))} training prompts")
    for column in ("id", "prompt", "tokens", "answer"):
        table.add_column(column, overflow="fold")
    for row in prepared.train[:SAMPLE_ROWS]:
        text = row.prompt if row.messages is None else row.messages[-1]["content"]
        table.add_row(row.id, _shorten(text or ""), str(len(row.prompt_ids)), _shorten(row.answer or "-"))
    console.print(table)
    where = request.out or "--out"
    say(console, f"dry run: would write {where}/{TRAIN} ({len(prepared.train)} prompts), {where}/{EVAL} "
                 f"({len(prepared.eval)}) and {where}/{MANIFEST}; nothing was written")
    if request.teacher_drafts:
        drafts = draft_settings(config, len(prepared.train), request.backend)
        say(console, f"dry run: would generate {drafts['prompts']} teacher drafts in {drafts['shards']} shards "
                     f"with {drafts['teacher']} (temperature {drafts['temperature']}, top_p {drafts['top_p']}, up "
                     f"to {drafts['max_new_tokens']} new tokens; {drafts['backend']} backend)")


def say(console: Console, text: str) -> None:
    """One plain line: no highlighting, and long paths never broken across lines."""
    console.print(text, highlight=False, soft_wrap=True)


def _shorten(text: str, width: int = 80) -> str:
    flat = text.replace("\n", " ")
    return flat if len(flat) <= width else flat[:width - 3] + "..."


def _existing_manifest(out: Path) -> dict[str, Any] | None:
    try:
        return PreparedFolder.open(out).manifest if (out / MANIFEST).is_file() else None
    except TropdError:
        return None


def _without_drafts(manifest: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in manifest.items() if key != "drafts"}


def _check_drafts_resumable(out: Path, drafts: dict[str, Any] | None, wanted: dict[str, Any]) -> None:
    """Existing drafts resume only under the settings that made them."""
    if drafts is None:
        return
    made = {"backend": "hf", **drafts}  # drafts made before the backend was recorded came from HF generate
    changed = [f"{key} {made.get(key)!r} there, {value!r} here" for key, value in wanted.items()
               if made.get(key) != value]
    if changed:
        raise TropdError(f"{out} holds teacher drafts made with other settings ({'; '.join(changed)}); pass "
                         f"--overwrite to prepare it again")


def manifest_text(manifest: dict[str, Any]) -> str:
    return json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"


def _write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    atomic_write_text(out / MANIFEST, manifest_text(manifest))


def _fill_folder(folder: Path, prepared: PreparedData) -> None:
    """The prompts and manifest, written into the new folder that replaces `out` whole."""
    with writing(f"the prepared folder {folder}"):
        for name, text in prepared.files.items():
            (folder / name).write_text(text, encoding="utf-8")
        (folder / MANIFEST).write_text(manifest_text(prepared.manifest), encoding="utf-8")
