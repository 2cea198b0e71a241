"""`tropd export`: a run's student as a merged checkpoint or a LoRA adapter, checked against the run.

A merged export loads the student's base in float32, applies the run's adapter and merges it,
W' = W + (alpha / r) * B @ A, then casts to the chosen dtype and saves safetensors (sharded above
`max_shard_size`), the tokenizer with its chat template, a generation config with the EOS ids, a model card
(README.md), `tropd_export.json` (the card's facts for machines) and `tropd_config.yaml` (the run's resolved
configuration). A QLoRA run's adapter merges into the full-precision base (`base="full"`, the default) or
into its dequantized 4-bit weights (`base="quantized"`, the model the run trained). A full fine-tuned run
exports its weights the same way. An adapter export writes the peft adapter (in the chosen dtype) with the
same files.

Verification reloads the written folder with plain transformers (peft for adapters) and compares its logits
with the model `base` names over a few prompts and that model's greedy answers (`verify.tolerance`); where the
run has a held-out evaluation, the export's accuracy is measured on it (and a QLoRA run's other base beside
it) for the card. Everything is written into a temporary folder next to `--out` and renamed into place only
once it verified, so a failed export leaves nothing behind. Merging and verification run on the CPU.

    source.py  what is exported and the run's facts     write.py   loading, merging, saving, checking
    verify.py  reload and compare, tolerances           card.py    model cards (export and run student/)
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tropd_cli.errors import TropdError
from tropd_cli.export.card import MERGED_INTO, model_card, student_card
from tropd_cli.export.source import ExportSource, describe, find_source, run_facts
from tropd_cli.export.verify import EXPORT_DTYPES, FP32_TOLERANCE, RUN_DTYPES, Verification, tolerance
from tropd_cli.export.write import write_and_verify
from tropd_cli.files import OwnedFolder, atomic_write_json, atomic_write_text, writing
from tropd_cli.models import resolve_model_path
from tropd_cli.runfolder import RunFolder

__all__ = ["BASES", "FORMATS", "ExportResult", "ExportSource", "Verification", "describe", "export", "find_source",
           "model_card", "run_facts", "student_card", "tolerance"]

FORMATS = ("merged", "adapter")
BASES = ("full", "quantized")
DEFAULT_MAX_SHARD_SIZE = "5GB"
SHARD_SIZE = re.compile(r"^\s*\d+(\.\d+)?\s*(KB|MB|GB|TB)\s*$", re.IGNORECASE)  # what transformers parses


@dataclass
class ExportResult:
    out: Path
    format: str
    dtype: str
    size_bytes: int
    provenance: dict
    verification: Verification | None = field(default=None)


def export(path: Path, out: Path, format_: str | None = None, dtype: str | None = None, step: int | None = None,
           verify: bool = True, overwrite: bool = False, max_shard_size: str | None = None,
           trust_remote_code: bool = False, console: Console | None = None, base: str | None = None,
           evaluate: bool = True) -> ExportResult:
    """Export a run's student (or a checkpoint's) to `out` as a merged checkpoint or an adapter;
    `base` (full or quantized) chooses what a QLoRA adapter merges into; `evaluate` measures the export on
    the run's held-out problems (with verification); `trust_remote_code` lets the student's repository run
    its own code even when the run did not."""
    console = console or Console()
    format_ = format_ or "merged"
    if format_ not in FORMATS:
        raise TropdError(f"--format must be merged or adapter, got '{format_}'")
    base = base or "full"
    if base not in BASES:
        raise TropdError(f"--base must be full or quantized, got '{base}'")
    source = find_source(Path(path), step)
    if trust_remote_code:
        source.config.student.trust_remote_code = True
    if base == "quantized" and not source.is_quantized:
        raise TropdError(f"--base quantized merges into the 4-bit base a QLoRA run trained on; '{source.run_dir}' "
                         f"has none (student.quantization is {source.config.student.quantization})")
    if base == "quantized" and format_ == "adapter":
        raise TropdError("--base quantized chooses what the adapter merges into; --format adapter merges nothing "
                         "(load the adapter over the base in 4 bits to reproduce the run)")
    dtype = dtype or RUN_DTYPES[source.config.student.dtype]
    if dtype not in EXPORT_DTYPES:
        raise TropdError(f"--dtype must be bf16, fp16 or fp32, got '{dtype}'")
    if format_ == "adapter" and not source.is_adapter:
        raise TropdError(f"--format adapter needs a LoRA run; '{source.run_dir}' trained every weight "
                         f"(export it with --format merged)")
    max_shard_size = max_shard_size or DEFAULT_MAX_SHARD_SIZE
    if not SHARD_SIZE.match(max_shard_size):
        raise TropdError(f"--max-shard-size must be a size such as 5GB or 500MB, got '{max_shard_size}'")
    if source.is_adapter and not (source.student_dir / "adapter_model.safetensors").is_file():
        raise TropdError(f"adapter folder '{source.student_dir}' has no adapter_model.safetensors")
    out = Path(out)
    provenance = describe(source, format_, dtype, base)
    result = ExportResult(out, format_, dtype, 0, provenance)

    def fill(folder: Path) -> None:
        result.verification, measured = write_and_verify(source, folder, format_, dtype, base, verify, evaluate,
                                                         max_shard_size, console)
        provenance["eval"].update(measured)
        record = {**provenance, "verification": asdict(result.verification) if result.verification else None}
        with writing(f"the export to {folder}"):
            atomic_write_json(folder / "tropd_export.json", record)
            atomic_write_text(folder / "tropd_config.yaml", RunFolder(source.run_dir).config.read_text())
            atomic_write_text(folder / "README.md", model_card(record))

    with OwnedFolder(out, "export") as target:
        _check_target(target, source, overwrite)
        with writing(f"the export {out}"):
            target.replace(fill)
    result.size_bytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print_export(console, result)
    return result


def _check_target(output: OwnedFolder, source: ExportSource, overwrite: bool) -> None:
    """Refuse a target that is a file, non-empty without --overwrite, or holds what is being exported."""
    out = output.target
    target = out.resolve()
    inputs = [("the run folder", source.run_dir)]
    base = Path(resolve_model_path(source.config.student.model))
    if source.is_adapter and base.is_dir():
        inputs.append(("the student's base model", base))
    for what, folder in inputs:
        folder = folder.resolve()
        if target == folder or target in folder.parents:
            raise TropdError(f"--out {out} would replace {what} it exports from; choose another --out")
    output.claim(overwrite)


def print_export(console: Console, result: ExportResult) -> None:
    """A short table: format, dtype, size, what verification measured and the accuracies measured here."""
    table = Table(title=f"export of {result.provenance['run_dir']}", show_header=False)
    table.add_column("")
    table.add_column("")
    table.add_row("format", result.format + (f" into {MERGED_INTO[result.provenance['base']]}"
                                             if result.provenance["quantized_base"] and result.format == "merged"
                                             else ""))
    table.add_row("dtype", result.dtype)
    table.add_row("size", _human_size(result.size_bytes))
    check = result.verification
    if check is None:
        table.add_row("verification", "skipped (--no-verify)")
    else:
        table.add_row("compared with", check.reference)
        table.add_row("max |diff|", f"{check.max_abs_diff:.3g} (tolerance {check.tolerance:.3g}, "
                      f"{check.positions} positions)")
        if check.merge_diff is not None:
            table.add_row("merge, float32", f"{check.merge_diff:.3g} (tolerance {FP32_TOLERANCE:g})")
        table.add_row("greedy text identical", "yes" if check.greedy_identical else "no")
        if check.other_base_diff is not None:
            table.add_row("the other base", f"max |diff| {check.other_base_diff:.3g}, greedy identical on "
                          f"{check.other_base_greedy_identical} of {check.prompts} prompts (not checked)")
    evaluation = result.provenance["eval"]
    if "export_accuracy" in evaluation:
        table.add_row("held-out accuracy", f"{100 * evaluation['export_accuracy']:.1f}% (this export)"
                      + (f", {100 * evaluation['other_base_accuracy']:.1f}% (the other base)"
                         if "other_base_accuracy" in evaluation else ""))
    console.print(table)
    console.print(f"exported to {result.out}", soft_wrap=True, highlight=False)


def _human_size(size: int) -> str:
    if size < 1000:
        return f"{size} B"
    value = size / 1000
    for unit in ("KB", "MB"):
        if value < 1000:
            return f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"
