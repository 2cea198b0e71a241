"""How the student trains across devices: the one place that knows the number of processes.

The trainer hands a strategy the scorer module (whose `forward` runs the student's scoring, so a
distributed wrapper sees every weight it must gather), the losses to backpropagate, and its sums; the
strategy wraps the module, runs backward, reduces the token normaliser and the metrics' (numerator,
denominator) pairs across processes, scales the gradients by the batch's normaliser, clips them, steps
the optimizer, and gives the state dicts a checkpoint saves. `SingleDevice` is one process on one device:
its reductions are the identity.

`DDP` (every rank holds the whole student; used for LoRA and QLoRA, where the trainable part is small) and
`FSDP2` (`fully_shard` per decoder layer and on the scorer: weights, gradients and AdamW states split over
the ranks) reduce gradients as SUMS, never means: each rank backpropagates the summed loss of its share of
the rollout batch and the trainer divides by the normaliser summed over all ranks, so N ranks compute the
single-process step (loss, gradient, clipped norm) up to floating-point rounding. Under FSDP2 a forward
that is not the scorer's (transformers' `generate` for rollouts and evaluation) runs inside `gathered`,
which unshards every layer once and keeps it whole until the block ends; ranks may then generate different
numbers of tokens without waiting for each other.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch

from tropd_cli.engine import distributed
from tropd_cli.errors import TropdError

STRATEGIES = ("single", "ddp", "fsdp2")


class SingleDevice:
    """One process on one device (`train.strategy: single`)."""

    world_size = 1
    rank = 0
    sharded = False  # whether the student's weights are split over the processes

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
        if hasattr(grad_norm, "full_tensor"):  # sharded gradients (FSDP2) give the global norm as a DTensor
            grad_norm = grad_norm.full_tensor()
        if torch.isfinite(grad_norm):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict:
        return optimizer.state_dict()

    def load_optimizer_state_dict(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        optimizer.load_state_dict(state)

    def gathered(self) -> AbstractContextManager:
        """A context in which the student's own modules run whole (generation, evaluation)."""
        return nullcontext()

    def all_gather(self, values: torch.Tensor) -> torch.Tensor:
        """The 1-D `values` of every process, concatenated in rank order."""
        return values

    def any(self, flag: bool) -> bool:
        """Whether `flag` is set on any process (a stop request every rank must honour together)."""
        return flag

    def union_keys(self, names: list[str]) -> list[str]:
        """Metric names seen on any process, in a common order (each rank's own names on one)."""
        return names

    def gather_objects(self, value: object) -> list:
        """Every process's `value` (picklable), in rank order."""
        return [value]

    def model_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole student's weights on CPU, keyed as in the unwrapped model (rank 0's; an empty dict on
        the other ranks), or None when the student's own `state_dict` is already whole."""
        return None


def shard_layers_and_root(root: torch.nn.Module, causal_lm: torch.nn.Module) -> list:
    """`fully_shard` every decoder layer of `causal_lm`, then `root` (a module whose forward runs the whole
    scoring, so that the embeddings, final norm and head it holds are gathered around that forward);
    returns the FSDP units."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    from tropd_cli.engine.scoring import decoder_and_head

    decoder, _ = decoder_and_head(causal_lm)
    for layer in getattr(decoder, "layers", []):
        fully_shard(layer)
    fully_shard(root)
    return [unit for unit in root.modules() if isinstance(unit, FSDPModule)]


@contextmanager
def gathered_units(root: torch.nn.Module) -> Iterator[None]:
    """Every FSDP unit under `root` whole until the block ends (for forwards that are not root's, such as
    `generate`): one all-gather per unit on entry, none per token, so ranks may generate different lengths."""
    from torch.distributed.fsdp import FSDPModule

    root._get_fsdp_state()._lazy_init()  # as the root's first forward would: before any unit runs
    units = [unit for unit in root.modules() if isinstance(unit, FSDPModule)]
    for unit in units:
        unit.unshard()
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for unit in units:
            unit.set_reshard_after_forward(unit is not root, recurse=False)
            unit.reshard()


class TeacherScoring(torch.nn.Module):
    """The teacher's scoring (`scoring.score_teacher`) as a module: the root unit of a sharded teacher."""

    def __init__(self, model: torch.nn.Module, chunk_size: int) -> None:
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, batch, top_k: int, keep_hidden: bool = False):
        from tropd_cli.engine.scoring import score_teacher

        return score_teacher(self.model, batch, top_k, self.chunk_size, keep_hidden=keep_hidden)


class ShardedTeacherScorer:
    """The teacher's forward pass with its weights split over the ranks (`teacher.shard: true`).

    Each rank scores its own sequences; the teacher's layers are gathered one at a time. It returns
    log-probs, top-k and entropies, not `full_logits`: a full-vocabulary divergence would need the whole
    head inside the student's forward. `gathered` makes the whole teacher available for `generate`.
    """

    provides = frozenset({"logprobs", "topk", "entropy"})
    head = None

    def __init__(self, model: torch.nn.Module, chunk_size: int, autocast_dtype: torch.dtype | None,
                 device: torch.device) -> None:
        self.module = TeacherScoring(model, chunk_size)
        shard_layers_and_root(self.module, model)
        self.autocast_dtype = autocast_dtype
        self.device = device

    def score(self, batch, top_k: int, keep_hidden: bool = False):
        from tropd_cli.engine.precision import autocast

        with torch.no_grad(), autocast(self.device, self.autocast_dtype):
            return self.module(batch, top_k, keep_hidden)

    def gathered(self) -> AbstractContextManager:
        return gathered_units(self.module)


def _dist():
    import torch.distributed as dist

    return dist


class _Distributed(SingleDevice):
    """What DDP and FSDP2 share: the process group's reductions."""

    def __init__(self, device: torch.device) -> None:
        dist = _dist()
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        self.device = device
        self.module: torch.nn.Module | None = None

    def _reduce(self, values: list[float], op) -> list[float]:
        if not values:
            return []
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        _dist().all_reduce(tensor, op=op)
        return tensor.tolist()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        return self._reduce(values, _dist().ReduceOp.SUM)

    def all_reduce_min(self, values: list[float]) -> list[float]:
        return self._reduce(values, _dist().ReduceOp.MIN)

    def any(self, flag: bool) -> bool:
        return self._reduce([float(flag)], _dist().ReduceOp.MAX)[0] > 0

    def all_gather(self, values: torch.Tensor) -> torch.Tensor:
        dist = _dist()
        sizes = [0] * self.world_size
        dist.all_gather_object(sizes, int(values.numel()))
        padded = values.new_zeros(max(sizes))
        padded[:values.numel()] = values
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return torch.cat([part[:size] for part, size in zip(parts, sizes)])

    def gather_objects(self, value: object) -> list:
        everyone: list = [None] * self.world_size
        _dist().all_gather_object(everyone, value)
        return everyone

    def union_keys(self, names: list[str]) -> list[str]:
        everyone = self.gather_objects(names)
        merged = list(everyone[0])
        for other in everyone[1:]:
            merged += [name for name in other if name not in merged]
        return merged


def _sum_allreduce(process_group, bucket):
    """DDP's gradient all-reduce as a sum (its default divides by the world size)."""
    future = _dist().all_reduce(bucket.buffer(), group=process_group, async_op=True).get_future()
    return future.then(lambda done: done.value()[0])


class DDP(_Distributed):
    """Every rank holds the whole student; gradients are summed over ranks (`train.strategy: ddp`)."""

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device] if self.device.type == "cuda" else None
        self.module = DistributedDataParallel(module, device_ids=device_ids)
        self.module.register_comm_hook(None, _sum_allreduce)
        return self.module

    def no_sync(self, module: torch.nn.Module, last: bool) -> AbstractContextManager:
        return nullcontext() if last else module.no_sync()


class FSDP2(_Distributed):
    """Each rank holds 1/N of the student's weights, gradients and AdamW states (`train.strategy: fsdp2`):
    every decoder layer is its own `fully_shard` unit and the scorer the root unit (the embeddings, final
    norm and head)."""

    sharded = True

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        for unit in shard_layers_and_root(module, module.model):
            unit.set_gradient_divide_factor(1.0)  # sums: the trainer divides by the global normaliser
            if self.device.type != "cuda":
                unit.set_force_sum_reduction_for_comms(True)  # gloo has no pre-scaled reduce-scatter
        self.module = module
        return module

    def no_sync(self, module: torch.nn.Module, last: bool) -> AbstractContextManager:
        @contextmanager
        def syncing_on_last() -> Iterator[None]:
            module.set_requires_gradient_sync(last)
            yield

        return syncing_on_last()

    def gathered(self) -> AbstractContextManager:
        return gathered_units(self.module)

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        whole = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        # A tied weight (the head sharing the embeddings) comes back once per name as separate copies; keep
        # the first name, as save_pretrained does when the two are one tensor.
        unique = {name for name, _ in self.module.named_parameters()}
        tied = {name for name, _ in self.module.named_parameters(remove_duplicate=False)} - unique
        return {name.removeprefix("model."): value for name, value in whole.items() if name not in tied}

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self.module, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_optimizer_state_dict(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(self.module, optimizer, state, options=StateDictOptions(full_state_dict=True))


class GatheredBackend:
    """A rollout backend whose `generate` runs inside `gathered()` (a strategy's or a sharded teacher's:
    whole weights under FSDP2, nothing otherwise)."""

    def __init__(self, backend, gathered: Callable[[], AbstractContextManager]) -> None:
        self.backend = backend
        self.gathered = gathered

    def generate(self, *args, **kwargs):
        with self.gathered():
            return self.backend.generate(*args, **kwargs)

    def sync(self, model: torch.nn.Module) -> None:
        self.backend.sync(model)

    def __getattr__(self, name: str):
        return getattr(self.backend, name)  # whatever else the backend offers, unchanged


class GatheredResponses:
    """A teacher-response source whose every call runs inside `gathered()`, on every rank alike: a source
    that samples only the prompts it has not cached would otherwise gather a sharded teacher on some ranks
    and not on others, and wait for ever."""

    def __init__(self, source, gathered: Callable[[], AbstractContextManager]) -> None:
        self.source = source
        self.gathered = gathered

    def __call__(self, prompt_ids: list[list[int]]):
        with self.gathered():
            return self.source(prompt_ids)

    def __getattr__(self, name: str):
        return getattr(self.source, name)  # state_dict and load_state_dict, when the source keeps a cache


def resolve_strategy(setting: str, world_size: int, lora: bool) -> str:
    """`train.strategy` for this many processes: auto is single on one process, else fsdp2 for a student
    whose every weight trains and ddp for LoRA/QLoRA (its trainable part is small, and a 4-bit base does
    not shard)."""
    if setting == "auto":
        return "single" if world_size == 1 else ("ddp" if lora else "fsdp2")
    return setting


def make_strategy(setting: str, lora: bool, prompts_per_step: int, device: torch.device) -> SingleDevice:
    """The training strategy of `train.strategy` for the processes torchrun started (after the process
    group is up); one line for a combination that cannot work. (With rollout.backend=vllm every rank holds its
    own engine: engine/vllm_engine.py.)"""
    world_size = distributed.world_size()
    name = resolve_strategy(setting, world_size, lora)
    if name == "single" or not distributed.launched():  # ddp or fsdp2 without torchrun: one process anyway
        if world_size > 1:
            raise TropdError(f"train.strategy=single runs one process, but torchrun started {world_size}; "
                             "use auto, ddp or fsdp2")
        return SingleDevice()
    if prompts_per_step % world_size:
        raise TropdError(f"rollout.prompts_per_step={prompts_per_step} must be a multiple of the number of "
                         f"processes ({world_size}), so that every rank gets the same share of each step")
    return DDP(device) if name == "ddp" else FSDP2(device)

