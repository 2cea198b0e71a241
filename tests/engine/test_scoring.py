"""Chunked scoring gathers exactly what full-vocabulary logits would give, gradients included."""

import pytest
import torch

from tropd_cli.engine.objectives.gkd import generalized_jsd
from tropd_cli.engine.scoring import (
    Divergence,
    build_sequences,
    chunk_positions,
    score_student,
    score_teacher,
)
from tropd_cli.toylab.models import new_toy_model

PROMPTS = [[2, 5, 6, 7], [2, 9]]
RESPONSES = [[10, 11, 1], [12, 13, 14, 15, 1]]


@pytest.fixture(scope="module")
def pair():
    return new_toy_model("teacher", seed=1).eval(), new_toy_model("student", seed=2)


def test_sequences_are_right_padded_with_response_targets_marked():
    batch = build_sequences(PROMPTS, RESPONSES, pad_token_id=0)
    assert batch.input_ids.tolist() == [[2, 5, 6, 7, 10, 11, 1], [2, 9, 12, 13, 14, 15, 1]]
    assert batch.attention_mask.tolist() == [[1] * 7, [1] * 7]
    assert batch.loss_mask.tolist() == [[0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 1, 1]]
    assert batch.targets[batch.loss_mask.bool()].tolist() == [10, 11, 1, 12, 13, 14, 15, 1]
    short = build_sequences([[2, 3]], [[4]], pad_token_id=0)
    assert short.loss_mask.tolist() == [[0, 1]]


def full_logprobs(model, batch):
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    return torch.log_softmax(logits.float(), -1)[batch.loss_mask.bool()]  # [tokens, vocab]


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_teacher_stats_match_full_logits(pair, chunk):
    teacher, _ = pair
    batch = build_sequences(PROMPTS, RESPONSES, pad_token_id=0)
    stats = score_teacher(teacher, batch, top_k=5, chunk_size=chunk)
    with torch.no_grad():
        reference = full_logprobs(teacher, batch)
    targets = batch.targets[batch.loss_mask.bool()]
    torch.testing.assert_close(stats.logprobs, reference.gather(-1, targets[:, None]).squeeze(-1))
    values, ids = reference.topk(5, -1)
    torch.testing.assert_close(stats.topk_logprobs, values)
    assert torch.equal(stats.topk_ids, ids)
    torch.testing.assert_close(stats.entropy, -(reference.exp() * reference).sum(-1))


@pytest.mark.parametrize("chunk", [2, 3, 1000])
def test_student_logprobs_and_gradients_match_full_logits(pair, chunk):
    _, student = pair
    batch = build_sequences(PROMPTS, RESPONSES, pad_token_id=0)
    topk_ids = torch.randint(0, student.config.vocab_size, (8, 4), generator=torch.Generator().manual_seed(0))
    stats = score_student(student, batch, topk_ids, chunk_size=chunk)
    (stats.logprobs.sum() + 0.5 * stats.topk_logprobs.sum()).backward()
    chunked_grads = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    reference = full_logprobs(student, batch)
    targets = batch.targets[batch.loss_mask.bool()]
    expected = reference.gather(-1, targets[:, None]).squeeze(-1)
    (expected.sum() + 0.5 * reference.gather(-1, topk_ids).sum()).backward()
    torch.testing.assert_close(stats.logprobs.detach(), expected.detach())
    for chunked, full in zip(chunked_grads, (p.grad for p in student.parameters())):
        torch.testing.assert_close(chunked, full, rtol=1e-4, atol=2e-5)
    student.zero_grad()


def test_right_padding_does_not_change_scores(pair):
    teacher, _ = pair
    alone = score_teacher(teacher, build_sequences(PROMPTS[:1], RESPONSES[:1], 0), top_k=3, chunk_size=4)
    padded = score_teacher(teacher, build_sequences(PROMPTS, RESPONSES, 0), top_k=3, chunk_size=4)
    torch.testing.assert_close(alone.logprobs, padded.logprobs[:3])


@pytest.mark.parametrize("chunk", [3, 1000])
def test_chunked_divergence_matches_full_logits(pair, chunk):
    teacher, student = pair
    batch = build_sequences(PROMPTS, RESPONSES, pad_token_id=0)
    teacher_stats = score_teacher(teacher, batch, top_k=2, chunk_size=chunk, keep_hidden=True)
    divergence = Divergence(lambda s, t: generalized_jsd(s, t, 0.5), teacher_stats.hidden,
                            teacher.get_output_embeddings())
    stats = score_student(student, batch, teacher_stats.topk_ids, chunk_size=chunk, divergence=divergence)
    stats.divergence.sum().backward()
    chunked_grads = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    with torch.no_grad():
        teacher_logits = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    student_logits = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    keep = batch.loss_mask.bool()
    expected = generalized_jsd(student_logits[keep], teacher_logits[keep], 0.5)
    expected.sum().backward()
    torch.testing.assert_close(stats.divergence.detach(), expected.detach())
    for chunked, full in zip(chunked_grads, (p.grad for p in student.parameters())):
        torch.testing.assert_close(chunked, full, rtol=1e-4, atol=2e-5)
    student.zero_grad()


@pytest.mark.parametrize(("vocab", "positions"), [
    (512, 1024), (32768, 1024), (50257, 640), (128256, 256), (151936, 192), (2**24, 64)])
def test_auto_chunk_keeps_one_float32_buffer_within_128_mib(vocab, positions):
    assert chunk_positions("auto", vocab) == positions
    assert positions * vocab * 4 <= 128 * 2**20 or positions == 64  # never fewer than 64 positions
    assert chunk_positions(300, vocab) == 300  # a number is used as given


def test_sixteen_bit_student_without_autocast_gets_gradients_in_its_dtype():
    """bfloat16 weights with autocast off: the head's backward runs in bfloat16, as the full-logits path does."""
    student = new_toy_model("student", seed=2).to(torch.bfloat16)
    batch = build_sequences(PROMPTS, RESPONSES, pad_token_id=0)
    topk_ids = torch.randint(0, student.config.vocab_size, (8, 4), generator=torch.Generator().manual_seed(0))
    stats = score_student(student, batch, topk_ids, chunk_size=3)
    (stats.logprobs.sum() + 0.5 * stats.topk_logprobs.sum()).backward()
    chunked_grads = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    reference = full_logprobs(student, batch)
    targets = batch.targets[batch.loss_mask.bool()]
    (reference.gather(-1, targets[:, None]).sum() + 0.5 * reference.gather(-1, topk_ids).sum()).backward()
    for chunked, full in zip(chunked_grads, (p.grad for p in student.parameters())):
        assert chunked.dtype == torch.bfloat16
        torch.testing.assert_close(chunked.float(), full.float(), rtol=0.05, atol=0.02)
