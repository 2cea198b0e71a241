"""tropd against TRL on one on-policy distillation step, and both against the plain Hugging Face limit.

Three workers run the same step on the same randomly initialised Qwen3 teacher/student pair, the same
prompts, rollouts per prompt, max new tokens, temperature 1, micro-batch and learning rate:

- `tropd`: the `opd` objective through `tropd_cli.engine.trainer.Trainer`, the engine the CLI runs;
- `trl`: `trl.DistillationTrainer` with beta=1 (reverse KL over the full vocabulary), always on-policy,
  `gradient_accumulation_steps` set so that one optimizer step sees the same rollout batch;
- `hf`: the limit of the Hugging Face path, plain transformers calls and no framework: one student
  `generate`, then per micro-batch a teacher forward and a student forward/backward on the sampled tokens'
  log-probs (full logits of response positions, `logits_to_keep`), then clip and AdamW.

Throughput is tokens per second = (generated tokens + scored tokens) per optimizer step / median step
time, where generated tokens are the sampled response tokens and scored tokens the prompt+response tokens
of every rollout (each goes through one teacher and one student forward). Every worker runs in a fresh
subprocess; warm-up steps are excluded from the median. Peak memory is the peak during the timed steps
above what was resident before them (weights, optimizer state): on CUDA `torch.cuda.max_memory_allocated`
(reset after warm-up; the absolute peak is reported too), on CPU the peak RSS (VmHWM, reset through
/proc/self/clear_refs after warm-up) with glibc's mmap threshold pinned so that freed tensors leave RSS.

On a CPU the targets use each worker's CPU time (`time.process_time`) by default: with one torch thread
it equals the wall time of an idle machine and stays steady when other work shares the cores (`--clock
wall` to use the wall clock; both are printed). On CUDA they use the wall clock, synchronised per step.

Models keep float32 weights and no worker uses gradient checkpointing (TRL's default is switched off).
`--precision bf16` (the default on CUDA) runs every forward pass, generation included, under bfloat16
autocast in all three workers (tropd `train.autocast=bfloat16`, TRL `bf16=True`); `fp32` (the default on
CPU) runs everything in float32. A random student rarely samples EOS, so responses are mostly
`max_new_tokens` long in every worker.

    python bench/trl_compare.py --device cpu --sizes s,m,v32k --steps 3 --out results.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
FRAMEWORKS = ("hf", "tropd", "trl")
MiB = 2**20


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int


@dataclass(frozen=True)
class PairSize:
    """A teacher/student pair sharing one vocabulary."""

    vocab: int
    student: ModelShape
    teacher: ModelShape


SIZES = {
    "s": PairSize(2048, ModelShape(64, 2, 4), ModelShape(128, 4, 4)),
    "m": PairSize(8192, ModelShape(256, 4, 4), ModelShape(512, 4, 8)),
    "l": PairSize(32768, ModelShape(1024, 8, 8), ModelShape(2048, 8, 16)),
    "v32k": PairSize(32768, ModelShape(64, 2, 4), ModelShape(128, 2, 4)),
    "v152k": PairSize(151936, ModelShape(256, 2, 4), ModelShape(512, 2, 8)),
}
LARGE_VOCAB = 32768


@dataclass(frozen=True)
class StepShape:
    """One optimizer step: `prompts` x `rollouts` sampled responses, scored `micro_batch` at a time."""

    prompts: int
    rollouts: int
    prompt_len: int
    max_new_tokens: int
    micro_batch: int
    lr: float = 1e-5


DEFAULT_SHAPES = {"cpu": StepShape(4, 4, 16, 32, 8), "cuda": StepShape(8, 4, 64, 256, 8)}
DEFAULT_SIZES = {"cpu": "s,m,v32k", "cuda": "m,v32k,v152k,l"}


# ---------------------------------------------------------------------------------------------- models


def build_tokenizer(vocab: int):
    """A word-level tokenizer over `vocab` tokens: <pad>, <eos>, <unk>, then t3 ... t{vocab-1}, split on
    spaces (the special tokens never occur inside a word, so every word is one token)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": PAD_ID, "<eos>": EOS_ID, "<unk>": UNK_ID, **{f"t{i}": i for i in range(UNK_ID + 1, vocab)}}
    core = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>", padding_side="left", model_max_length=1 << 20)


def qwen3_config(vocab: int, shape: ModelShape, max_positions: int):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab, hidden_size=shape.hidden, intermediate_size=3 * shape.hidden,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=max(1, shape.heads // 2), head_dim=shape.hidden // shape.heads,
        max_position_embeddings=max_positions, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
    )


def save_pair(size: PairSize, folder: Path, max_positions: int, seed: int = 0) -> None:
    """Random-init teacher and student saved as `folder/teacher`, `folder/student` with the tokenizer."""
    from transformers import Qwen3ForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    tokenizer = build_tokenizer(size.vocab)
    for offset, (name, shape) in enumerate((("teacher", size.teacher), ("student", size.student))):
        torch.manual_seed(seed + offset)
        model = Qwen3ForCausalLM(qwen3_config(size.vocab, shape, max_positions))
        model.save_pretrained(folder / name)
        tokenizer.save_pretrained(folder / name)


def synthetic_prompts(vocab: int, count: int, length: int, seed: int) -> list[list[int]]:
    """`count` prompts of `length` token ids, none of them special."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(UNK_ID + 1, vocab, (count, length), generator=generator).tolist()


def step_prompts(spec: dict) -> list[list[list[int]]]:
    """The prompts of every step (warm-up included), identical in every worker."""
    shape, steps = StepShape(**spec["shape"]), spec["warmup"] + spec["steps"]
    flat = synthetic_prompts(spec["vocab"], steps * shape.prompts, shape.prompt_len, spec["seed"])
    return [flat[i * shape.prompts:(i + 1) * shape.prompts] for i in range(steps)]


# ---------------------------------------------------------------------------------------------- memory


class PeakMemory:
    """Peak memory of the code run between `reset()` and `read()`.

    CUDA: the caching allocator's peak of allocated bytes. CPU: the process's peak resident set (VmHWM),
    whose high-water mark `reset()` clears through /proc/self/clear_refs (Linux); run with
    MALLOC_MMAP_THRESHOLD_ pinned so that large freed blocks are unmapped at once.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.resident = 0

    def reset(self) -> None:
        synchronize(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.resident = torch.cuda.memory_allocated(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")
            self.resident = _proc_status_bytes("VmRSS")

    def read(self) -> dict[str, float]:
        """Peak bytes above what was resident at `reset()` (`step_bytes`) and the absolute peak."""
        synchronize(self.device)
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _proc_status_bytes("VmHWM")
        return {"peak_bytes": peak, "resident_bytes": self.resident, "step_bytes": peak - self.resident}


def _proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------- workers


@dataclass
class StepRecord:
    seconds: float
    cpu_seconds: float
    generated: int
    scored: int
    parts: dict[str, float]


def worker_result(records: list[StepRecord], warmup: int, memory: dict[str, float]) -> dict:
    """What a worker hands back: its timed steps (after `warmup`) and its peak memory."""
    return {"steps": [asdict(r) for r in records[warmup:]], **memory}


def summarise(runs: list[dict]) -> dict:
    """Medians over the timed steps of every run of one worker, and its median peak memory."""
    steps = [step for run in runs for step in run["steps"]]
    seconds = statistics.median(s["seconds"] for s in steps)
    cpu_seconds = statistics.median(s["cpu_seconds"] for s in steps)
    tokens = statistics.median(s["generated"] + s["scored"] for s in steps)
    return {
        "step_seconds": seconds, "cpu_step_seconds": cpu_seconds,
        "generated_tokens": statistics.median(s["generated"] for s in steps),
        "scored_tokens": statistics.median(s["scored"] for s in steps),
        "tokens_per_second": tokens / seconds, "tokens_per_cpu_second": tokens / cpu_seconds,
        "parts": {name: statistics.median(s["parts"][name] for s in steps) for name in steps[0]["parts"]},
        **{key: statistics.median(run[key] for run in runs) for key in ("peak_bytes", "resident_bytes", "step_bytes")},
        "runs": runs,
    }


def run_hf(spec: dict, device: torch.device) -> dict:
    """The plain transformers step: generate, teacher forward, student forward/backward, AdamW."""
    from transformers import AutoModelForCausalLM

    shape, folder = StepShape(**spec["shape"]), Path(spec["folder"])
    teacher = AutoModelForCausalLM.from_pretrained(folder / "teacher", dtype=torch.float32).to(device)
    teacher.requires_grad_(False).eval()
    student = AutoModelForCausalLM.from_pretrained(folder / "student", dtype=torch.float32).to(device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=shape.lr, weight_decay=0.1)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec["precision"] == "bf16")

    memory, records = PeakMemory(device), []
    for index, prompts in enumerate(step_prompts(spec)):
        if index == spec["warmup"]:
            memory.reset()
        parts = dict.fromkeys(("generate", "teacher", "student", "optimizer"), 0.0)
        began, cpu_began = time.perf_counter(), time.process_time()
        prompt_ids = torch.tensor([p for p in prompts for _ in range(shape.rollouts)], device=device)
        student.eval()
        with torch.no_grad(), autocast():
            output = student.generate(
                input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids), do_sample=True, temperature=1.0,
                top_p=1.0, top_k=0, max_new_tokens=shape.max_new_tokens, eos_token_id=EOS_ID,
                pad_token_id=PAD_ID, use_cache=True)
        student.train()
        responses = output[:, shape.prompt_len:]  # [rollouts, width]
        after_eos = (responses == EOS_ID).int().cumsum(-1) - (responses == EOS_ID).int()
        response_mask = (after_eos == 0).long()  # 1 up to and including the first EOS
        synchronize(device)
        parts["generate"] = time.perf_counter() - began
        total = float(response_mask.sum())
        keep = responses.shape[1] + 1
        for start in range(0, output.shape[0], shape.micro_batch):
            ids = output[start:start + shape.micro_batch]
            mask = response_mask[start:start + shape.micro_batch]
            attention = torch.cat([torch.ones_like(ids[:, :shape.prompt_len]), mask], dim=1)
            targets = ids[:, shape.prompt_len:, None]
            tick = time.perf_counter()
            with torch.no_grad(), autocast():
                logits = teacher(input_ids=ids, attention_mask=attention, logits_to_keep=keep).logits[:, :-1]
                teacher_logprobs = torch.log_softmax(logits.float(), -1).gather(-1, targets).squeeze(-1)
                del logits
            synchronize(device)
            parts["teacher"] += time.perf_counter() - tick
            tick = time.perf_counter()
            with autocast():
                logits = student(input_ids=ids, attention_mask=attention, logits_to_keep=keep).logits[:, :-1]
            student_logprobs = torch.log_softmax(logits.float(), -1).gather(-1, targets).squeeze(-1)
            del logits
            old = student_logprobs.detach()
            loss = -((teacher_logprobs - old) * torch.exp(student_logprobs - old) * mask).sum() / total
            loss.backward()
            synchronize(device)
            parts["student"] += time.perf_counter() - tick
        tick = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        parts["optimizer"] = time.perf_counter() - tick
        generated = int(total)
        records.append(StepRecord(time.perf_counter() - began, time.process_time() - cpu_began, generated,
                                  generated + shape.prompt_len * output.shape[0], parts))
    return worker_result(records, spec["warmup"], memory.read())


class CountingBackend:
    """A rollout backend that records how many prompt and response tokens each call produced."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.calls: list[tuple[int, int]] = []

    def generate(self, prompt_ids, n, params, generator_seed):
        rollouts = self.inner.generate(prompt_ids, n, params, generator_seed)
        generated = sum(len(r) for r in rollouts.response_ids)
        prompt_tokens = sum(len(rollouts.prompt_ids[i]) for i in rollouts.prompt_index)
        self.calls.append((generated, prompt_tokens))
        return rollouts


def run_tropd(spec: dict, device: torch.device) -> dict:
    """The `opd` step through tropd's Trainer, with the models loaded by tropd's one loader."""
    from tropd_cli.config import RunConfig
    from tropd_cli.engine.precision import autocast_dtype
    from tropd_cli.engine.rollout import HFGenerateBackend
    from tropd_cli.engine.run import trainer_for
    from tropd_cli.engine.trainer import Models
    from tropd_cli.models import load_causal_lm

    shape, folder = StepShape(**spec["shape"]), Path(spec["folder"])
    config = RunConfig.model_validate({
        "teacher": {"model": str(folder / "teacher")}, "student": {"model": str(folder / "student")},
        "rollout": {"n": shape.rollouts, "prompts_per_step": shape.prompts, "max_new_tokens": shape.max_new_tokens,
                    "temperature": 1.0, "top_p": 1.0, "batch_size": shape.prompts * shape.rollouts},
        "objective": {"name": "opd"},
        "train": {"steps": spec["warmup"] + spec["steps"], "lr": shape.lr, "weight_decay": 0.1,
                  "max_grad_norm": 1.0, "micro_batch_size": shape.micro_batch, "seed": spec["seed"],
                  "logit_chunk_size": spec["chunk_size"], "device": device.type,
                  "autocast": "bfloat16" if spec["precision"] == "bf16" else "none"},
    })
    teacher = load_causal_lm(str(folder / "teacher"), "float32", device, trainable=False)
    student = load_causal_lm(str(folder / "student"), "float32", device, trainable=True)
    backend = CountingBackend(HFGenerateBackend(student, PAD_ID, [EOS_ID], config.rollout.batch_size,
                                                autocast=autocast_dtype(config.train.autocast, device)))
    trainer = trainer_for(config, Models(teacher, student, PAD_ID, device), backend, iter(step_prompts(spec)))
    memory, records = PeakMemory(device), []
    for index in range(spec["warmup"] + spec["steps"]):
        if index == spec["warmup"]:
            memory.reset()
        began, cpu_began = time.perf_counter(), time.process_time()
        record = trainer.train_step()
        synchronize(device)
        generated, prompt_tokens = backend.calls[-1]
        parts = {name: record[name] for name in ("rollout_s", "score_s", "update_s")}
        records.append(StepRecord(time.perf_counter() - began, time.process_time() - cpu_began, generated,
                                  generated + prompt_tokens, parts))
    return worker_result(records, spec["warmup"], memory.read())


def run_trl(spec: dict, device: torch.device) -> dict:
    """TRL's on-policy DistillationTrainer (beta=1), timed between optimizer steps by a callback."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    shape, folder = StepShape(**spec["shape"]), Path(spec["folder"])
    rollouts_per_step = shape.prompts * shape.rollouts
    if rollouts_per_step % shape.micro_batch:
        raise SystemExit("prompts x rollouts must be a multiple of the micro-batch for TRL")
    steps = spec["warmup"] + spec["steps"]
    # DistillationTrainer samples one completion per prompt row: repeat each prompt `rollouts` times.
    rows = [" ".join(f"t{i}" for i in p) for batch in step_prompts(spec) for p in batch for _ in range(shape.rollouts)]
    tokenizer = AutoTokenizer.from_pretrained(folder / "student")
    teacher = AutoModelForCausalLM.from_pretrained(folder / "teacher", dtype=torch.float32).to(device)
    teacher.requires_grad_(False).eval()
    student = AutoModelForCausalLM.from_pretrained(folder / "student", dtype=torch.float32).to(device)
    memory, records, generations = PeakMemory(device), [], []
    memory_read: dict[str, float] = {}

    class Counting(DistillationTrainer):
        def _generate(self, prompts):
            result = super()._generate(prompts)
            prompt_ids, completion_ids = result[0], result[1]
            if any(len(ids) != shape.prompt_len for ids in prompt_ids):
                raise RuntimeError("TRL tokenized the prompts differently from the other workers")
            generations.append((sum(map(len, completion_ids)), sum(map(len, prompt_ids))))
            return result

    class StepClock(TrainerCallback):
        last = (0.0, 0.0)

        def on_train_begin(self, args, state, control, **kwargs):
            self.last = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            synchronize(device)
            records.append((time.perf_counter() - self.last[0], time.process_time() - self.last[1]))
            if state.global_step == spec["warmup"]:
                memory.reset()
            if state.global_step == steps:
                memory_read.update(memory.read())
            self.last = time.perf_counter(), time.process_time()

    with tempfile.TemporaryDirectory() as output_dir:
        args = DistillationConfig(
            output_dir=output_dir, per_device_train_batch_size=shape.micro_batch,
            gradient_accumulation_steps=rollouts_per_step // shape.micro_batch, max_steps=steps,
            learning_rate=shape.lr, lr_scheduler_type="constant", weight_decay=0.1, max_grad_norm=1.0,
            beta=1.0, temperature=1.0, top_p=1.0, top_k=0, max_completion_length=shape.max_new_tokens,
            shuffle_dataset=False, gradient_checkpointing=False, bf16=spec["precision"] == "bf16", fp16=False,
            use_cpu=device.type == "cpu", seed=spec["seed"], logging_steps=10 * steps, save_strategy="no",
            report_to="none", disable_tqdm=True, dataloader_num_workers=0,
        )
        trainer = Counting(model=student, teacher_model=teacher, args=args, processing_class=tokenizer,
                           train_dataset=Dataset.from_dict({"prompt": rows}), callbacks=[StepClock()])
        trainer.train()
    step_records = [StepRecord(seconds, cpu_seconds, generated, generated + prompt_tokens, {})
                    for (seconds, cpu_seconds), (generated, prompt_tokens) in zip(records, generations)]
    return worker_result(step_records, spec["warmup"], memory_read)


WORKERS = {"hf": run_hf, "tropd": run_tropd, "trl": run_trl}


def worker_main(spec_path: str) -> None:
    """Run one worker in this (fresh) process and write its result next to its spec."""
    spec = json.loads(Path(spec_path).read_text())
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    result = WORKERS[spec["framework"]](spec, torch.device(spec["device"]))
    Path(spec["result_path"]).write_text(json.dumps(result))


def run_worker(spec: dict, workdir: Path) -> dict:
    """Start a fresh Python process for one worker; return its result (or the error it ended with)."""
    spec_path = workdir / f"{spec['size']}-{spec['framework']}-{spec['repeat']}.json"
    spec = {**spec, "result_path": str(spec_path.with_suffix(".result.json"))}
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent),
                                                       os.environ.get("PYTHONPATH")]))}
    if spec["device"] == "cpu":  # see PeakMemory
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    done = subprocess.run([sys.executable, __file__, "--worker", str(spec_path)], env=env, capture_output=True,
                          text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        return {"error": f"exit {done.returncode}: {tail}"}
    return json.loads(Path(spec["result_path"]).read_text())


# ---------------------------------------------------------------------------------------------- report


def ratios(size: PairSize, results: dict[str, dict], clock: str) -> dict[str, float | bool | None]:
    """tropd's fraction of the HF limit, its speed-up and memory ratio against TRL, and the targets.

    `clock` picks the throughput the targets use: `tokens_per_second` (wall) or `tokens_per_cpu_second`.
    """
    def get(framework: str, key: str) -> float | None:
        value = results.get(framework, {}).get(key)
        return None if value is None else float(value)

    def divide(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or b == 0 else a / b

    of_limit = divide(get("tropd", clock), get("hf", clock))
    speedup = divide(get("tropd", clock), get("trl", clock))
    memory = divide(get("tropd", "step_bytes"), get("trl", "step_bytes"))
    return {
        "clock": clock, "tropd_of_hf_limit": of_limit, "tropd_over_trl_speed": speedup,
        "tropd_over_trl_memory": memory,
        "tropd_of_hf_limit_wall": divide(get("tropd", "tokens_per_second"), get("hf", "tokens_per_second")),
        "tropd_over_trl_speed_wall": divide(get("tropd", "tokens_per_second"), get("trl", "tokens_per_second")),
        "target_limit_met": None if of_limit is None else of_limit >= 0.9,
        "target_speed_met": None if speedup is None else speedup >= 1.2,
        "target_memory_met": None if memory is None or size.vocab < LARGE_VOCAB else memory <= 0.5,
    }


def print_size(name: str, size: PairSize, results: dict[str, dict], summary: dict) -> None:
    print(f"\n== size {name}: vocab {size.vocab}, student {size.student.hidden}x{size.student.layers}, "
          f"teacher {size.teacher.hidden}x{size.teacher.layers} (hidden x layers)")
    print(f"{'worker':<6} {'tokens/step':>11} {'step s':>7} {'tok/s':>7} {'cpu s':>7} {'tok/cpu-s':>9} "
          f"{'step MiB':>8} {'peak MiB':>8}  parts (s)")
    for framework, result in results.items():
        if "error" in result:
            print(f"{framework:<6} failed: {result['error']}")
            continue
        tokens = result["generated_tokens"] + result["scored_tokens"]
        parts = " ".join(f"{k}={v:.3f}" for k, v in result["parts"].items())
        print(f"{framework:<6} {tokens:>11.0f} {result['step_seconds']:>7.3f} {result['tokens_per_second']:>7.0f} "
              f"{result['cpu_step_seconds']:>7.3f} {result['tokens_per_cpu_second']:>9.0f} "
              f"{result['step_bytes'] / MiB:>8.1f} {result['peak_bytes'] / MiB:>8.1f}  {parts}")

    def show(value: float | None, target: bool | None, label: str) -> str:
        text = "n/a" if value is None else f"{value:.2f}"
        verdict = "" if target is None else (" met" if target else " MISSED")
        return f"{label} {text}{verdict}"

    clock = "tok/s" if summary["clock"] == "tokens_per_second" else "tok/cpu-s"
    print(f"  targets on {clock}: " + "; ".join([
        show(summary["tropd_of_hf_limit"], summary["target_limit_met"], "tropd/HF-limit (>=0.90)"),
        show(summary["tropd_over_trl_speed"], summary["target_speed_met"], "tropd/TRL (>=1.2)"),
        show(summary["tropd_over_trl_memory"], summary["target_memory_met"],
             "tropd/TRL step memory" + (" (<=0.5)" if size.vocab >= LARGE_VOCAB else "")),
    ]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--sizes", help=f"comma-separated, from {', '.join(SIZES)} "
                        f"(default cpu: {DEFAULT_SIZES['cpu']}; cuda: {DEFAULT_SIZES['cuda']})")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first")
    parser.add_argument("--repeats", type=int, default=1, help="fresh runs of each worker, in rotation; the "
                        "median is over the timed steps of all of them")
    parser.add_argument("--frameworks", default=",".join(FRAMEWORKS), help="comma-separated subset of hf,tropd,trl")
    parser.add_argument("--prompts", type=int, help="prompts per step")
    parser.add_argument("--rollouts", type=int, help="rollouts per prompt")
    parser.add_argument("--prompt-len", type=int, help="prompt tokens")
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--micro-batch", type=int, help="sequences per scoring/backward pass")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--chunk-size", type=lambda v: v if v == "auto" else int(v), default="auto",
                        help="tropd train.logit_chunk_size: positions or auto (the default)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), help="float32 throughout, or bfloat16 autocast "
                        "of every forward pass over float32 weights (default: fp32 on cpu, bf16 on cuda)")
    parser.add_argument("--threads", type=int, help="torch CPU threads per worker (default: 1 on cpu)")
    parser.add_argument("--clock", choices=("wall", "cpu"), help="time the targets use: wall clock, or the "
                        "worker's CPU time, steadier on a shared CPU with one thread (default: cpu on cpu, else wall)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write all results as JSON here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = (args.sizes or DEFAULT_SIZES[args.device]).split(",")
    unknown = [s for s in sizes if s not in SIZES]
    frameworks = args.frameworks.split(",")
    if unknown or not set(frameworks) <= set(FRAMEWORKS):
        parser.error(f"unknown size or framework: {unknown or frameworks}")
    if min(args.steps, args.warmup, args.repeats) < 1:
        parser.error("--steps, --warmup and --repeats must be at least 1")
    args.sizes, args.frameworks = sizes, frameworks
    defaults = DEFAULT_SHAPES[args.device]
    args.shape = StepShape(*(getattr(args, field) or getattr(defaults, field) for field in
                             ("prompts", "rollouts", "prompt_len", "max_new_tokens", "micro_batch", "lr")))
    args.threads = args.threads if args.threads is not None else (1 if args.device == "cpu" else 0)
    args.precision = args.precision or ("fp32" if args.device == "cpu" else "bf16")
    if args.clock == "cpu" and args.device == "cuda":
        parser.error("--clock cpu measures CPU work; on cuda use the wall clock")
    args.clock = "tokens_per_cpu_second" if (args.clock or args.device) == "cpu" else "tokens_per_second"
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return {}
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    shape = args.shape
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else f"cpu, {args.threads} thread(s)"
    print(f"device {device_name}; step: {shape.prompts} prompts x {shape.rollouts} rollouts, prompt "
          f"{shape.prompt_len} tokens, up to {shape.max_new_tokens} new, micro-batch {shape.micro_batch}, "
          f"lr {shape.lr}; {args.precision}; {args.warmup} warm-up + {args.steps} timed steps x {args.repeats} run(s) "
          "(median)")
    from tropd_cli.environment import describe

    report = {"command": " ".join([sys.executable, *sys.argv]), "environment": describe(args.device, command=sys.argv),
              "device": device_name, "shape": asdict(shape), "steps": args.steps, "warmup": args.warmup,
              "repeats": args.repeats, "chunk_size": args.chunk_size, "precision": args.precision,
              "clock": args.clock, "sizes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for name in args.sizes:
            size = SIZES[name]
            save_pair(size, workdir / name, max_positions=1 << math.ceil(math.log2(
                shape.prompt_len + shape.max_new_tokens + 1)), seed=args.seed)
            spec = {"size": name, "folder": str(workdir / name), "device": args.device, "shape": asdict(shape),
                    "steps": args.steps, "warmup": args.warmup, "seed": args.seed, "threads": args.threads,
                    "chunk_size": args.chunk_size, "precision": args.precision, "vocab": size.vocab}
            runs: dict[str, list[dict]] = {framework: [] for framework in args.frameworks}
            for repeat in range(args.repeats):
                for framework in args.frameworks:
                    runs[framework].append(run_worker({**spec, "framework": framework, "repeat": repeat}, workdir))
            results = {framework: next((r for r in done if "error" in r), None) or summarise(done)
                       for framework, done in runs.items()}
            summary = ratios(size, results, args.clock)
            print_size(name, size, results, summary)
            report["sizes"][name] = {"size": asdict(size), "results": results, "summary": summary}
            if args.out:  # after every size, so that an interrupted run keeps what it measured
                Path(args.out).write_text(json.dumps(report, indent=2))
    if args.out:
        print(f"\nwrote {args.out}")
    return report


if __name__ == "__main__":
    main()
