"""The teacher's own forward pass in this process (`teacher.backend: hf`): every capability."""

from __future__ import annotations

import torch

from tropd_cli.engine.precision import autocast
from tropd_cli.engine.scoring import SequenceBatch, TeacherStats, decoder_and_head, score_teacher
from tropd_cli.engine.teacher.base import CAPABILITIES


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
