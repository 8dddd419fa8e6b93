"""Joining a torch.distributed job from the environment that torchrun sets up.

torchrun starts one process per worker and tells each who it is through environment variables:
``RANK`` (0 … WORLD_SIZE − 1), ``WORLD_SIZE``, ``LOCAL_RANK`` (the worker's index on its machine)
and ``MASTER_ADDR``/``MASTER_PORT`` (where rank 0 listens for the others). ``init_distributed``
reads them, picks the backend — NCCL when the training device is a CUDA GPU, gloo otherwise — and
returns who this worker is. Without those variables it returns a one-worker environment and starts
nothing, so one script runs with and without torchrun:

    torchrun --nproc-per-node 2 train.py       # two workers on this machine

Nothing here waits on a barrier: the process group is joined once, and every later collective is
issued by the code that needs it.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Union

import torch
import torch.distributed as dist

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(ValueError):
    """The launch does not fit the run (a one-line message, meant to be shown as it is)."""


@dataclass(frozen=True)
class DistEnv:
    """Who this worker is: its global ``rank`` of ``world_size``, its ``local_rank`` on its machine
    and the ``device`` it trains on (``cuda:LOCAL_RANK`` for GPUs).

    Attributes:
        rank: the global rank, ``0 … world_size − 1``.
        world_size: the number of workers.
        local_rank: the worker's index on its machine.
        device: the device it trains on.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0: the worker that logs, evaluates and writes checkpoints."""
        return self.rank == 0


def check_parallel_world(world_size: int) -> None:
    """Parallel m-(A)RWP pairs every clean worker with a perturbed one: ``world_size = 2k``.

    Args:
        world_size: the number of workers.

    Raises:
        DistributedError: ``world_size`` is not even and at least 2.
    """
    if world_size < 2 or world_size % 2:
        raise DistributedError(
            f"--parallel needs an even number of workers, k clean + k perturbed, but WORLD_SIZE={world_size}; "
            "launch it with torchrun --nproc-per-node 2 (or 4, 6, ...)"
        )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on now: a ``MASTER_PORT`` for workers started on one
    machine by hand (``torch.multiprocessing``, ``subprocess``) or by ``torchrun --master-port``.

    The port is only free when this returns; another process may take it before rank 0 binds it.
    Rank 0 then fails to join with "address already in use": start the workers again with a new port.

    Args:
        host: the address to find a port on.

    Returns:
        The port number.
    """
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _read_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"{name}={value!r} is not an integer; launch the run with torchrun") from None


def init_distributed(
    device: Union[str, torch.device] = "cpu", *, parallel: bool = False, timeout: timedelta = timedelta(minutes=30)
) -> DistEnv:
    """Join the process group described by torchrun's variables and return this worker's ``DistEnv``.

    Args:
        device: ``"cpu"`` (gloo) or ``"cuda"`` (NCCL; each worker takes GPU ``LOCAL_RANK``).
        parallel: the run is parallel m-(A)RWP, which needs an even number of workers.
        timeout: how long a collective (and joining) may wait for the other workers.

    Without torchrun's variables this is a one-worker run: nothing is initialised (``--parallel``
    is then an error, it needs at least two workers).

    Returns:
        This worker's rank, world size, local rank and device.

    Raises:
        DistributedError: anything inconsistent (some of torchrun's variables missing or not
            integers, a group already initialised, CUDA missing or too few GPUs, an odd number of
            workers for ``parallel``), with a one-line message that says what to change.
    """
    device = torch.device(device)
    given = [name for name in TORCHRUN_VARIABLES if name in os.environ]
    if not given:
        if parallel:
            check_parallel_world(1)
        return DistEnv(device=device)
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise DistributedError(
            f"incomplete torchrun environment: {', '.join(given)} set but {', '.join(missing)} not; "
            "launch the run with torchrun"
        )
    if dist.is_initialized():
        raise DistributedError("torch.distributed is already initialised in this process; call init_distributed once")
    rank, world_size, local_rank = _read_int("RANK"), _read_int("WORLD_SIZE"), _read_int("LOCAL_RANK")
    _read_int("MASTER_PORT")
    if not 0 <= rank < world_size:
        raise DistributedError(f"RANK={rank} does not fit WORLD_SIZE={world_size}; launch the run with torchrun")
    if parallel:
        check_parallel_world(world_size)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DistributedError("--device cuda but CUDA is not available on this machine; use --device cpu (gloo)")
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(
                f"LOCAL_RANK={local_rank} but this machine has {torch.cuda.device_count()} GPU(s); "
                "start at most that many workers per machine (--nproc-per-node)"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise DistributedError(f"--device {device} cannot run distributed; use cpu (gloo) or cuda (NCCL)")
    try:
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size, timeout=timeout)
    except (RuntimeError, ValueError) as err:  # DistStoreError and friends: unreachable or wrong MASTER_*
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DistributedError(
            f"rank {rank} of {world_size} could not join the {backend} process group at "
            f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}: {first_line}"
        ) from err
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def is_distributed() -> bool:
    """Whether this process is part of an initialised process group.

    Returns:
        ``True`` inside an initialised group.
    """
    return dist.is_available() and dist.is_initialized()


def cleanup() -> None:
    """Leave the process group (a no-op outside one); call it once at the end of every worker."""
    if is_distributed():
        dist.destroy_process_group()
