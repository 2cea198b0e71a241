"""Run by test_launch.py under torchrun: with a sharded student, rank 0 generates once and rank 1 twice,
with different lengths, through the rollout backend; then both train one step together (a rank waiting
for another here would time the test out)."""

import torch

from tropd_cli.engine import distributed
from tropd_cli.engine.rollout import HFGenerateBackend, SamplingParams
from tropd_cli.engine.scoring import StudentScorer, build_sequences
from tropd_cli.engine.strategy import make_strategy
from tropd_cli.models import load_causal_lm

torch.set_num_threads(1)
device = torch.device("cpu")
with distributed.process_group(device):
    strategy = make_strategy("fsdp2", lora=False, prompts_per_step=2, device=device)
    student = load_causal_lm("toylab:student", "float32", device, trainable=True)
    scorer = strategy.wrap(StudentScorer(student, 64))
    backend = HFGenerateBackend(student, pad_token_id=0, eos_token_ids=[9999])  # no EOS: full lengths
    new_tokens = 4 + 8 * strategy.rank
    with strategy.gathered():
        for _ in range(1 + strategy.rank):
            rollouts = backend.generate([[5, 6, 7]], 1, SamplingParams(new_tokens, 1.0, 1.0), 0)
    response = rollouts.response_ids[0]
    stats = scorer(build_sequences([[5, 6, 7]], [response], 0), torch.zeros((len(response), 4), dtype=torch.long))
    stats.logprobs.sum().backward()
    trainable = [p for p in scorer.parameters() if p.requires_grad]
    grad_norm = strategy.clip_and_step(trainable, torch.optim.AdamW(trainable, lr=1e-3), 1.0)
    print(f"rank {strategy.rank}: {len(response)} new tokens, grad norm {grad_norm:.6f}", flush=True)
