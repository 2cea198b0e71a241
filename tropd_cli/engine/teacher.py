"""The teacher-scoring seam: what the frozen teacher returns for each response token, and who computes it.

A `TeacherScorer` scores prompt+response sequences and declares in `provides` which of these it can
return: `logprobs` (tau_t of the sampled token), `topk` (the teacher's top-k ids and log-probs), `entropy`
(its full-vocabulary entropy) and `full_logits` (its final hidden states and head, from which a
full-vocabulary divergence recomputes the logits chunk by chunk). An objective declares what it needs
(`ObjectiveSpec.teacher_needs`); `check_teacher` compares the two before the first step. Today the scorer is
the teacher's own forward pass (`HFTeacherScorer`, every capability); a served teacher returns only
log-probs and top-k.
"""

from __future__ import annotations

from typing import Protocol

import torch

from tropd_cli.engine.precision import autocast
from tropd_cli.engine.scoring import SequenceBatch, TeacherStats, decoder_and_head, score_teacher

CAPABILITIES = ("logprobs", "topk", "entropy", "full_logits")


class TeacherScorer(Protocol):
    """Scores sequences with the frozen teacher, without gradients."""

    provides: frozenset[str]  # a subset of CAPABILITIES
    head: torch.nn.Module | None  # the vocabulary head, with `full_logits`

    def score(self, batch: SequenceBatch, top_k: int, keep_hidden: bool = False) -> TeacherStats: ...


class HFTeacherScorer:
    """The teacher's forward pass in this process, chunked over positions (`scoring.score_teacher`)."""

    provides = frozenset(CAPABILITIES)

    def __init__(self, model: torch.nn.Module, chunk_size: int, autocast_dtype: torch.dtype | None = None,
                 device: torch.device | None = None) -> None:
        self.model = model
        self.chunk_size = chunk_size
        self.autocast_dtype = autocast_dtype
        self.device = device or next(model.parameters()).device
        self.head = decoder_and_head(model)[1]

    def score(self, batch: SequenceBatch, top_k: int, keep_hidden: bool = False) -> TeacherStats:
        """tau_t, the top-k, the entropy, and with `keep_hidden` the final hidden states, per response token."""
        with autocast(self.device, self.autocast_dtype):
            return score_teacher(self.model, batch, top_k, self.chunk_size, keep_hidden=keep_hidden)


def make_teacher_scorer(kind: str, model: torch.nn.Module, chunk_size: int,
                        autocast_dtype: torch.dtype | None = None) -> TeacherScorer:
    """The teacher scorer `kind` (today only `hf`, the loaded teacher's forward pass)."""
    if kind == "hf":
        return HFTeacherScorer(model, chunk_size, autocast_dtype)
    raise ValueError(f"unknown teacher backend {kind!r}")


def missing_capabilities(needs: frozenset[str], scorer: TeacherScorer) -> list[str]:
    """What an objective needs of the teacher that `scorer` cannot return, in CAPABILITIES order."""
    return [name for name in CAPABILITIES if name in needs and name not in scorer.provides]
