"""torch.distributed for flatmin: joining a torchrun job, parallel m-(A)RWP and sharded (FSDP2) training.

* ``init_distributed`` / ``cleanup``: one worker per process, gloo on CPU, NCCL on CUDA;
  ``free_port`` for a ``MASTER_PORT`` when starting the workers of one machine by hand.
* ``ParallelMixedStep``: m-RWP/m-ARWP with the clean and the perturbed gradient on different
  workers at once (N = 2k workers, one update in the wall time of one SGD step).
* ``average_gradients`` / ``broadcast_buffers``: data parallelism by hand, for losses such as NRS
  whose two forwards per backward do not fit DDP.
* ``flatmin.distributed.fsdp``: sharded training with FSDP2 (``fully_shard`` by blocks) and its
  checkpoints as one full state dict; imported on its own (``from flatmin.distributed.fsdp import
  shard_model``), as it loads torch's DTensor machinery.
* Every other method is plain data parallelism with ``torch.nn.parallel.DistributedDataParallel``:
  pass the DDP-wrapped model as the optimizer's ``model=``. The running statistics then follow the
  method, and SAM runs its first pass inside ``no_sync``: every worker ascends along its own
  gradient, and only the second gradient is averaged.
"""
from .collectives import average_gradients, broadcast_buffers
from .env import DistEnv, DistributedError, check_parallel_world, cleanup, free_port, init_distributed, is_distributed
from .parallel_mixed import ParallelMixedStep

__all__ = [
    "DistEnv", "DistributedError", "average_gradients", "broadcast_buffers", "ParallelMixedStep", "check_parallel_world",
    "cleanup", "free_port", "init_distributed", "is_distributed",
]
