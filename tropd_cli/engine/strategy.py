"""How the student trains across devices: the one place that knows the number of processes.

The trainer hands a strategy the scorer module (whose `forward` runs the student's scoring, so a
distributed wrapper sees every weight it must gather), the losses to backpropagate, and its sums; the
strategy wraps the module, runs backward, reduces the token normaliser and the metrics' (numerator,
denominator) pairs across processes, scales the gradients by the batch's normaliser, clips them, steps
the optimizer, and gives the state dicts a checkpoint saves. `SingleDevice` is one process on one device:
its reductions are the identity.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch


class SingleDevice:
    """One process on one device (`train.strategy: single`)."""

    world_size = 1
    rank = 0

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """The module the trainer calls for scoring (unchanged on one device)."""
        return module

    def no_sync(self, module: torch.nn.Module, last: bool) -> AbstractContextManager:
        """A context for one micro-batch's backward; `last` marks the batch's final one, where a
        distributed strategy reduces the accumulated gradients."""
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """The sums of `values` over all processes (the values themselves on one)."""
        return list(values)

    def all_reduce_min(self, values: list[float]) -> list[float]:
        """The minimums of `values` over all processes (the values themselves on one)."""
        return list(values)

    def scale_gradients(self, parameters: list[torch.nn.Parameter], scale: float) -> None:
        """Multiply every gradient by `scale` (1 / the rollout batch's normaliser)."""
        for parameter in parameters:
            if parameter.grad is not None:
                parameter.grad.mul_(scale)

    def clip_and_step(self, parameters: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                      max_norm: float) -> float:
        """Clip the gradients' global norm to `max_norm`, step when that norm is finite, zero the gradients;
        returns the norm before clipping."""
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        if torch.isfinite(grad_norm):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict:
        return optimizer.state_dict()

    def load_optimizer_state_dict(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        optimizer.load_state_dict(state)

