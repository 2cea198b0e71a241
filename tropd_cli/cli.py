"""The `tropd` command line: parse, call one function, print. No logic lives here."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperCommand

from tropd_cli import __version__
from tropd_cli.errors import Interrupted, TropdError, WriteError, first_line
from tropd_cli.evaluation.settings import EvalSettings

app = typer.Typer(help="Trust Region On-Policy Distillation (TrOPD) and its baselines.",
                  no_args_is_help=True, add_completion=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None)
presets_app = typer.Typer(help="List and show presets.", no_args_is_help=True)
toylab_app = typer.Typer(help="The offline toy lab: rebuild its shipped teacher and student.",
                         no_args_is_help=True)
app.add_typer(presets_app, name="presets")
app.add_typer(toylab_app, name="toylab")
console = Console()

PresetOption = Annotated[str, typer.Option("--preset", "-p", metavar="NAME", help="Preset name (see `tropd presets "
                                           "list`) or path to a preset YAML file.")]
SetOption = Annotated[list[str] | None, typer.Option(
    "--set", "-s", metavar="SECTION.KEY=VALUE", help="Override a config field (repeatable); the value is checked "
    "against the schema: `tropd presets show NAME --explain` lists every field.")]


class PlainUsage(TyperCommand):
    """Usage lines that name a required argument as click does (`RUN_OR_CHECKPOINT`, not typer's
    `{RUN_OR_CHECKPOINT}`, which reads as a literal or a shell brace expansion)."""

    def collect_usage_pieces(self, ctx: click.Context) -> list[str]:
        return [re.sub(r"^\{(.*)\}$", r"\1", piece) for piece in super().collect_usage_pieces(ctx)]


def default_of(name: str) -> str:
    """`(default: X)` for an EvalSettings field, so that help texts never restate a default."""
    return f"(default: {getattr(EvalSettings, name)})."


@app.command()
def prepare(
    preset: PresetOption,
    data: Annotated[str, typer.Option("--data", "-d", help="A .jsonl/.json/.csv/.parquet file or a folder of "
                                      "them, a hub dataset id, or toylab (the built-in toy tasks).")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="The prepared folder to write.")] = None,
    split: Annotated[str | None, typer.Option(help="Hub dataset split (default: train).")] = None,
    subset: Annotated[str | None, typer.Option(help="Hub dataset configuration (subset) name.")] = None,
    prompt_field: Annotated[str | None, typer.Option(help="Record field of the prompt text (default: prompt, "
                                                     "else messages).")] = None,
    answer_field: Annotated[str | None, typer.Option(help="Record field of the gold answer (default: answer "
                                                     "when present).")] = None,
    messages_field: Annotated[str | None, typer.Option(help="Record field of a {role, content} conversation, "
                                                       "instead of a prompt field.")] = None,
    system_prompt: Annotated[str | None, typer.Option(help="System message for prompts that have none "
                                                      "(default: data.system_prompt).")] = None,
    teacher_drafts: Annotated[bool, typer.Option("--teacher-drafts", help="Also sample one teacher response "
                                                 "per training prompt, for guidance and sft (resumable).")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the counts and a few rows; write "
                                          "nothing.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --out that holds something "
                                            "else.")] = False,
    backend: Annotated[str | None, typer.Option(help="What samples the teacher drafts: hf (the teacher loaded "
                                                "here), vllm (a vLLM engine) or server (teacher.url) (default: "
                                                "teacher.backend).")] = None,
    set_: SetOption = None,
) -> None:
    """Prepare prompts for `distill` and `evaluate`: normalise, chat template, length filter, dedupe, split.

    \b
    Examples:
      tropd prepare --preset toylab --data toylab --teacher-drafts --out prepared/toy
      tropd prepare --preset qwen3-4b-0.6b-lora --data questions.jsonl --prompt-field question --dry-run
    """
    from tropd_cli.config import load_config
    from tropd_cli.data.prepare import PrepareRequest
    from tropd_cli.data.prepare import prepare as run_prepare

    request = PrepareRequest(data, out, split, subset, prompt_field, answer_field, messages_field, system_prompt,
                             teacher_drafts, dry_run, overwrite, backend)
    run_prepare(load_config(preset, set_), request, preset=preset, console=console)


@app.command()
def distill(
    preset: Annotated[str | None, typer.Option("--preset", "-p", help="Preset name (see `tropd presets list`) "
                                               "or path to a preset YAML file.")] = None,
    set_: SetOption = None,
    out: Annotated[str | None, typer.Option("--out", "-o", help="Run folder (default: output.dir).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a run folder tropd wrote, once the new "
                                            "run has finished.")] = False,
    resume: Annotated[Path | None, typer.Option(help="Continue this run folder from its newest checkpoint "
                                                "(its own config.yaml; --set may raise train.steps).")] = None,
    from_step: Annotated[int | None, typer.Option(help="With --resume: continue from the checkpoint of this "
                                                  "step instead of the newest.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda (sets train.device).")] = None,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Let both models' repositories "
                                                    "run their own Python code when loading.")] = False,
    nproc: Annotated[int, typer.Option("--nproc", min=1, help="Processes (GPUs) on this machine: runs torchrun "
                                       "for you (several machines: see README, More than one GPU).")] = 1,
) -> None:
    """Distill the teacher into the student on-policy and write a run folder.

    \b
    Examples:
      tropd distill --preset toylab
      tropd distill --preset toylab --set objective.name=opd --set train.seed=1 --out runs/opd-1
      tropd distill --preset toylab --set train.lr_schedule=cosine --set eval.every=20
      tropd distill --resume runs/opd-1 --set train.steps=200
      tropd distill --resume runs/opd-1 --from-step 50
    """
    from tropd_cli.config import load_config

    if nproc > 1:
        from tropd_cli.engine.distributed import launch

        forwarded = distill_args(preset, set_, out, overwrite, resume, from_step, device, trust_remote_code)
        code = launch(nproc, forwarded)
        if code:
            raise typer.Exit(code)
        return
    overrides = list(set_ or [])
    if device is not None:
        overrides.append(f"train.device={device}")
    if trust_remote_code:
        overrides += ["teacher.trust_remote_code=true", "student.trust_remote_code=true"]
    if resume is not None:
        if preset is not None or out is not None:
            raise TropdError("--resume continues a run with its own config.yaml and folder; "
                             "drop --preset and --out")
        from tropd_cli.distill import resume as resume_run

        resume_run(resume, overrides, console=console, from_step=from_step)
        return
    if from_step is not None:
        raise TropdError("--from-step chooses the checkpoint of --resume RUN_DIR; add --resume")
    if preset is None:
        raise TropdError("distill needs --preset (see `tropd presets list`) or --resume RUN_DIR")
    config = load_config(preset, overrides)  # a bad configuration fails before torch is imported
    from tropd_cli.distill import distill as run_distill

    run_distill(config, preset, out=out, overwrite=overwrite, console=console)


def distill_args(preset: str | None, set_: list[str] | None, out: str | None, overwrite: bool, resume: Path | None,
                 from_step: int | None, device: str | None, trust_remote_code: bool) -> list[str]:
    """The `distill` command line of each process that `--nproc` starts (the same, without --nproc)."""
    args = ["distill"]
    for flag, value in (("--preset", preset), ("--out", out), ("--resume", resume), ("--from-step", from_step),
                        ("--device", device)):
        if value is not None:
            args += [flag, str(value)]
    for setting in set_ or []:
        args += ["--set", setting]
    return args + ["--overwrite"] * overwrite + ["--trust-remote-code"] * trust_remote_code


@app.command()
def doctor(preset: PresetOption, set_: SetOption = None,
           nproc: Annotated[int, typer.Option("--nproc", min=1, help="Estimate memory per rank of this many "
                                              "processes (train.strategy decides what is sharded).")] = 1) -> None:
    """Check a run before starting it: tokenizers, EOS/pad, chat template, and a rough memory estimate.

    \b
    Examples:
      tropd doctor --preset toylab
      tropd doctor --preset qwen3-8b-1.7b-qlora --set rollout.max_new_tokens=2048
      tropd doctor --preset paper-math-r1-1.5b --nproc 4
    """
    from tropd_cli.config import load_config
    from tropd_cli.preflight import doctor as run_doctor

    run_doctor(load_config(preset, set_), console, nproc)


@app.command()
def probe(preset: PresetOption, set_: SetOption = None,
          prompts: Annotated[int | None, typer.Option("--prompts", min=1, help="Held-out problems of the preset's "
                                                      "eval benchmark to sample (default: 128).")] = None,
          out: Annotated[Path | None, typer.Option("--out", "-o", help="Also write the report as JSON here.")]
          = None) -> None:
    """Probe a pair before distilling: accuracies at the rollout temperature, the trust test's rejection by
    position, the reward's quantiles and outliers on the student's samples, and a recommendation.

    \b
    Examples:
      tropd probe --preset toylab-v3
      tropd probe --preset toylab-v3 --set student.model=toylab:v3-student-wide --out probe.json
    """
    from tropd_cli.config import load_config
    from tropd_cli.probe import probe as run_probe
    from tropd_cli.probe import report_tables

    report = run_probe(load_config(preset, set_), prompts, out, console)
    for table in report_tables(report):
        console.print(table)
    advice = report["recommendation"]
    choice = advice["objective"] + (f" (objective.outlier={advice['outlier']})" if advice["outlier"] else "")
    worth = "" if advice["worth_it"] else "; distillation not likely to pay"
    console.print(f"[bold]recommendation:[/] {choice}{worth}: {escape(advice['reason'])}", soft_wrap=True)
    for warning in advice["warnings"]:
        console.print(f"[yellow]warning:[/] {escape(warning)}", soft_wrap=True)


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
    dtype: Annotated[str | None, typer.Option(help="auto (bfloat16 on a GPU that has it, else float32), float32, "
                                              "bfloat16 or float16 " + default_of("dtype"))] = None,
    backend: Annotated[str | None, typer.Option(help="hf (transformers' generate) or vllm (a vLLM engine; "
                                                "pip install 'tropd[vllm]') " + default_of("backend"))] = None,
    markdown: Annotated[bool | None, typer.Option("--markdown", help="Also write report.md.")] = None,
    overwrite: Annotated[bool | None, typer.Option("--overwrite", help="Replace an --out that tropd wrote.")]
    = None,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Let the models' repositories "
                                                    "run their own Python code when loading.")] = False,
) -> None:
    """Evaluate models side by side on math, science, toy-lab or custom benchmarks (avg@k, pass@k, maj@k).

    \b
    Examples:
      tropd evaluate -m toylab:teacher -m toylab:student -b toylab --out runs/eval
      tropd evaluate -m runs/demo -b math500 --data math500.jsonl --limit 50 --out runs/eval-math
      tropd evaluate -m Qwen/Qwen3-1.7B -b aime24 -k 8 --temperature 0.6 --top-p 0.95 --backend vllm --out reports/q

    An interrupted evaluation continues where it stopped when run again with the same settings.
    """
    from tropd_cli.evaluation.runner import evaluate as run_evaluate

    given = dict(data=data, k=k, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed,
                 limit=limit, thinking=thinking, greedy=greedy, batch_size=batch_size, device=device, dtype=dtype,
                 backend=backend, markdown=markdown, overwrite=overwrite)
    settings = EvalSettings(models=model, benchmarks=benchmark, out=out,
                            **{key: value for key, value in given.items() if value is not None})
    run_evaluate(settings, console=console, trust_remote_code=trust_remote_code)


@app.command(cls=PlainUsage)
def export(
    source: Annotated[Path, typer.Argument(metavar="RUN_OR_CHECKPOINT", help="Run folder, or a checkpoint folder "
                                           "RUN/checkpoints/step-NNNNNN.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write.")],
    format_: Annotated[str | None, typer.Option("--format", help="merged (base + adapter merged, or a full run's "
                                                "weights) or adapter (LoRA runs) (default: merged).")] = None,
    dtype: Annotated[str | None, typer.Option(help="bf16, fp16 or fp32 (default: the run's student.dtype).")]
    = None,
    step: Annotated[int | None, typer.Option(help="Export the checkpoint saved at this step instead of the "
                                             "final student.")] = None,
    base: Annotated[str | None, typer.Option(help="QLoRA runs: merge into the full-precision base (full, the "
                                             "default) or into the dequantized 4-bit weights the adapter was "
                                             "trained against (quantized: reproduces the trained model).")]
    = None,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Reload the export and compare its "
                                         "logits with the model --base names.")] = True,
    evaluate_: Annotated[bool, typer.Option("--eval/--no-eval", help="With verification, measure the export's "
                                            "accuracy on the run's held-out problems for the model card.")] = True,
    max_shard_size: Annotated[str | None, typer.Option(help="Largest safetensors file of a merged export, "
                                                       "e.g. 2GB (default: 5GB).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an --out that tropd wrote.")] = False,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Let the student's repository "
                                                    "run its own Python code when loading.")] = False,
) -> None:
    """Export a run's student as a merged checkpoint or a LoRA adapter, verified against the run.

    \b
    Examples:
      tropd export runs/demo --out exports/demo
      tropd export runs/qlora --base quantized --out exports/qlora-as-trained
      tropd export runs/qlora --format adapter --dtype bf16 --out exports/qlora-adapter
      tropd export runs/demo/checkpoints/step-000050 --out exports/demo-step50
    """
    from tropd_cli.export import export as run_export

    run_export(source, out, format_=format_, dtype=dtype, step=step, verify=verify, overwrite=overwrite,
               max_shard_size=max_shard_size, trust_remote_code=trust_remote_code, console=console, base=base,
               evaluate=evaluate_)


@presets_app.command("list")
def presets_list() -> None:
    """Show every preset: name, teacher -> student, objective, description.

    \b
    Examples:
      tropd presets list
      tropd presets show toylab --explain
    """
    from tropd_cli.config import load_config, preset_names

    names = preset_names()
    # Names are what users type: never cut. Below 140 columns one column holds the pair above the description.
    wide = console.width >= 140
    table = Table(title="presets", show_lines=not wide)
    table.add_column("name", no_wrap=True, min_width=max(map(len, names)))
    table.add_column("objective", no_wrap=True)
    for column in (("teacher", "student", "description") if wide else ("teacher -> student / description",)):
        table.add_column(column, overflow="fold")
    for name in names:
        config = load_config(name)
        pair = [config.teacher.model, config.student.model]
        cells = [*pair, config.description] if wide else [f"{' -> '.join(pair)}\n[dim]{config.description}[/]"]
        table.add_row(name, config.objective.name, *cells)
    console.print(table)


@presets_app.command("show", cls=PlainUsage)
def presets_show(name: Annotated[str, typer.Argument(metavar="NAME", help="Preset name or YAML path.",
                                                    show_default=False)],
                 set_: SetOption = None,
                 explain: Annotated[bool, typer.Option("--explain", help="Also print each field's description and "
                                                       "where its value came from (default, preset, --set).")]
                 = False) -> None:
    """Print a preset's fully resolved configuration as YAML.

    \b
    Examples:
      tropd presets show toylab
      tropd presets show toylab --explain --set train.lr_schedule=cosine
    """
    from tropd_cli.config import explain_yaml, load_config, to_yaml

    config = load_config(name, set_)
    typer.echo(explain_yaml(config, name, set_) if explain else to_yaml(config), nl=False)


@toylab_app.command("build")
def toylab_build(
    out: Annotated[Path | None, typer.Option(help="Where to write teacher/, student/ and manifest.json "
                                             "(default: the package's shipped assets).")] = None,
    only: Annotated[str | None, typer.Option(
        help="Rebuild only this model (v1: teacher or student; v2: v2-teacher, v2-student-e0.00, "
        "v2-student-e0.03, v2-student-e0.10; v3: the run v3-student or v3-teacher).")] = None,
    lab: Annotated[str, typer.Option(help="Which toy lab: v1 (the demo's pair), v2 (a teacher with entropy, "
                                     "students with rare slips) or v3 (a teacher that masters the task, students "
                                     "failing on their own, gated).")] = "v1",
) -> None:
    """Train the toy teacher and the weaker toy student(s) from scratch and record how (minutes on a CPU).

    \b
    Examples:
      tropd toylab build --out /tmp/toylab
      tropd toylab build --only student
      tropd toylab build --lab v2 --out /tmp/toylab-v2
      tropd toylab build --lab v3 --only v3-student --out /tmp/toylab-v3
    """
    from tropd_cli.toylab.build import build_toylab

    build_toylab(out, only=only, console=console, lab=lab)


@app.command("serve-teacher")
def serve_teacher(
    preset: PresetOption,
    start: Annotated[bool, typer.Option("--start", help="Run the server here, in the foreground, instead of "
                                        "printing its command (needs vLLM in this environment).")] = False,
    set_: SetOption = None,
) -> None:
    """Print the vLLM server command that serves the preset's teacher for teacher.backend=server (at
    teacher.url, with --max-logprobs for the objective's top-k); --start runs it."""
    from tropd_cli.config import load_config
    from tropd_cli.engine.teacher.server import format_command, start_server, teacher_server_command

    command = teacher_server_command(load_config(preset, set_))
    if start:
        start_server(command)  # does not return: this process becomes the server
    typer.echo(format_command(command))


def version_callback(value: bool) -> None:
    if value:
        typer.echo(f"tropd {__version__}")
        raise typer.Exit()


debug = {"on": False}


@app.callback()
def root(version: Annotated[bool, typer.Option("--version", callback=version_callback, is_eager=True,
                                               help="Print the version and exit.")] = False,
         debug_: Annotated[bool, typer.Option("--debug", help="Show the traceback of a failure (also "
                                              "TROPD_DEBUG=1).")] = False) -> None:
    """Trust Region On-Policy Distillation (TrOPD) and its baselines."""
    debug["on"] = debug["on"] or debug_


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code. Every failure prints one line and no traceback (unless --debug or
    TROPD_DEBUG=1): user errors give 2, failed writes and other failures 1, Ctrl-C 130."""
    err = Console(stderr=True)
    rank = int(os.environ.get("RANK", "0"))  # as distributed.rank(), without importing torch at start-up
    debug["on"] = os.environ.get("TROPD_DEBUG", "") not in ("", "0")
    try:
        app(args=argv, prog_name="tropd")
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except Interrupted as error:
        if rank == 0:
            err.print(f"[yellow]stopped:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
        return 130
    except KeyboardInterrupt:
        if rank == 0:
            err.print("[yellow]stopped:[/] interrupted", highlight=False, soft_wrap=True)
        return 130
    except Exception as error:
        if debug["on"]:
            err.print_exception()
        # Under torchrun every rank meets the same user error; rank 0 says it. Other failures may be one
        # rank's own, so each rank says its own, except the lost connection to a rank that died: the
        # launcher names that one.
        if (rank == 0 or not isinstance(error, TropdError)) and not _lost_peer(error):
            where = f"rank {rank}: " if rank else ""
            err.print(f"[red]error:[/] {escape(where + one_line(error))}", highlight=False, soft_wrap=True)
        return 2 if isinstance(error, TropdError) and not isinstance(error, WriteError) else 1
    return 0


def _lost_peer(error: Exception) -> bool:
    """Whether `error` is a rank's lost connection to a peer that died (only under torchrun; the check
    imports torch, which a one-process failure never needs)."""
    if os.environ.get("WORLD_SIZE", "1") == "1":
        return False
    from tropd_cli.engine.distributed import lost_peer

    return lost_peer(error)


def one_line(error: Exception) -> str:
    """What a failure prints: our own message, the system's words and path for OSError, else the type and
    the first line with a pointer to the traceback."""
    if isinstance(error, TropdError):
        return str(error)
    if isinstance(error, OSError):  # full disk, permissions
        return f"{error.strerror or error}" + (f": {error.filename}" if error.filename else "")
    return f"{type(error).__name__}: {first_line(error)} (pass --debug or set TROPD_DEBUG=1 for the traceback)"


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
