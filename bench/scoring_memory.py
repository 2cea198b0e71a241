"""Peak memory of tropd's scoring at a 32k vocabulary: it follows the chunk size and k, not vocab x length.

One scoring pass as the trainer runs it: `score_teacher` (tau_t, teacher top-k, entropy) and
`score_student` (s_t and log pi_S at the teacher's top-k ids, checkpointed per chunk), then the TrOPD loss
with the differentiable top-k outlier term (`outlier=fkl_grad`, so gradients flow through both gathers)
and its backward. It is measured over a grid of `logit_chunk_size`, `top_k` and batch x response length,
and against the naive path that materialises both models' [batch, length, vocab] float32 logits (plain
`model(...).logits`, log-softmax, gather, the same loss with k=64, backward).

The reported memory is the peak above what was resident before the pass (weights, inputs): on CUDA from
`torch.cuda.max_memory_allocated`; on CPU from the process's peak RSS (VmHWM, reset through
/proc/self/clear_refs before each measurement, with glibc's mmap threshold pinned so that freed tensors
leave RSS at once; the script re-executes itself with that setting). For reference the table prints the
size of one [chunk, vocab] and one [tokens, vocab] float32 tensor.

    python bench/scoring_memory.py --device cpu --out scoring_memory.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trl_compare import MiB, ModelShape, PeakMemory, qwen3_config  # noqa: E402

from tropd_cli.engine.objectives.base import TokenStats  # noqa: E402
from tropd_cli.engine.objectives.tropd import tropd  # noqa: E402
from tropd_cli.engine.scoring import build_sequences, score_student, score_teacher  # noqa: E402

PROMPT_LEN = 16
NAIVE_TOP_K = 64
STUDENT, TEACHER = ModelShape(64, 2, 4), ModelShape(128, 2, 4)


def build_models(vocab: int, device: torch.device, max_positions: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Random-init Qwen3 teacher (frozen) and student sharing a `vocab`-token vocabulary."""
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(0)
    teacher = Qwen3ForCausalLM(qwen3_config(vocab, TEACHER, max_positions)).to(device).eval()
    teacher.requires_grad_(False)
    student = Qwen3ForCausalLM(qwen3_config(vocab, STUDENT, max_positions)).to(device).train()
    return teacher, student


def tropd_loss(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, teacher_topk: torch.Tensor,
               student_topk: torch.Tensor) -> torch.Tensor:
    """The TrOPD token-mean loss with differentiable top-k forward-KL outliers."""
    stats = TokenStats(student_logprobs=student_logprobs, teacher_logprobs=teacher_logprobs,
                                  mask=torch.ones_like(teacher_logprobs), teacher_topk_logprobs=teacher_topk,
                                  student_topk_logprobs=student_topk)
    output = tropd(stats, outlier="fkl_grad", generator=torch.Generator().manual_seed(0))
    return output.mean_loss()


def chunked_pass(teacher, student, batch, top_k: int, chunk: int) -> None:
    """tropd's scoring: chunked teacher stats, checkpointed student chunks, loss, backward."""
    teacher_stats = score_teacher(teacher, batch, top_k, chunk)
    student_stats = score_student(student, batch, teacher_stats.topk_ids, chunk)
    tropd_loss(student_stats.logprobs, teacher_stats.logprobs, teacher_stats.topk_logprobs,
               student_stats.topk_logprobs).backward()


def naive_pass(teacher, student, batch, top_k: int) -> None:
    """Full [batch, length, vocab] logits of both models, then the same loss and backward."""
    response = batch.loss_mask.bool()
    targets = batch.targets[response][:, None]
    with torch.no_grad():
        logits = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
        teacher_logprobs = torch.log_softmax(logits.float(), -1)[response]  # [tokens, vocab]
        del logits
        teacher_topk, topk_ids = teacher_logprobs.topk(top_k, -1)
        tau = teacher_logprobs.gather(-1, targets).squeeze(-1)
        del teacher_logprobs
    logits = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    student_logprobs = torch.log_softmax(logits.float(), -1)[response]
    tropd_loss(student_logprobs.gather(-1, targets).squeeze(-1), tau, teacher_topk,
               student_logprobs.gather(-1, topk_ids)).backward()


def measure(teacher, student, batch, device: torch.device, top_k: int, chunk: int | None,
            autocast: torch.dtype | None = None) -> float:
    """Peak bytes of one pass above the memory resident before it (`chunk` None: the naive path);
    `autocast` runs the forward passes under that dtype, as tropd's `train.autocast` does."""
    student.zero_grad(set_to_none=True)
    gc.collect()
    memory = PeakMemory(device)
    memory.reset()
    with torch.autocast(device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        if chunk is None:
            naive_pass(teacher, student, batch, top_k)
        else:
            chunked_pass(teacher, student, batch, top_k, chunk)
    peak = memory.read()["step_bytes"]
    student.zero_grad(set_to_none=True)
    return peak


def random_batch(vocab: int, batch: int, length: int, device: torch.device):
    generator = torch.Generator().manual_seed(batch * 1000 + length)
    prompts = torch.randint(2, vocab, (batch, PROMPT_LEN), generator=generator).tolist()
    responses = torch.randint(2, vocab, (batch, length), generator=generator).tolist()
    return build_sequences(prompts, responses, pad_token_id=0).to(device)


def parse_pairs(text: str) -> list[tuple[int, int]]:
    """'4x64,8x128' -> [(4, 64), (8, 128)] (sequences x response tokens)."""
    return [tuple(int(v) for v in item.split("x")) for item in text.split(",")]  # type: ignore[misc]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--batches", default=None, help="sequences x response tokens, comma-separated "
                        "(default cpu: 4x64,8x128,16x256; cuda: 8x256,16x512,32x1024)")
    parser.add_argument("--chunks", default="64,256,1024", help="logit_chunk_size values")
    parser.add_argument("--top-ks", default="1,64,1024", help="top_k values")
    parser.add_argument("--precision", choices=("fp32", "bf16"), help="float32, or bfloat16 autocast of the "
                        "forward passes (default: fp32 on cpu, bf16 on cuda, as tropd's train.autocast=auto)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    default_batches = "4x64,8x128,16x256" if args.device == "cpu" else "8x256,16x512,32x1024"
    args.batches = parse_pairs(args.batches or default_batches)
    args.precision = args.precision or ("fp32" if args.device == "cpu" else "bf16")
    args.chunks = [int(v) for v in args.chunks.split(",")]
    args.top_ks = [int(v) for v in args.top_ks.split(",")]
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.device == "cpu" and "MALLOC_MMAP_THRESHOLD_" not in os.environ and argv is None:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    longest = max(length for _, length in args.batches) + PROMPT_LEN + 1
    teacher, student = build_models(args.vocab, device, max_positions=longest)
    vocab_bytes = args.vocab * 4
    autocast = torch.bfloat16 if args.precision == "bf16" else None
    print(f"vocab {args.vocab}; teacher {TEACHER.hidden}x{TEACHER.layers}, student {STUDENT.hidden}x"
          f"{STUDENT.layers} (hidden x layers); prompt {PROMPT_LEN} tokens; peak MiB above resident "
          f"({'cuda max_memory_allocated' if device.type == 'cuda' else 'CPU peak RSS'}); {args.precision}")
    print(f"{'batch':>5} {'resp':>5} {'tokens':>6} {'chunk':>6} {'top_k':>6} {'peak MiB':>9} "
          f"{'[chunk,V] MiB':>13} {'[tokens,V] MiB':>14} {'naive MiB (k=64)':>16}")
    rows = []
    for batch_size, length in args.batches:
        batch = random_batch(args.vocab, batch_size, length, device)
        tokens = batch_size * length
        naive = measure(teacher, student, batch, device, NAIVE_TOP_K, None, autocast)
        for chunk in args.chunks:
            for top_k in args.top_ks:
                peak = measure(teacher, student, batch, device, top_k, chunk, autocast)
                row = {"batch": batch_size, "response_len": length, "tokens": tokens, "chunk": chunk,
                       "top_k": top_k, "peak_bytes": peak, "naive_peak_bytes": naive,
                       "chunk_vocab_bytes": min(chunk, tokens) * vocab_bytes,
                       "tokens_vocab_bytes": tokens * vocab_bytes}
                rows.append(row)
                print(f"{batch_size:>5} {length:>5} {tokens:>6} {chunk:>6} {top_k:>6} {peak / MiB:>9.1f} "
                      f"{row['chunk_vocab_bytes'] / MiB:>13.1f} {row['tokens_vocab_bytes'] / MiB:>14.1f} "
                      f"{naive / MiB:>16.1f}")
    if args.out:
        from tropd_cli.environment import describe

        Path(args.out).write_text(json.dumps({"command": " ".join([sys.executable, *sys.argv]),
                                              "environment": describe(args.device, command=sys.argv),
                                              "vocab": args.vocab, "device": args.device, "precision": args.precision,
                                              "rows": rows}, indent=2))
        print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
