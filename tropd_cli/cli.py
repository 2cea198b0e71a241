"""The `tropd` command line: parse, call one function, print. No logic lives here."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from tropd_cli import __version__
from tropd_cli.errors import TropdError
from tropd_cli.evaluation.settings import EvalSettings

app = typer.Typer(help="Trust Region On-Policy Distillation (TrOPD) and its baselines.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
presets_app = typer.Typer(help="List and show presets.", no_args_is_help=True)
toylab_app = typer.Typer(help="The offline toy lab: rebuild its shipped teacher and student.",
                         no_args_is_help=True)
app.add_typer(presets_app, name="presets")
app.add_typer(toylab_app, name="toylab")
console = Console()

PresetOption = Annotated[str, typer.Option("--preset", "-p", help="Preset name (see `tropd presets list`) "
                                           "or path to a preset YAML file.")]
SetOption = Annotated[list[str] | None, typer.Option(
    "--set", "-s", help="Override a config field: section.key=value (repeatable).")]


def default_of(name: str) -> str:
    """`(default: X)` for an EvalSettings field, so that help texts never restate a default."""
    return f"(default: {getattr(EvalSettings, name)})."


@app.command()
def distill(
    preset: PresetOption,
    set_: SetOption = None,
    out: Annotated[str | None, typer.Option("--out", "-o", help="Run folder (default: output.dir).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty run folder.")] = False,
) -> None:
    """Distill the teacher into the student on-policy and write a run folder."""
    from tropd_cli.config import load_config
    from tropd_cli.distill import distill as run_distill

    config = load_config(preset, set_)
    run_distill(config, preset, out=out, overwrite=overwrite, console=console)


@app.command()
def doctor(preset: PresetOption, set_: SetOption = None) -> None:
    """Check a run before starting it: tokenizers, EOS/pad, chat template, and a rough memory estimate."""
    from tropd_cli.config import load_config
    from tropd_cli.preflight import doctor as run_doctor

    run_doctor(load_config(preset, set_), console)


@app.command()
def evaluate(
    model: Annotated[list[str], typer.Option("--model", "-m", help="Hub id, model/adapter/run folder, or "
                                             "toylab:teacher / toylab:student (repeat to compare).")],
    benchmark: Annotated[list[str], typer.Option("--benchmark", "-b", help="gsm8k, math500, aime24, aime25, "
                                                 "amc23, gpqa-diamond, toylab or custom (repeatable).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for report.json and samples.jsonl.")],
    data: Annotated[Path | None, typer.Option(help="Local JSONL copy of the benchmark (its registry fields).")]
    = None,
    k: Annotated[int | None, typer.Option("-k", help="Samples per problem when temperature > 0 "
                                          + default_of("k"))] = None,
    temperature: Annotated[float | None, typer.Option(help="0 is greedy " + default_of("temperature"))] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling mass " + default_of("top_p"))] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Response budget (default: the benchmark's).")] = None,
    seed: Annotated[int | None, typer.Option(help="Generation, shuffling and toy-lab seed " + default_of("seed"))]
    = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N problems of each benchmark.")] = None,
    thinking: Annotated[bool | None, typer.Option("--thinking/--no-thinking", help="Set enable_thinking in "
                                                  "the chat template (default: the template's).")] = None,
    greedy: Annotated[bool | None, typer.Option("--greedy", help="When sampling, also report greedy "
                                                "accuracy.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Sequences per generate call " + default_of("batch_size"))]
    = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda " + default_of("device"))] = None,
    dtype: Annotated[str | None, typer.Option(help="float32, bfloat16 or float16 " + default_of("dtype"))] = None,
    markdown: Annotated[bool | None, typer.Option("--markdown", help="Also write report.md.")] = None,
    overwrite: Annotated[bool | None, typer.Option("--overwrite", help="Replace a non-empty --out.")] = None,
) -> None:
    """Evaluate models side by side on math, science, toy-lab or custom benchmarks (avg@k, pass@k, maj@k)."""
    from tropd_cli.evaluation.runner import evaluate as run_evaluate

    given = dict(data=data, k=k, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed,
                 limit=limit, thinking=thinking, greedy=greedy, batch_size=batch_size, device=device, dtype=dtype,
                 markdown=markdown, overwrite=overwrite)
    settings = EvalSettings(models=model, benchmarks=benchmark, out=out,
                            **{key: value for key, value in given.items() if value is not None})
    run_evaluate(settings, console=console)


@presets_app.command("list")
def presets_list() -> None:
    """Show every preset: name, teacher, student, objective, description."""
    from tropd_cli.config import load_config, preset_names

    table = Table(title="presets")
    for column in ("name", "teacher", "student", "objective", "description"):
        table.add_column(column)
    for name in preset_names():
        config = load_config(name)
        table.add_row(name, config.teacher.model, config.student.model, config.objective.name,
                      config.description)
    console.print(table)


@presets_app.command("show")
def presets_show(name: Annotated[str, typer.Argument(help="Preset name or YAML path.")],
                 set_: SetOption = None) -> None:
    """Print a preset's fully resolved configuration as YAML."""
    from tropd_cli.config import load_config, to_yaml

    typer.echo(to_yaml(load_config(name, set_)), nl=False)


@toylab_app.command("build")
def toylab_build(
    out: Annotated[Path | None, typer.Option(help="Where to write teacher/, student/ and manifest.json "
                                             "(default: the package's shipped assets).")] = None,
    only: Annotated[str | None, typer.Option(help="Rebuild only 'teacher' or 'student'.")] = None,
) -> None:
    """Train the toy teacher and the weaker toy student from scratch and record how (minutes on a CPU)."""
    from tropd_cli.toylab.build import build_toylab

    build_toylab(out, only=only, console=console)


def version_callback(value: bool) -> None:
    if value:
        typer.echo(f"tropd {__version__}")
        raise typer.Exit()


@app.callback()
def root(version: Annotated[bool, typer.Option("--version", callback=version_callback, is_eager=True,
                                               help="Print the version and exit.")] = False) -> None:
    """Trust Region On-Policy Distillation (TrOPD) and its baselines."""


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code: user errors print one line and give 2; Ctrl-C gives 130."""
    from tropd_cli.distill import Interrupted

    err = Console(stderr=True)
    try:
        app(args=argv, prog_name="tropd")
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except Interrupted as error:
        err.print(f"[yellow]stopped:[/] {error}", highlight=False, soft_wrap=True)
        return 130
    except TropdError as error:
        err.print(f"[red]error:[/] {error}", highlight=False, soft_wrap=True)
        return 2
    return 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
