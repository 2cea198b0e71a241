"""Named random streams: one reproducible seed per (run seed, step, stream).

Every random draw of a run (rollout sampling, the trust mask, GKD's on/off-policy coin, in-run teacher
responses, prepared teacher drafts) takes its seed from `step_seed` with its own stream, so that no two
draws share a seed and a resumed run replays exactly the draws of an uninterrupted one.
"""

from __future__ import annotations

from enum import IntEnum


class Stream(IntEnum):
    """The random streams of a run; the values are part of every seeded result, so never renumber them."""

    ROLLOUT = 0  # student (or teacher) sampling of a step's rollouts
    TRUST_MASK = 1  # TrOPD's Bernoulli trust test
    GKD_COIN = 2  # GKD's on-policy / off-policy choice of a step
    TEACHER_RESPONSE = 3  # in-run cached teacher responses (guidance, sft), per generate call
    TEACHER_DRAFT = 5  # `tropd prepare --teacher-drafts`, per shard


def step_seed(seed: int, step: int, stream: int) -> int:
    """A distinct, reproducible seed per (run seed, step, stream)."""
    return (seed * 1_000_003 + step * 7919 + stream) % (2**63 - 1)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of process `rank`'s share of a draw: `seed` itself on rank 0 (so one process draws as
    before), a distinct seed on every other rank. Draws over a share are therefore equal in distribution,
    not identical, to one process's draw over the whole batch."""
    return seed if rank == 0 else (seed * 6_364_136_223_846_793_005 + rank * 1_442_695_040_888_963_407) % (2**63 - 1)
