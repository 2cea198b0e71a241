"""The teacher-scoring seam: the protocol, its capabilities, and the conversion every served scorer shares.

A served teacher (vLLM in process or behind an HTTP server) is asked for `prompt_logprobs=K` with
`max_tokens=1` on each prompt+response sequence. For every position j > 0 it returns a map token id ->
(log-prob, rank) holding the K most likely tokens at position j and the token actually there (added when
outside the top K). `stats_from_prompt_logprobs` gathers from those maps, at each response token, what
`score_teacher` gathers from the teacher's own logits: tau_t and the top-k ids and log-probs. The entropy and
the full logits are not in them: such a scorer leaves `entropy` None and does not provide those capabilities.
"""

from __future__ import annotations

from typing import Protocol

import torch

from tropd_cli.engine.scoring import SequenceBatch, TeacherStats

CAPABILITIES = ("logprobs", "topk", "entropy", "full_logits")
SERVED = frozenset({"logprobs", "topk"})  # what prompt_logprobs can give
# What each `teacher.backend` returns, known before anything is loaded (preflight compares it with the objective).
BACKEND_CAPABILITIES = {"hf": frozenset(CAPABILITIES), "vllm": SERVED, "server": SERVED}

PositionLogprobs = dict[int, tuple[float, int]]  # token id -> (log-prob, rank) at one position


class TeacherScorer(Protocol):
    """Scores sequences with the frozen teacher, without gradients."""

    provides: frozenset[str]  # a subset of CAPABILITIES
    head: torch.nn.Module | None  # the vocabulary head, with `full_logits`

    def score(self, batch: SequenceBatch, top_k: int, keep_hidden: bool = False) -> TeacherStats: ...


def sequences_of(batch: SequenceBatch) -> list[list[int]]:
    """The unpadded prompt+response token ids of each row."""
    lengths = batch.attention_mask.sum(dim=1).tolist()
    return [row[:length] for row, length in zip(batch.input_ids.tolist(), lengths)]


def stats_from_prompt_logprobs(batch: SequenceBatch, per_sequence: list[list[PositionLogprobs | None]],
                               top_k: int) -> TeacherStats:
    """tau_t and the teacher's top-k at every response token of `batch`, in scoring order (row by row), from
    each sequence's prompt log-probs (`per_sequence[b][j]` describes token j of sequence b; entry 0 is None).

    Raises ValueError when a sequence's entries do not cover it, or a position lacks its own token or holds
    fewer than `top_k` others: a step never trains on a partial score.
    """
    sequences = sequences_of(batch)
    if len(per_sequence) != len(sequences):
        raise ValueError(f"{len(per_sequence)} scored sequences for a batch of {len(sequences)}")
    logprobs, topk_ids, topk_logprobs = [], [], []
    for row, (ids, positions) in enumerate(zip(sequences, per_sequence)):
        if len(positions) != len(ids):
            raise ValueError(f"sequence {row}: {len(positions)} scored positions for {len(ids)} tokens")
        for j in batch.loss_mask[row].nonzero().flatten().tolist():
            entry, token = positions[j + 1], ids[j + 1]
            if entry is None or token not in entry:
                raise ValueError(f"sequence {row}, position {j + 1}: no log-prob of its token {token}")
            best = sorted(entry.items(), key=lambda item: (-item[1][0], item[1][1]))[:top_k]
            if len(best) < top_k:
                raise ValueError(f"sequence {row}, position {j + 1}: {len(best)} log-probs, not the top {top_k}")
            logprobs.append(entry[token][0])
            topk_ids.append([token_id for token_id, _ in best])
            topk_logprobs.append([value for _, (value, _) in best])
    device = batch.input_ids.device
    return TeacherStats(
        logprobs=torch.tensor(logprobs, dtype=torch.float32, device=device),
        topk_ids=torch.tensor(topk_ids, dtype=torch.long, device=device).reshape(-1, top_k),
        topk_logprobs=torch.tensor(topk_logprobs, dtype=torch.float32, device=device).reshape(-1, top_k),
        entropy=None,
    )
