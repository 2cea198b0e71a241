"""A command that succeeds prints nothing on stderr that tropd did not write.

Each command runs as a user runs it (a subprocess, Python's default warning filters, the hub offline) on the toy
lab, and its stderr must hold no line but tropd's own (`error:` and `stopped:` lines, which a success never
prints). A new release of a dependency that starts logging (a deprecation, a hub notice, a progress bar) fails
here with its text, instead of reaching every user's terminal.
"""

import os
import subprocess
import sys

import pytest

# What tropd itself writes on stderr (cli.main): a failure's or a stop's one line.
TROPD_PREFIXES = ("error: ", "stopped: ")
TINY = ["--set", "train.steps=2", "--set", "rollout.prompts_per_step=2", "--set", "rollout.n=2",
        "--set", "rollout.max_new_tokens=8", "--set", "eval.problems=4"]


def tropd(*argv: str, cwd) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONWARNINGS", "TROPD_DEBUG")}
    return subprocess.run([sys.executable, "-m", "tropd_cli", *argv], capture_output=True, text=True, cwd=cwd,
                          timeout=300, env={**env, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})


def foreign_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith(TROPD_PREFIXES)]


def test_foreign_lines_are_told_apart() -> None:
    stderr = ("error: unknown preset 'x'\nSkipping publisher trust check for 'k' because Hugging Face Hub is in "
              "offline mode.\n\nstopped: interrupted\n")
    assert foreign_lines(stderr) == ["Skipping publisher trust check for 'k' because Hugging Face Hub is in "
                                     "offline mode."]


def test_stderr_without_drops_only_the_named_lines_even_on_failure(capfd) -> None:
    from tropd_cli.engine.vllm_engine import stderr_without

    with pytest.raises(RuntimeError), stderr_without(("NUMA binding",)):
        os.write(2, b"[W1204 utils.cpp:68] Warning: NUMA binding: Using MEMBIND policy\nnative problem\n")
        print("python problem", file=sys.stderr)
        raise RuntimeError("engine failed")
    print("after", file=sys.stderr)
    # (pytest holds Python's and the file descriptor's writes apart, so their order is not compared)
    assert sorted(capfd.readouterr().err.splitlines()) == ["after", "native problem", "python problem"]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A full and a QLoRA run of two steps, shared by the commands that read a run."""
    root = tmp_path_factory.mktemp("quiet")
    runs = {"full": [], "qlora": ["--set", "student.lora.enabled=true", "--set", "student.quantization=4bit"]}
    results = {name: tropd("distill", "--preset", "toylab", "--out", str(root / name), *TINY, *extra, cwd=root)
               for name, extra in runs.items()}
    return root, results


@pytest.mark.slow
@pytest.mark.parametrize("name", ["full", "qlora"])
def test_distill_is_quiet(lab, name) -> None:
    result = lab[1][name]
    assert result.returncode == 0, result.stderr
    assert foreign_lines(result.stderr) == []


@pytest.mark.slow
@pytest.mark.parametrize("argv", [
    ["presets", "show", "toylab"],
    ["doctor", "--preset", "toylab"],
    ["prepare", "--preset", "toylab", "--data", "toylab", "--out", "{root}/prepared"],
    ["evaluate", "-m", "{root}/full", "-m", "toylab:teacher", "-b", "toylab", "--limit", "4", "--out",
     "{root}/eval"],
    ["export", "{root}/full", "--out", "{root}/export-full"],
    ["export", "{root}/qlora", "--base", "quantized", "--out", "{root}/export-qlora"],
], ids=["presets-show", "doctor", "prepare", "evaluate", "export", "export-qlora"])
def test_command_is_quiet(lab, argv) -> None:
    root = lab[0]
    assert all(result.returncode == 0 for result in lab[1].values())
    result = tropd(*[arg.format(root=root) for arg in argv], cwd=root)
    assert result.returncode == 0, result.stderr
    assert foreign_lines(result.stderr) == []


@pytest.mark.vllm
def test_a_run_with_vllm_rollouts_and_teacher_is_quiet(tmp_path) -> None:
    """vLLM's import, engine start-up (Python and native lines) and weight syncs add nothing to stderr."""
    pytest.importorskip("vllm", reason="vLLM is not installed (the vLLM lane, `make test-vllm`, has it)")
    result = tropd("distill", "--preset", "toylab", "--out", str(tmp_path / "run"), *TINY,
                   "--set", "rollout.backend=vllm", "--set", "teacher.backend=vllm",
                   "--set", "rollout.vllm_kv_cache_gib=0.25", "--set", "rollout.vllm_enforce_eager=true", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert foreign_lines(result.stderr) == []
