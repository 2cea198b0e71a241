"""README stays true: every `tropd` command it shows runs (shrunk to a few steps), and the error it shows
is the error the CLI prints."""

import re
import shlex
from pathlib import Path

import pytest

from tropd_cli import cli
from tropd_cli.toylab import build, build_v3

README = Path(__file__).resolve().parent.parent / "README.md"
TINY = ["--set", "train.steps=1", "--set", "eval.problems=4", "--set", "rollout.prompts_per_step=2",
        "--set", "rollout.max_new_tokens=8"]


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    lines = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line.startswith("tropd ")]


def test_readme_shows_the_tour():
    commands = readme_commands()
    assert any(c.startswith("tropd distill --preset toylab") for c in commands)
    assert "tropd presets list" in commands


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One folder for every README command, run in README order: later commands use earlier runs."""
    return tmp_path_factory.mktemp("readme")


def shrink(argv: list[str]) -> list[str]:
    """A distill command with tiny settings, keeping the settings the command gives itself."""
    given = {argv[i + 1].split("=")[0] for i, arg in enumerate(argv[:-1]) if arg in ("--set", "-s")}
    pairs = [(TINY[i], TINY[i + 1]) for i in range(0, len(TINY), 2)]
    return argv + [arg for flag, setting in pairs if setting.split("=")[0] not in given for arg in (flag, setting)]


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_runs(command, workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    argv = shlex.split(command)[1:]
    if "--out" in argv and Path(argv[argv.index("--out") + 1]).is_absolute():
        argv[argv.index("--out") + 1] = str(workdir / "out")
    if argv[0] == "evaluate":
        argv += ["--limit", "8"]
    if argv[0] == "prepare":
        argv += ["--set", "data.toylab_prompts=8"]
    if argv[0] == "distill" and "--resume" not in argv:
        argv = shrink(argv) + ([] if "--out" in argv else ["--out", str(workdir / "run")]) + ["--overwrite"]
    if argv[:2] == ["toylab", "build"]:
        for recipes in (build.RECIPES, build.RECIPES_V2):
            for name in recipes:
                monkeypatch.setitem(recipes, name, {**recipes[name], "steps": 2, "warmup": 1})
        monkeypatch.setitem(build.EVAL, "problems", 4)
        monkeypatch.setitem(build.EVAL_V2, "problems", 4)
        monkeypatch.setitem(build.MISMATCH, "prompts", 4)
        for name in build_v3.RECIPES_V3:
            monkeypatch.setitem(build_v3.RECIPES_V3, name, {**build_v3.RECIPES_V3[name], "steps": 2, "warmup": 1,
                                                            "checkpoint_every": 1})
        monkeypatch.setitem(build_v3.EVAL_V3, "problems", 4)
        monkeypatch.setitem(build_v3.GATE_SAMPLES, "prompts", 2)
    if argv[0] == "probe":
        argv += ["--prompts", "8"]
    assert cli.main(argv) == 0


def test_readme_error_example_is_what_the_cli_prints(capsys):
    text = README.read_text()
    command, expected = re.search(r"\$ (tropd .*?)\n(error: .*?)\n", text).groups()
    assert cli.main(shlex.split(command)[1:]) == 2
    assert capsys.readouterr().err.strip() == expected
