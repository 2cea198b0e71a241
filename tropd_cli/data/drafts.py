"""Teacher drafts: one teacher response per training prompt, generated once by `tropd prepare
--teacher-drafts` and read by `distill`'s guidance and `sft` instead of sampling them in the run.

Drafts are sampled with the preset's rollout settings (temperature, top_p, max_new_tokens; DESIGN.md §1
item 4 wants y ~ pi_T) by the teacher's sampler (`--backend`, default teacher.backend: HF generate on the teacher
loaded here, a vLLM engine, or the teacher's server), in shards of
`data.draft_shard_size` prompts in train.jsonl's order. Shard k is sampled with a seed made from the data
seed and k, and written atomically when it is complete, so an interrupted prepare resumes at the missing
shards and the result is the same as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from tropd_cli.config import RunConfig
from tropd_cli.data.prepared import DRAFTS, PreparedFolder
from tropd_cli.engine.guidance import TeacherResponse
from tropd_cli.engine.rollout import SamplingParams
from tropd_cli.engine.seeds import Stream, step_seed
from tropd_cli.errors import Interrupted, TropdError
from tropd_cli.files import atomic_write_text
from tropd_cli.models import load_causal_lm, load_tokenizer, pick_device, stop_token_ids


def data_seed(config: RunConfig) -> int:
    """data.seed, or train.seed when it is not set."""
    return config.train.seed if config.data.seed is None else config.data.seed


def draft_settings(config: RunConfig, prompts: int, backend: str | None = None) -> dict[str, Any]:
    """What decides the drafts, `backend` (prepare's --backend) or teacher.backend sampling them among them; a
    folder's drafts resume only under the same settings."""
    size = config.data.draft_shard_size
    return {"teacher": config.teacher.model, "backend": backend or config.teacher.backend,
            "temperature": config.rollout.temperature,
            "top_p": config.rollout.top_p, "max_new_tokens": config.rollout.max_new_tokens,
            "seed": data_seed(config), "shard_size": size, "prompts": prompts, "shards": math.ceil(prompts / size)}


class DraftRateColumn(ProgressColumn):
    """Prompts and response tokens per second of the drafts so far."""

    def render(self, task: Task) -> Text:
        elapsed = task.finished_time if task.finished else task.elapsed
        done = task.completed - task.fields["resumed"]
        if not elapsed or done <= 0:
            return Text("- prompts/s", style="progress.data.speed")
        return Text(f"{done / elapsed:.0f} prompts/s {task.fields['tokens'] / elapsed:.0f} tok/s",
                    style="progress.data.speed")


def shard_rows(folder: PreparedFolder, index: int, ids: list[str], raw: bytes | None = None
               ) -> list[dict[str, Any]] | None:
    """A shard's lines when the shard exists and answers exactly `ids`, else None (to be generated);
    `raw` is the shard's bytes when already read."""
    path = folder.shard_path(index)
    if raw is None:
        if not path.is_file():
            return None
        raw = path.read_bytes()
    try:
        lines = [json.loads(line) for line in raw.decode("utf-8").split("\n") if line]
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return lines if [line.get("id") for line in lines] == ids else None


def shard_chunks(rows: list[dict[str, Any]], size: int) -> list[list[dict[str, Any]]]:
    """The training rows each shard answers, in order."""
    return [rows[start:start + size] for start in range(0, len(rows), size)]


def generate_drafts(config: RunConfig, folder: PreparedFolder, console: Console, backend: str | None = None
                    ) -> dict[str, Any]:
    """Generate every missing shard of `folder`'s drafts with the teacher's `backend` (hf, vllm or server; default
    teacher.backend); return the drafts' manifest entry, complete."""
    rows = folder.rows("train")
    settings = draft_settings(config, len(rows), backend)
    size = settings["shard_size"]
    chunks = shard_chunks(rows, size)
    missing = [k for k, chunk in enumerate(chunks) if shard_rows(folder, k, [row["id"] for row in chunk]) is None]
    if missing:
        _generate(config, folder, chunks, missing, console, backend or config.teacher.backend)
    else:
        console.print(f"all {len(rows)} teacher drafts are already in {folder.path / DRAFTS}", highlight=False,
                      soft_wrap=True)
    digest = hashlib.sha256()
    tokens = finished = 0
    for k in range(len(chunks)):
        raw = folder.shard_path(k).read_bytes()
        digest.update(raw)
        for line in shard_rows(folder, k, [row["id"] for row in chunks[k]], raw) or []:
            tokens += len(line["response_ids"])
            finished += line["finished"]
    return {**settings, "complete": True, "response_tokens": tokens, "finished": finished,
            "fingerprint": digest.hexdigest()}


def _generate(config: RunConfig, folder: PreparedFolder, chunks: list[list[dict[str, Any]]], missing: list[int],
              console: Console, backend_kind: str) -> None:

    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    from tropd_cli.engine.teacher.sampling import teacher_sampler

    tokenizer = load_tokenizer(config.student.model, config.student.trust_remote_code)
    if backend_kind == "vllm":  # the engine's length against every prompt still to draft, before it starts
        from tropd_cli.preflight.pairs import engine_length_check

        longest = max((len(row["prompt_ids"]) for k in missing for row in chunks[k]), default=0)
        too_short = engine_length_check(config, longest, None).error
        if too_short:
            raise TropdError(too_short)
    device = pick_device(config.train.device)
    teacher = None
    if backend_kind == "hf":
        with console.status(f"loading teacher {config.teacher.model}"):
            teacher = load_causal_lm(config.teacher.model, config.teacher.dtype, device,
                                     quantization=config.teacher.quantization, trainable=False,
                                     trust_remote_code=config.teacher.trust_remote_code)
    with console.status(f"starting the teacher's {backend_kind} sampler"):
        backend = teacher_sampler(config, backend_kind, stop_token_ids(config.student.model, tokenizer),
                                  tokenizer.pad_token_id, device, teacher=teacher, in_run=False)
    params = SamplingParams(config.rollout.max_new_tokens, config.rollout.temperature, config.rollout.top_p)
    seed = data_seed(config)
    total = sum(len(chunk) for chunk in chunks)
    resumed = total - sum(len(chunks[k]) for k in missing)
    if resumed:
        console.print(f"resuming teacher drafts: {len(chunks) - len(missing)} of {len(chunks)} shards are done",
                      highlight=False, soft_wrap=True)
    progress = Progress(TextColumn("[bold]drafts"), BarColumn(bar_width=16), MofNCompleteColumn(), DraftRateColumn(),
                        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console)
    done = len(chunks) - len(missing)
    try:
        with progress:
            task = progress.add_task("drafts", total=total, completed=resumed, resumed=resumed, tokens=0)
            tokens = 0
            for k in missing:
                chunk = chunks[k]
                sampled = backend.generate([row["prompt_ids"] for row in chunk], 1, params,
                                           step_seed(seed, k, Stream.TEACHER_DRAFT))
                texts = tokenizer.batch_decode(sampled.response_ids, skip_special_tokens=True)
                lines = [json.dumps({"id": row["id"], "response_ids": response, "finished": ended, "response": text},
                                    ensure_ascii=False) + "\n"
                         for row, response, ended, text in zip(chunk, sampled.response_ids, sampled.finished, texts)]
                atomic_write_text(folder.shard_path(k), "".join(lines))
                done += 1
                tokens += sum(len(response) for response in sampled.response_ids)
                progress.update(task, advance=len(chunk), tokens=tokens)
    except KeyboardInterrupt:
        raise Interrupted(f"teacher drafts interrupted with {done} of {len(chunks)} shards written in "
                          f"{folder.path / DRAFTS}; run the same command again to generate the rest") from None


class PreparedTeacherResponses:
    """The teacher responses of a prepared folder's drafts, looked up by prompt token ids (the
    `TeacherResponses` seam of guidance and `sft`)."""

    def __init__(self, responses: dict[tuple[int, ...], TeacherResponse], where: str) -> None:
        self.responses = responses
        self.where = where

    @classmethod
    def from_folder(cls, folder: PreparedFolder, teacher: str) -> PreparedTeacherResponses:
        """Every draft of a folder whose drafts are complete and come from `teacher`."""
        drafts = folder.drafts
        assert drafts is not None
        if not drafts.get("complete"):
            done = sum(folder.shard_path(k).is_file() for k in range(drafts["shards"]))
            raise TropdError(f"{folder.path} has {done} of {drafts['shards']} teacher-draft shards; finish them by "
                             f"running its `tropd prepare ... --teacher-drafts` command again")
        if drafts["teacher"] != teacher:
            raise TropdError(f"the teacher drafts of {folder.path} come from {drafts['teacher']}, not from "
                             f"teacher.model {teacher}; prepare drafts with this teacher")
        responses: dict[tuple[int, ...], TeacherResponse] = {}
        for k, chunk in enumerate(shard_chunks(folder.rows("train"), drafts["shard_size"])):
            lines = shard_rows(folder, k, [row["id"] for row in chunk])
            if lines is None:
                raise TropdError(f"{folder.shard_path(k)} is missing or does not match train.jsonl; prepare the "
                                 f"folder again")
            for row, line in zip(chunk, lines):
                responses.setdefault(tuple(row["prompt_ids"]), TeacherResponse(line["response_ids"], line["finished"]))
        return cls(responses, str(folder.path))

    def __call__(self, prompt_ids: list[list[int]]) -> list[TeacherResponse]:
        try:
            return [self.responses[tuple(ids)] for ids in prompt_ids]
        except KeyError:
            raise TropdError(f"a prompt has no teacher draft in {self.where}") from None
