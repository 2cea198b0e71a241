"""The settings of `tropd evaluate`: one dataclass, the single source of every default (the CLI passes only
what the user set). Kept free of heavy imports so that the CLI can read defaults for its help.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tropd_cli.errors import TropdError


@dataclass
class EvalSettings:
    """What to evaluate, how to prompt and sample, and where to write the report."""

    models: list[str]
    """Model specs: hub id, local folder, adapter folder, tropd run folder, toylab:teacher / toylab:student."""
    benchmarks: list[str]
    """Registry names (benchmarks.yaml)."""
    out: Path
    """Output folder: report.json, samples.jsonl and, with `markdown`, report.md."""
    data: Path | None = None
    """Local JSONL copy of the (single) benchmark, in the registry entry's fields."""
    k: int = 1
    """Samples per problem when sampling (temperature > 0)."""
    temperature: float = 0.0
    """0 is greedy decoding, one response per problem."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    max_new_tokens: int | None = None
    """Response budget; None uses each benchmark's default from the registry."""
    seed: int = 1234
    """Generation seed, option shuffling seed and toy-lab problem seed (the manifest's protocol)."""
    limit: int | None = None
    """Evaluate only the first N problems of each benchmark."""
    thinking: bool | None = None
    """Pass enable_thinking to the chat template; None leaves the template's default."""
    greedy: bool = False
    """When sampling, also decode greedily once per problem and report greedy accuracy."""
    batch_size: int = 256
    """Sequences per generate call."""
    device: str = "auto"
    """auto, cpu or cuda."""
    dtype: str = "auto"
    """auto (bfloat16 on a GPU that has it, else float32), float32, bfloat16 or float16."""
    backend: str = "hf"
    """What generates: hf (transformers' generate) or vllm (a vLLM engine per model, in this process)."""
    markdown: bool = False
    """Also write report.md with the side-by-side table."""
    overwrite: bool = False
    """Replace a non-empty output folder."""
    grading_timeout_s: float = 10.0
    """Seconds one response may take to grade before it counts as wrong."""
    labels: list[str] = field(default_factory=list)
    """Display names of the models (filled from `models`)."""

    def __post_init__(self) -> None:
        if not self.models:
            raise TropdError("pass at least one --model")
        if not self.benchmarks:
            raise TropdError("pass at least one --benchmark")
        if self.k < 1:
            raise TropdError(f"-k must be at least 1, got {self.k}")
        if self.temperature < 0:
            raise TropdError(f"--temperature must be >= 0, got {self.temperature}")
        if self.temperature == 0 and self.k > 1:
            raise TropdError("greedy decoding (--temperature 0) gives one response per problem; "
                             "pass --temperature > 0 to draw k samples")
        if not 0 < self.top_p <= 1:
            raise TropdError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise TropdError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.limit is not None and self.limit < 1:
            raise TropdError(f"--limit must be at least 1, got {self.limit}")
        if self.batch_size < 1:
            raise TropdError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise TropdError(f"--dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.backend not in ("hf", "vllm"):
            raise TropdError(f"--backend must be hf or vllm, got {self.backend!r}")
        if self.data is not None and len(self.benchmarks) != 1:
            raise TropdError("--data is a copy of one benchmark: pass exactly one --benchmark with it")
        if not self.labels:
            self.labels = unique_labels(self.models)


def unique_labels(specs: list[str]) -> list[str]:
    """Display names: the specs, with `#2`, `#3` appended to repeats."""
    labels: list[str] = []
    for spec in specs:
        repeats = sum(1 for earlier in specs[:len(labels)] if earlier == spec)
        labels.append(spec if repeats == 0 else f"{spec} #{repeats + 1}")
    return labels
