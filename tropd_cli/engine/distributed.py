"""The processes of a run: who this one is, and the one place that starts and ends the process group.

`torchrun` (or `tropd distill --nproc N`, which runs torchrun's launcher for you) starts one process per
device and tells each its RANK, LOCAL_RANK and WORLD_SIZE; without them a run is one process. Rank 0 is
the writer: it alone writes the run folder, prints progress and feeds the metric sinks. The process group
uses gloo on CPU and nccl on CUDA (one device per process, cuda:LOCAL_RANK), with a timeout after which
a collective that waits for a lost peer fails instead of hanging (TROPD_DIST_TIMEOUT seconds, default
DEFAULT_TIMEOUT_S: long enough for one rank's rollouts to outlast another's). A rank that dies is
noticed sooner by torchrun's agent, which stops the others.

`launch` is `tropd distill --nproc N` on one node: torchrun's own launcher (its argument parser and
elastic agent, in this process) starting `python -m tropd_cli distill ...` N times. Its failures are one
line: a rank that died names itself; a rank that stopped with its own error has printed it already.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch

from tropd_cli.errors import TropdError

DEFAULT_TIMEOUT_S = 600


_BEFORE_TEARDOWN: list[Callable[[], None]] = []


def before_teardown(callback: Callable[[], None]) -> None:
    """Run `callback` before this process leaves the run's process group: what joined the group (a vLLM engine
    under the external launcher) stops while the group is still there."""
    _BEFORE_TEARDOWN.append(callback)


def world_size() -> int:
    """Processes in the run (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank (0 without torchrun)."""
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's rank on its node: the index of its device."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def launched() -> bool:
    """Whether torchrun started this process (also with a world of one, where ddp and fsdp2 still apply)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_writer() -> bool:
    """Whether this process writes files, prints progress and logs metrics (rank 0)."""
    return rank() == 0


def rank_device(device: torch.device) -> torch.device:
    """This process's device: cuda:LOCAL_RANK under torchrun on CUDA, else `device`. More processes on a
    machine than GPUs is one line on every rank (NCCL refuses two ranks on one GPU)."""
    if device.type == "cuda" and launched():
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if local > torch.cuda.device_count():
            raise TropdError(f"{local} processes on this machine need {local} GPUs, but it has "
                             f"{torch.cuda.device_count()}; lower --nproc (or --nproc-per-node)")
        return torch.device("cuda", local_rank())
    return device


@contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """Join the run's process group for the duration (nothing without torchrun, or when a caller already
    joined it): gloo on CPU, nccl on CUDA with this process's device made current."""
    import torch.distributed as dist

    if not launched() or dist.is_initialized():
        yield
        return
    timeout = timedelta(seconds=float(os.environ.get("TROPD_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timeout, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    try:
        yield
    finally:
        while _BEFORE_TEARDOWN:
            with contextlib.suppress(Exception):  # the group goes whatever one of them met (a peer gone first)
                _BEFORE_TEARDOWN.pop()()
        if dist.is_initialized():  # a vLLM engine's shutdown ends the group it joined itself
            dist.destroy_process_group()


# How a collective fails when a peer process is gone (gloo's and NCCL's words).
LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted")


def lost_peer(error: BaseException) -> bool:
    """Whether `error` is this rank losing a peer that died (the launcher reports the rank that died)."""
    return world_size() > 1 and isinstance(error, RuntimeError) and any(words in str(error) for words in LOST_PEER)


# Seconds the agent lets the ranks finish after a Ctrl-C (they finish the step and checkpoint) before it
# kills them.
SHUTDOWN_TIMEOUT_S = 600


def launch(nproc: int, tropd_args: list[str]) -> int:
    """Run `python -m tropd_cli *tropd_args` on `nproc` local processes as torchrun would; return the exit
    code (0, a rank's own code, 130 on Ctrl-C, or 1 with one line naming the rank that died)."""
    from rich.console import Console
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, get_args_parser

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default for several ranks, without its warning
    # torchrun --standalone: a rendezvous on a free local port
    args = get_args_parser().parse_args(["--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0",
                                         f"--rdzv-id={uuid.uuid4()}", f"--nproc-per-node={nproc}",
                                         "-m", "tropd_cli", *tropd_args])
    config, command, command_args = config_from_args(args)
    config.shutdown_timeout = SHUTDOWN_TIMEOUT_S
    err = Console(stderr=True)
    for name in list(logging.root.manager.loggerDict):  # the agent's lines say what ours say
        if name.startswith(("torch.distributed.elastic", "torch.distributed.launcher", "torch.distributed.run")):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        elastic_launch(config, command)(*command_args)
    except SignalException:
        return 130  # Ctrl-C: the ranks stopped after their step and printed how to resume
    except ChildFailedError as error:
        failed_rank, failure = error.get_first_failure()
        killed = {rank: failure for rank, failure in error.failures.items()
                  if failure.exitcode < 0 and failure.signal_name() != "SIGTERM"}  # SIGTERM: stopped by the agent
        if killed:
            failed_rank, failure = min(killed.items(), key=lambda item: item[1].timestamp)
        if failure.exitcode > 0:
            return failure.exitcode  # the rank printed its own error line
        err.print(f"[red]error:[/] rank {failed_rank} of {nproc} died ({failure.signal_name()}); the other ranks "
                  "were stopped", highlight=False, soft_wrap=True)
        return 1
    finally:
        sys.stdout.flush()
    return 0
