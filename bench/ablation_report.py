"""The comparison's report: ablation.json, ablation.md (tables in the shape of the paper's Table 1 and the
claims) and one accuracy / grad-norm plot per mismatch level. `ablation.py` runs the comparison."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from common import num, pct, pyplot, save_png

from tropd_cli.files import atomic_write_json, atomic_write_text


def write_report(report: dict, out: Path) -> None:
    """ablation.json, ablation.md and one PNG per level, each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "ablation.json", report)
    for key, level in report["levels"].items():
        plot_level(level, out / f"ablation-{key}.png", {k: m["label"] for k, m in report["methods"].items()})
    atomic_write_text(out / "ablation.md", markdown(report))


def markdown(report: dict) -> str:
    """The human-readable report."""
    eval_ = report["eval"]
    lines = [
        "# Ablation on the toy lab: the paper's Table 1, reproduced small",
        "",
        f"Budget `{report['budget']}`: preset `{report['preset']}` with `{' '.join(report['overrides'])}`; "
        f"{report['steps']} steps of {report['prompts_per_step']} prompts x {report['rollouts_per_prompt']} "
        f"rollouts; seeds {', '.join(map(str, report['seeds']))} (`train.seed`). Held-out accuracy: "
        f"{eval_['problems']} problems (eval seed {eval_['seed']}), greedy decoding, avg@1, graded before "
        f"training, every {eval_['every']} steps and after. One torch thread per run ({report['machine']}, "
        f"torch {report['torch']}).",
        "",
        "Command:",
        "",
        "```bash",
        report["command"],
        "```",
        "",
        f"Wall time: {report['wall_seconds'] / 60:.1f} min over {len(report['invocations'])} invocation(s) ("
        + "; ".join(f"{entry['started']}: {entry['wall_seconds'] / 60:.1f} min, {entry['runs_executed']} runs "
                    f"executed, {entry['runs_reused']} reused" for entry in report["invocations"])
        + f"); the runs themselves took {report['run_wall_seconds_total'] / 60:.1f} min in all.",
        "",
        "Columns: accuracy after training (mean ± sample std over seeds, %); gain over the start (points, mean "
        "± std); the median pre-clip grad norm of a run's steps (mean over seeds); the largest pre-clip grad "
        "norm of any step of any seed; grad-norm spikes, steps whose norm "
        f"exceeds {report['spike_factor']:g}x the median of their own run, summed over seeds; trust fraction "
        f"(tropd and opd) and response length (student-generated tokens of the training rollouts, on-policy "
        f"steps only) as means over the last {report['tail_steps']} steps. `paper` is the Table 1 average "
        "of arXiv 2606.01249 (DeepSeek-R1-Distill-Qwen-1.5B <- Skywork-OR1-Math-7B); its clip row is REOPOLD's "
        "reward floor, so both rows show 47.86; it has no EOPD row.",
        "",
        "Methods and their overrides: " + "; ".join(
            f"{m['label']}: `{' '.join(m['overrides'])}`" for m in report["methods"].values()) + ".",
        "",
        "## Choice of the second mismatch level",
        "",
        report["level_choice"],
        "",
    ]
    for level_key, level in report["levels"].items():
        outliers = level["student"]["outliers"]
        lines += [
            f"## {level['label']}",
            "",
            level["description"],
            f"Student recipe: `{json.dumps(level['student']['recipe'])}`. Teacher held-out accuracy "
            f"{pct(level['teacher_accuracy'])}%, student before {pct(level['student_accuracy_before'])}%. "
            f"Of the student's temperature-1 samples ({outliers['prompts']} prompts x "
            f"{outliers['samples_per_prompt']}), {100 * outliers['implausible_fraction']:.1f}% of tokens have a "
            f"teacher log-prob below {outliers['implausible_logprob']:g} and "
            f"{100 * outliers['below_minus_10_fraction']:.1f}% below -10.",
            "",
            "| method | paper | accuracy after (%) | gain (points) | median grad norm | max grad norm | spikes "
            "| final trust | response length | finished |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for key, row in level["methods"].items():
            method = report["methods"][key]
            lines.append(
                f"| {method['label']} | {num(method['paper_table1'])} "
                f"| {pct(row['accuracy_after_mean'], row['accuracy_after_std'])} "
                f"| {pct(row['gain_mean'], row['gain_std'], sign=True)} | {num(row['median_grad_norm'])} "
                f"| {num(row['max_grad_norm'])} "
                f"| {row['spikes']} | {num(row['final_trust_fraction'], 3)} | {num(row['response_length'], 1)} "
                f"| {row['finished']}/{row['runs']} |")
        if level["claims"]:
            lines += ["", "Claims (accuracy differences paired by seed, in points; holds = every seed agrees and "
                      "the mean exceeds 2 standard errors):", "", "| claim | per seed | mean ± SE | verdict |",
                      "|---|---|---|---|"]
            for claim in level["claims"]:
                spread = "—" if claim["mean"] is None else f"{claim['mean']:+.1f}" + (
                    f" ± {claim['se']:.1f}" if claim["se"] is not None else "")
                lines.append(f"| {claim['claim']} | {claim['shown']} | {spread} | {claim['verdict']} |")
        failures = [(key, r) for key, row in level["methods"].items() for r in row["seeds"]
                    if r["status"] != "finished"]
        for key, run in failures:
            lines.append(f"\n{key} seed {run['seed']} {run['status']} at step {run['steps_done']}: {run['error']}")
        lines += ["", f"![{level['label']}](ablation-{level_key}.png)", ""]
    changes = report["changes_after_first_run"]
    lines += ["## Changes after the first run", ""]
    lines += [f"- {change}" for change in changes] if changes else ["None."]
    return "\n".join(lines) + "\n"


def plot_level(level: dict, path: Path, labels: dict[str, str]) -> None:
    """Held-out accuracy and grad norm over steps, mean over seeds, one line per method."""
    plt = pyplot()
    figure, (accuracy_axis, grad_axis) = plt.subplots(1, 2, figsize=(14, 4.2), dpi=72)
    colors = plt.get_cmap("tab10").colors
    for index, (key, row) in enumerate(level["methods"].items()):
        finished = [r for r in row["seeds"] if r["status"] == "finished"]
        style = dict(color=colors[index % 10], linestyle="-" if index < 5 else "--", linewidth=1.4,
                     label=labels[key])
        curves = [dict(r["accuracy_curve"]) for r in finished]
        steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        accuracy_axis.plot(steps, [100 * statistics.fmean(c[s] for c in curves) for s in steps], marker=".",
                           **style)
        grad_curves = [r["grad_norm_curve"] for r in row["seeds"] if r["grad_norm_curve"]]
        length = min((len(c) for c in grad_curves), default=0)
        grad_axis.plot(range(1, length + 1), [statistics.fmean(c[i] for c in grad_curves) for i in range(length)],
                       **style)
    accuracy_axis.set(xlabel="step", ylabel="held-out accuracy (%)", title=f"{level['label']}: accuracy")
    grad_axis.set(xlabel="step", ylabel="grad norm before clipping", yscale="log",
                  title=f"{level['label']}: grad norm (mean over seeds)")
    for axis in (accuracy_axis, grad_axis):
        axis.grid(alpha=0.3)
    handles, labels = accuracy_axis.get_legend_handles_labels()
    figure.legend(handles, labels, fontsize=8, loc="center right")
    figure.tight_layout(rect=(0, 0, 0.81, 1))
    save_png(figure, path)
