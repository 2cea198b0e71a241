"""Chunked forward passes that gather per-token quantities without full-vocabulary tensors.

A batch of prompt+response sequences goes through each model's decoder once; the vocabulary head is then
applied only to response positions, a chunk of positions at a time, and only what the objectives need is
kept: the sampled token's log-prob, the teacher's top-k ids and log-probs, the student's log-probs at
those ids, and entropies. Peak memory of the head therefore grows with the chunk size, not with
batch x length x vocabulary. The student's head is one autograd function (`HeadLogprobs`): its graph
keeps the hidden states and one log-normaliser per position, and its backward recomputes each chunk's
logits once and turns them into the gradient in place, so it never holds more than two [chunk, vocab]
buffers, and the head's weight gradient is accumulated in one buffer. (A full-vocabulary divergence,
`gkd`, and heads that are not a plain linear layer go through activation checkpointing of each chunk
instead.) The default chunk (`train.logit_chunk_size: auto`) shrinks with the vocabulary so that one
such buffer stays near 128 MiB.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

# `auto` chunks: one [chunk, vocab] float32 buffer of at most this many elements (128 MiB), in
# multiples of CHUNK_STEP positions between CHUNK_STEP and MAX_AUTO_CHUNK.
LOGIT_BUFFER_ELEMENTS = 2**25
CHUNK_STEP, MAX_AUTO_CHUNK = 64, 1024


def chunk_positions(setting: int | str, vocab: int) -> int:
    """Token positions per chunk of vocabulary logits: `setting`, or for `auto` the most positions whose
    [chunk, vocab] float32 logits fit LOGIT_BUFFER_ELEMENTS (1024 at a 32k vocabulary, 192 at Qwen's
    151936, 256 at Llama 3's 128256)."""
    if setting != "auto":
        return int(setting)
    fitting = LOGIT_BUFFER_ELEMENTS // max(vocab, 1) // CHUNK_STEP * CHUNK_STEP
    return max(CHUNK_STEP, min(MAX_AUTO_CHUNK, fitting))


def vocab_rows(model: torch.nn.Module) -> int:
    """The rows of a causal LM's vocabulary head (its configuration's vocab_size)."""
    return model.config.get_text_config().vocab_size


@dataclass
class SequenceBatch:
    """Right-padded prompt+response sequences and where their response tokens are.

    `targets[b, j]` is token j+1 of sequence b and `loss_mask[b, j]` is 1 when it is a response token,
    so position j's logits predict it.
    """

    input_ids: torch.Tensor  # [batch, length]
    attention_mask: torch.Tensor  # [batch, length]
    targets: torch.Tensor  # [batch, length - 1]
    loss_mask: torch.Tensor  # [batch, length - 1]

    def to(self, device: torch.device) -> SequenceBatch:
        return SequenceBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask,
                                                       self.targets, self.loss_mask)))


def build_sequences(prompts: list[list[int]], responses: list[list[int]], pad_token_id: int
                    ) -> SequenceBatch:
    """Concatenate each prompt with its response, pad on the right, mark the response targets."""
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    width = max(lengths)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    loss_mask = torch.zeros((len(prompts), width - 1), dtype=torch.long)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        input_ids[row, : lengths[row]] = torch.tensor(prompt + response, dtype=torch.long)
        attention[row, : lengths[row]] = 1
        loss_mask[row, len(prompt) - 1: lengths[row] - 1] = 1
    return SequenceBatch(input_ids, attention, input_ids[:, 1:].clone(), loss_mask)


def decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The transformer body (returning hidden states) and the vocabulary head of a causal LM.

    Works through peft wrappers: LoRA layers live inside the body's modules.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def response_hidden_states(model: torch.nn.Module, batch: SequenceBatch) -> torch.Tensor:
    """Final hidden states at the positions that predict response tokens: [tokens, hidden]."""
    decoder, _ = decoder_and_head(model)
    hidden = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     use_cache=False).last_hidden_state  # [batch, length, hidden]
    return hidden[:, :-1][batch.loss_mask.bool()]


@dataclass
class TeacherStats:
    logprobs: torch.Tensor  # [tokens] tau_t
    topk_ids: torch.Tensor  # [tokens, k]
    topk_logprobs: torch.Tensor  # [tokens, k]
    entropy: torch.Tensor | None  # [tokens]; None from a served teacher (prompt log-probs hold no entropy)
    hidden: torch.Tensor | None = None  # [tokens, hidden] final hidden states, kept for full-vocab losses


@torch.no_grad()
def score_teacher(model: torch.nn.Module, batch: SequenceBatch, top_k: int, chunk_size: int,
                  keep_hidden: bool = False) -> TeacherStats:
    """tau_t, the top-k ids and log-probs, and the entropy of the teacher at every response token.

    `keep_hidden` also returns the final hidden states, from which `score_student` recomputes the
    teacher's full-vocabulary logits one chunk at a time for a divergence.
    """
    _, head = decoder_and_head(model)
    hidden = response_hidden_states(model, batch)
    targets = batch.targets[batch.loss_mask.bool()]
    parts: list[tuple[torch.Tensor, ...]] = []
    for start in range(0, hidden.shape[0], chunk_size):
        logprobs = head(hidden[start:start + chunk_size]).float()  # [chunk, vocab], logits first
        logprobs -= torch.logsumexp(logprobs, dim=-1, keepdim=True)
        target_logprobs = logprobs.gather(-1, targets[start:start + chunk_size, None]).squeeze(-1)
        topk_logprobs, topk_ids = logprobs.topk(min(top_k, logprobs.shape[-1]), dim=-1)
        entropy = -logprobs.exp().mul_(logprobs).sum(-1)
        parts.append((target_logprobs, topk_ids, topk_logprobs, entropy))
    if not parts:
        empty = hidden.new_zeros((0,), dtype=torch.float32)
        return TeacherStats(empty, targets.new_zeros((0, top_k)), empty.new_zeros((0, top_k)), empty,
                            hidden if keep_hidden else None)
    return TeacherStats(*(torch.cat(column) for column in zip(*parts)), hidden if keep_hidden else None)


@dataclass
class StudentStats:
    logprobs: torch.Tensor  # [tokens] s_t, with gradient
    topk_logprobs: torch.Tensor  # [tokens, k] log pi_S at the teacher's top-k ids, with gradient
    entropy: torch.Tensor  # [tokens], no gradient
    divergence: torch.Tensor | None = None  # [tokens] full-vocabulary divergence from the teacher, with gradient


@dataclass
class Divergence:
    """A full-vocabulary divergence to compute chunk by chunk: `fn(student_logits, teacher_logits)`."""

    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    teacher_hidden: torch.Tensor  # [tokens, hidden_T], from score_teacher(keep_hidden=True)
    teacher_head: torch.nn.Module


def _student_chunk(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                   topk_ids: torch.Tensor, divergence: Divergence | None, start: int
                   ) -> tuple[torch.Tensor, ...]:
    logits = head(hidden).float()  # [chunk, vocab]
    logprobs = torch.log_softmax(logits, dim=-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1).detach()
    gathered = (logprobs.gather(-1, targets[:, None]).squeeze(-1), logprobs.gather(-1, topk_ids), entropy)
    if divergence is None:
        return gathered
    with torch.no_grad():
        teacher_hidden = divergence.teacher_hidden[start:start + hidden.shape[0]]
        teacher_logits = divergence.teacher_head(teacher_hidden).float()  # [chunk, vocab]
    return (*gathered, divergence.fn(logits, teacher_logits))


class HeadLogprobs(torch.autograd.Function):
    """log pi_S(x_t), log pi_S at the top-k ids and the entropy of every response position, from
    `hidden @ weight^T`, `chunk` positions at a time.

    Saves the per-position log-normalisers only. The backward recomputes each chunk's logits once and forms
    d/dlogits = scatter(g) - softmax * (g_t + sum_k g_k) in place in that buffer (the entropy carries no
    gradient), then adds its products with `hidden` and `weight` into one gradient buffer each, so neither
    gradient is ever materialised once per chunk; autocast is re-entered as in the forward.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, topk_ids: torch.Tensor,
                chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        device_type = hidden.device.type
        ctx.autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        ctx.chunk = chunk
        tokens = hidden.shape[0]
        target_logprobs = hidden.new_empty((tokens,), dtype=torch.float32)
        topk_logprobs = hidden.new_empty(topk_ids.shape, dtype=torch.float32)
        entropy = hidden.new_empty((tokens,), dtype=torch.float32)
        log_normaliser = hidden.new_empty((tokens, 1), dtype=torch.float32)
        for start in range(0, tokens, chunk):
            part = slice(start, start + chunk)
            logprobs = (hidden[part] @ weight.t()).float()  # [chunk, vocab], logits first
            log_normaliser[part] = torch.logsumexp(logprobs, dim=-1, keepdim=True)
            logprobs -= log_normaliser[part]
            target_logprobs[part] = logprobs.gather(-1, targets[part, None]).squeeze(-1)
            topk_logprobs[part] = logprobs.gather(-1, topk_ids[part])
            entropy[part] = -logprobs.exp().mul_(logprobs).sum(-1)
        ctx.save_for_backward(hidden, weight, targets, topk_ids, log_normaliser)
        ctx.mark_non_differentiable(entropy)
        return target_logprobs, topk_logprobs, entropy

    @staticmethod
    def backward(ctx, target_grad: torch.Tensor | None, topk_grad: torch.Tensor | None,
                 _: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, targets, topk_ids, log_normaliser = ctx.saved_tensors
        device_type, enabled, dtype = ctx.autocast
        target_grad = hidden.new_zeros(targets.shape, dtype=torch.float32) if target_grad is None else target_grad
        topk_grad = hidden.new_zeros(topk_ids.shape, dtype=torch.float32) if topk_grad is None else topk_grad
        hidden_grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        weight_grad = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        in_place = not enabled and hidden.dtype == weight.dtype == torch.float32  # products straight into fp32
        for start in range(0, hidden.shape[0], ctx.chunk):
            part = slice(start, start + ctx.chunk)
            with torch.autocast(device_type, dtype=dtype, enabled=enabled):
                grad = (hidden[part] @ weight.t()).float()  # [chunk, vocab]
            grad.sub_(log_normaliser[part]).exp_().mul_(-(target_grad[part] + topk_grad[part].sum(-1))[:, None])
            grad.scatter_add_(1, targets[part, None], target_grad[part, None].float())
            grad.scatter_add_(1, topk_ids[part], topk_grad[part].float())
            if in_place:
                if hidden_grad is not None:
                    torch.mm(grad, weight, out=hidden_grad[part])
                if weight_grad is not None:
                    weight_grad.addmm_(grad.t(), hidden[part])
                continue
            if not enabled:  # 16-bit weights without autocast: the products run in their dtype
                grad = grad.to(weight.dtype)
            with torch.autocast(device_type, dtype=dtype, enabled=enabled):
                if hidden_grad is not None:
                    hidden_grad[part] = grad @ weight
                if weight_grad is not None:
                    weight_grad += (grad.t() @ hidden[part]).to(weight.dtype)
        return hidden_grad, weight_grad, None, None, None


def _fused_head(head: torch.nn.Module) -> bool:
    """Whether the student's head is a plain bias-free linear layer that `HeadLogprobs` can replace."""
    return type(head) is torch.nn.Linear and head.bias is None


class StudentScorer(torch.nn.Module):
    """The student's scoring as a module: `forward` runs `score_student` on the wrapped causal LM.

    The training strategy wraps this module (not the causal LM), so a distributed wrapper's hooks see the
    forward that touches every weight scoring uses: the decoder and the chunked head together.
    """

    def __init__(self, model: torch.nn.Module, chunk_size: int) -> None:
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, batch: SequenceBatch, topk_ids: torch.Tensor, divergence: Divergence | None = None
                ) -> StudentStats:
        return score_student(self.model, batch, topk_ids, self.chunk_size, divergence)


def score_student(model: torch.nn.Module, batch: SequenceBatch, topk_ids: torch.Tensor,
                  chunk_size: int, divergence: Divergence | None = None) -> StudentStats:
    """s_t and log pi_S at the teacher's top-k ids, differentiable, one chunk of positions at a time.

    With `divergence`, also its per-token value against the teacher's full-vocabulary logits, which are
    recomputed per chunk from the teacher's hidden states (so neither model's [tokens, vocab] logits
    exist for more than one chunk).
    """
    _, head = decoder_and_head(model)
    hidden = response_hidden_states(model, batch)
    targets = batch.targets[batch.loss_mask.bool()]
    if divergence is None and _fused_head(head) and hidden.shape[0]:
        return StudentStats(*HeadLogprobs.apply(hidden, head.weight, targets, topk_ids, chunk_size))
    parts = []
    for start in range(0, hidden.shape[0], chunk_size):
        end = start + chunk_size
        args = (head, hidden[start:end], targets[start:end], topk_ids[start:end], divergence, start)
        if torch.is_grad_enabled() and hidden.requires_grad:
            parts.append(checkpoint(_student_chunk, *args, use_reentrant=False))
        else:
            parts.append(_student_chunk(*args))
    if not parts:
        empty = hidden.sum() * 0.0
        return StudentStats(empty.reshape(0), empty.reshape(0, topk_ids.shape[-1]), empty.reshape(0),
                            None if divergence is None else empty.reshape(0))
    return StudentStats(*(torch.cat(column) for column in zip(*parts)))
