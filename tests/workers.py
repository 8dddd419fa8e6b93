"""Starting a group of real worker processes on loopback for the distributed tests.

A test module that uses it is also the workers' script: run with torchrun's variables set, its
``__main__`` block joins the group, runs the scenarios named on its command line and saves what
each rank ended with as ``rank{R}.pt`` in the folder given as its first argument.
"""
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import pytest
import torch
import torch.distributed as dist

from flatmin.distributed import DistEnv, cleanup, free_port, init_distributed

LAUNCH_TIMEOUT_S = 120  # the whole group of workers, startup included


def launch(script: str, world: int, names: Sequence[str], out: Path, timeout: float = LAUNCH_TIMEOUT_S) -> List:
    """Start ``world`` workers running ``script``, wait for all of them, return each rank's results."""
    port = free_port()
    procs = []
    try:
        for rank in range(world):
            env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
            with open(out / f"rank{rank}.log", "wb") as log:  # the child keeps its own handle
                procs.append(subprocess.Popen([sys.executable, script, str(out), *names], env=env,
                                              stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout
        for proc in procs:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        pytest.fail(f"the {world} workers did not finish within {timeout} s")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    failed = [rank for rank, proc in enumerate(procs) if proc.returncode != 0]
    if failed:
        logs = "\n".join((out / f"rank{rank}.log").read_text()[-3000:] for rank in failed)
        pytest.fail(f"workers {failed} failed:\n{logs}")
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(world)]


def serve(run: Callable[[DistEnv, List[str]], Dict], parallel: bool = False, timeout_s: float = 60,
          device: str = "cpu") -> None:
    """The body of a worker process (its command line: the output folder, then scenario names): join
    the group (gloo on the CPU, NCCL with ``device="cuda"``: GPU ``LOCAL_RANK``), ``run(env, names)``,
    save the result as ``rank{R}.pt`` and leave together."""
    out, names = Path(sys.argv[1]), sys.argv[2:]
    torch.set_num_threads(1)
    env = init_distributed(device, parallel=parallel, timeout=timedelta(seconds=timeout_s))
    try:
        torch.save(run(env, names), out / f"rank{env.rank}.pt")
        dist.barrier()  # no rank tears the group down while a peer still uses it
    finally:
        cleanup()
