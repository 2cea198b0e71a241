"""Resumable checkpoints of a run: `RUN/checkpoints/step-NNNNNN/`, each written atomically (where each file
lies: `runfolder.CheckpointFolder`).

A checkpoint holds `student/` (the student in save_pretrained format with its tokenizer: the whole model,
or the peft adapter), `trainer_state.pt` (optimizer, scheduler, step, the teacher-response cache, and the
Python, NumPy and torch random states; loaded with `torch.load(weights_only=True)`) and `state.json`
(the step, the run summary so far, the resolved configuration with its sha256, and the sha256 of every other
file, checked before a resume or an export reads them). The prompt position needs no saving: the batch of
step i is a pure function of the configuration and i. Only the newest `train.checkpoint_keep` checkpoints
are kept.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tropd_cli.errors import TropdError, first_line
from tropd_cli.files import atomic_folder, atomic_write_json, sha256_of, writing
from tropd_cli.runfolder import CheckpointFolder, RunFolder, RunSummary


class DamagedCheckpoint(TropdError):
    """A checkpoint whose files are missing, unreadable or differ from the sha256 recorded when it was saved."""


def config_sha256(config: dict[str, Any]) -> str:
    """The sha256 of a resolved configuration (its JSON form, keys sorted)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def random_states() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) random states, as weights_only-loadable values."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_random_states(states: dict[str, Any]) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy = states["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["cached"]))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_student(folder: Path, student: torch.nn.Module, tokenizer,
                 weights: dict[str, torch.Tensor] | None = None) -> None:
    """The student in save_pretrained format (the whole model, or the peft adapter) with its tokenizer;
    `weights` is its whole state dict when the student itself holds only a shard (FSDP2)."""
    if weights is None:
        student.save_pretrained(folder)
    else:
        student.save_pretrained(folder, state_dict=weights)
    tokenizer.save_pretrained(folder)


def save_checkpoint(run_dir: Path, step: int, student: torch.nn.Module, tokenizer, trainer_state: dict,
                    summary: RunSummary, keep: int, config: dict[str, Any],
                    weights: dict[str, torch.Tensor] | None = None, random: dict[str, Any] | None = None) -> Path:
    """Write checkpoint `step` atomically with the sha256 of its files, then drop all but the newest `keep`
    (0: keep all). `config` is the resolved configuration the run trains with; `weights` the student's
    whole state dict when it is sharded (the trainer state then holds the whole optimizer state too);
    `random` the random states to resume with (default: the current ones)."""
    run = RunFolder(run_dir)
    target = run.checkpoint(step)

    def fill(folder: Path) -> None:
        checkpoint = CheckpointFolder(folder)
        save_student(checkpoint.student, student, tokenizer, weights)
        torch.save({**trainer_state, "random": random if random is not None else random_states()},
                   checkpoint.trainer_state)
        files = {path.relative_to(folder).as_posix(): sha256_of(path)
                 for path in sorted(folder.rglob("*")) if path.is_file()}
        atomic_write_json(checkpoint.state, {"step": step, "summary": summary.to_json(), "config": config,
                                             "config_sha256": config_sha256(config), "files": files})

    with writing(f"checkpoint {target}"):
        atomic_folder(target, fill)
    if keep:
        for _, old in run.list_checkpoints()[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return target


def verify_checkpoint(folder: Path) -> dict:
    """state.json of a checkpoint whose every listed file is present with its recorded sha256."""
    checkpoint = CheckpointFolder(folder)
    try:
        state = json.loads(checkpoint.state.read_text())
    except (OSError, ValueError) as error:
        raise DamagedCheckpoint(f"checkpoint {folder} is damaged: {checkpoint.state.name} is unreadable "
                                f"({getattr(error, 'strerror', None) or first_line(error)})") from None
    if not isinstance(state, dict):
        raise DamagedCheckpoint(f"checkpoint {folder} is damaged: {checkpoint.state.name} holds no object")
    files = state.get("files")
    listed = files if isinstance(files, dict) else {checkpoint.trainer_state.name: None}  # written before checksums
    for name, digest in listed.items():
        path = folder / name
        if not path.is_file():
            raise DamagedCheckpoint(f"checkpoint {folder} is damaged: {name} is missing")
        if digest is not None and sha256_of(path) != digest:
            raise DamagedCheckpoint(f"checkpoint {folder} is damaged: {name} differs from the sha256 recorded "
                                    f"when it was saved")
    return state


def load_checkpoint(folder: Path) -> tuple[dict, dict]:
    """(state.json, trainer_state.pt) of a verified checkpoint folder; a damaged one is a one-line error."""
    state = verify_checkpoint(folder)
    trainer_state_file = CheckpointFolder(folder).trainer_state
    try:
        trainer_state = torch.load(trainer_state_file, weights_only=True, map_location="cpu")
    except (OSError, ValueError, RuntimeError) as error:
        raise DamagedCheckpoint(f"checkpoint {folder} is damaged: cannot read {trainer_state_file.name} "
                                f"({first_line(error)})") from None
    return state, trainer_state


def restore_adapter(student: torch.nn.Module, adapter_folder: Path) -> None:
    """Load a saved peft adapter's weights into a student built with the same LoRA settings."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(adapter_folder / "adapter_model.safetensors")
    result = set_peft_model_state_dict(student, weights)
    missing = [key for key in result.missing_keys if "lora_" in key]
    if missing:
        raise TropdError(f"checkpoint adapter {adapter_folder} does not match student.lora "
                         f"(missing {missing[0]}); resume with the run's own config.yaml")
