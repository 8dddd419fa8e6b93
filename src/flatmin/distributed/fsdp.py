"""Sharded training with FSDP2 (``torch.distributed.fsdp.fully_shard``), and checkpoints of it.

Sharding. ``shard_model`` calls ``fully_shard`` on every *block* of the model, then on the root.
Each call makes one FSDP unit: its parameters become DTensors sharded along dim 0 over the mesh
(each rank keeps ``1/N`` of every tensor, the last ranks fewer rows where dim 0 does not divide),
and they are all-gathered whole only for the unit's forward and backward, then freed. A block is a
repeated unit of the network, found by ``find_blocks``: walking down from the root, a module
that holds parameters and sits in a container (``nn.Sequential``, ``nn.ModuleList``,
``nn.ModuleDict``) is a block, and its insides are not searched further; containers, and the
children of any other module, are looked into. Normalisation layers on their own (BatchNorm,
LayerNorm, GroupNorm) are not blocks. So a ResNet's blocks are its residual blocks, a
transformer's its layers, an MLP's or a plain CNN's its Linear and Conv layers; what no block holds
(normalisation layers between blocks, parameters set directly on the root) belongs to the root
unit. A model with no container at all is one unit, the root.

Buffers (BatchNorm running statistics) are not sharded: every rank keeps its own, and the trainer
broadcasts rank 0's after each update, as DDP does.

Checkpoints are one *full* state dict gathered on rank 0 in CPU memory, in the format of an
unsharded run: model tensors with the unsharded model's names and shapes, optimizer state with full
tensors (momentum buffers, ARWP's ``F``, the noise generator). ``torch.distributed.checkpoint``'s
sharded format would save that memory, but a full state dict keeps one file that
``flatmin analyze``, a DDP run or a one-process run read as they are, and that resumes sharded on
any number of processes: loading slices every full tensor like the parameter it belongs to on the
current mesh. Cost: gathering sends every tensor to every rank once, one unsharded tensor at a time
(``DTensor.full_tensor``); rank 0 then holds a full copy of the weights and the optimizer state in
CPU memory while it writes, and every rank reads the whole file to load.
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
# The oldest torch whose FSDP2 passes flatmin's tests (on the CPU, over gloo). torch 2.6's fails
# inside torch ('Stream' object has no attribute 'record_event'); 2.7 and 2.9 run, but the sharded
# updates of every perturbing method differ from the unsharded ones (plain SGD and NRS agree).
FSDP2_SINCE = "2.10"


def check_torch() -> None:
    """Raise a one-line ``ValueError`` on a torch whose FSDP2 flatmin does not trust."""
    if torch.torch_version.TorchVersion(torch.__version__) < FSDP2_SINCE:
        raise ValueError(f"sharded training (FSDP2) needs torch >= {FSDP2_SINCE}, this is torch {torch.__version__}: "
                         "upgrade torch, or train without --fsdp (DDP)")


def find_blocks(model: nn.Module) -> List[nn.Module]:
    """The blocks of ``model`` (module docstring), in the order ``model.modules()`` visits them.

    Args:
        model: the model to shard.

    Returns:
        The submodules that get their own ``fully_shard`` unit.
    """
    blocks: List[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, CONTAINERS) or not isinstance(module, CONTAINERS):
                visit(child)
            elif next(child.parameters(), None) is not None and not isinstance(child, NORMS):
                blocks.append(child)
            # A parameter-free child of a container (ReLU, pooling) holds nothing to shard.

    visit(model)
    return blocks


def process_group_mesh(device: torch.device) -> DeviceMesh:
    """A 1-D mesh over every rank of the process group, on ``device``'s type (gloo on CPU, NCCL on
    CUDA). Outside torchrun it starts a one-process group first (left by ``cleanup``), so that a
    sharded run also works in one process.

    Args:
        device: a device of the type to shard on.

    Returns:
        The mesh.
    """
    check_torch()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return init_device_mesh(device.type, (dist.get_world_size(),))


def shard_model(model: nn.Module, mesh: Optional[DeviceMesh] = None, blocks: Optional[Sequence[nn.Module]] = None,
                **fsdp_options: Any) -> nn.Module:
    """``fully_shard`` on every block of ``model``, then on ``model`` itself; returns ``model``
    (sharded in place: its parameters are DTensors, ``Shard(0)`` on ``mesh``).

    Args:
        model: the model, built alike on every rank.
        mesh: the device mesh: 1-D for FSDP, 2-D for HSDP (``init_device_mesh(type, (replicas, shards),
            mesh_dim_names=("replicate", "shard"))``, named, as the state-dict functions need); default
            all ranks in one dimension.
        blocks: the submodules that get their own unit; default ``find_blocks(model)``.
        **fsdp_options: passed on to every ``fully_shard`` call (``reshard_after_forward``, ``mp_policy``).

    Build the model alike on every rank (same seed) before sharding: each rank keeps its rows of
    the same full tensors. Create the optimizer after sharding, over ``model.parameters()``.

    Returns:
        ``model`` itself, sharded.
    """
    if mesh is None:
        mesh = process_group_mesh(next(model.parameters()).device)
    check_torch()
    for block in find_blocks(model) if blocks is None else blocks:
        fully_shard(block, mesh=mesh, **fsdp_options)
    fully_shard(model, mesh=mesh, **fsdp_options)
    return model


# ----------------------------------------------------------------------------- checkpoints

def _storage(t: Tensor) -> int:
    return (t.to_local() if isinstance(t, DTensor) else t).untyped_storage().data_ptr()


def full_model_state(model: nn.Module) -> Dict[str, Tensor]:
    """The unsharded ``state_dict`` of a sharded model, in CPU memory on rank 0 (``{}`` on the other
    ranks): a snapshot, sharing no memory with the model. A collective: every rank calls it.

    Args:
        model: a model sharded with `shard_model`.

    Returns:
        The full state dict on rank 0, ``{}`` on the others.
    """
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # On the CPU torch hands back the model's own buffers (and, in one process, its weights).
    live = {_storage(t) for t in itertools.chain(model.parameters(), model.buffers())}
    return {name: t.clone() if _storage(t) in live else t for name, t in state.items()}


def load_full_model_state(model: nn.Module, state: Dict[str, Tensor]) -> None:
    """Load an unsharded ``state_dict`` (given on every rank) into a sharded model, each rank
    keeping its own rows. A collective: every rank calls it.

    Args:
        model: a model sharded with `shard_model`.
        state: the unsharded state dict (as `full_model_state` or an unsharded model writes it).
    """
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def _map_tensors(obj: Any, fn: Callable[[Tensor], Any]) -> Any:
    """``obj`` with ``fn`` applied to every tensor in it (nested dicts, lists, tuples), in order."""
    if isinstance(obj, dict):
        return {key: _map_tensors(value, fn) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(value, fn) for value in obj)
    return fn(obj) if isinstance(obj, Tensor) else obj


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
    """``optimizer.state_dict()`` with every DTensor gathered whole into CPU memory, on rank 0 (``{}``
    on the other ranks): a flatmin optimizer's state with its base optimizer's, or a torch optimizer's.

    A collective: every rank calls it and gathers the same tensors in the same order (the state
    dict is built alike on every rank). One full tensor at a time exists on each rank. The result
    shares no memory with the optimizer.

    Args:
        optimizer: an optimizer over the parameters of a sharded model.

    Returns:
        The full state dict on rank 0, ``{}`` on the others.
    """
    keep = dist.get_rank() == 0

    def gather(t: Tensor) -> Optional[Tensor]:
        full = t.full_tensor() if isinstance(t, DTensor) else t
        if not keep:
            return None
        full = full.detach().cpu()
        # A snapshot: in one process (or for a state tensor already on the CPU) this is still the live tensor.
        return full.clone() if _storage(full) == _storage(t) else full

    state = _map_tensors(optimizer.state_dict(), gather)
    return state if keep else {}


def _shard_like(value: Any, p: Tensor) -> Any:
    """A full state tensor of parameter ``p`` sharded like ``p``: a tensor of ``p``'s shape, or one
    number per filter of ``p`` (ARWP's ``F``), split along dim 0 over ``p``'s mesh; anything else
    (a scalar such as Adam's ``step``) is kept as it is."""
    if not isinstance(p, DTensor) or not isinstance(value, Tensor) or isinstance(value, DTensor):
        return value
    per_filter = value.ndim == 1 and p.ndim >= 2 and value.shape[0] == p.shape[0]
    if value.shape != p.shape and not per_filter:
        return value
    if per_filter and any(isinstance(placement, Shard) and placement.dim != 0 for placement in p.placements):
        raise ValueError(f"a per-filter state of shape {tuple(value.shape)} cannot follow placements "
                         f"{p.placements}: only dim-0 sharding (FSDP) is supported")
    # Every rank holds the full tensor (read from the checkpoint): each keeps its slice, no communication.
    return distribute_tensor(value.to(p.device), p.device_mesh, p.placements, src_data_rank=None)


def _shard_section(section: Dict[str, Any], params: List[Tensor]) -> Dict[str, Any]:
    """A torch optimizer ``state_dict`` (``state`` keyed by parameter index) sharded like ``params``."""
    if not isinstance(section.get("state"), dict):
        raise ValueError("not an optimizer state_dict: it has no 'state' mapping")
    states = {}
    for index, entry in section["state"].items():
        if not isinstance(index, int) or not 0 <= index < len(params):
            raise ValueError(f"optimizer state for parameter {index!r}, but the optimizer has {len(params)}")
        states[index] = {key: _shard_like(value, params[index]) for key, value in entry.items()}
    return {**section, "state": states}


def load_full_optimizer_state(optimizer: torch.optim.Optimizer, state: Dict[str, Any]) -> None:
    """Load a state dict written by ``full_optimizer_state`` (or by an unsharded run), given whole
    on every rank, into ``optimizer`` over sharded parameters: every rank keeps the rows of its own
    parameter shards, on the current mesh, whatever the number of processes that wrote it.

    The parameters are numbered as ``state_dict()`` numbers them (group by group); a flatmin
    optimizer's ``base_optimizer`` section is sharded the same way.

    Args:
        optimizer: an optimizer over the parameters of a sharded model.
        state: the full state dict, on every rank.

    Raises:
        ValueError: ``state`` is not an optimizer state dict, has state for more parameters than
            the optimizer, or a per-filter state that cannot follow its parameter's shards.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = _shard_section(state, params)
    if isinstance(state.get("base_optimizer"), dict):
        state["base_optimizer"] = _shard_section(state["base_optimizer"], params)
    optimizer.load_state_dict(state)
