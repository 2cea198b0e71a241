"""README stays true: every `tropd` command it shows runs (shrunk to a few steps), and the error it shows
is the error the CLI prints."""

import re
import shlex
from pathlib import Path

import pytest

from tropd_cli import cli
from tropd_cli.toylab import build

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


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_runs(command, tmp_path, monkeypatch):
    argv = shlex.split(command)[1:]
    if "--out" in argv:
        argv[argv.index("--out") + 1] = str(tmp_path / "out")
    if argv[0] == "evaluate":
        argv += ["--limit", "8"]
    if argv[0] == "distill":
        argv += TINY + ([] if "--out" in argv else ["--out", str(tmp_path / "run")])
    if argv[:2] == ["toylab", "build"]:
        for name in build.RECIPES:
            monkeypatch.setitem(build.RECIPES, name, {**build.RECIPES[name], "steps": 2, "warmup": 1})
        monkeypatch.setitem(build.EVAL, "problems", 4)
    assert cli.main(argv) == 0


def test_readme_error_example_is_what_the_cli_prints(capsys):
    text = README.read_text()
    command, expected = re.search(r"\$ (tropd .*?)\n(error: .*?)\n", text).groups()
    assert cli.main(shlex.split(command)[1:]) == 2
    assert capsys.readouterr().err.strip() == expected
