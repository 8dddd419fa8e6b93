"""What a training step costs beyond its forward and backward passes: the ops an optimizer
dispatches and the tensor memory it holds, measured op by op.

``StepTracker`` is a ``TorchDispatchMode``: every op that reaches the dispatcher while it is
active is counted, and every op output's storage is recorded as live until no tensor on it is
alive (weak references, checked before each op). Work done inside a closure wrapped with
``tracker.closure(fn)`` is attributed to the closure, everything else to the optimizer ("own").

    tracker = StepTracker()
    with tracker:
        opt.step(tracker.closure(closure))
    tracker.own_ops, tracker.peak_bytes, tracker.own_peak_bytes

It sees what passes through the dispatcher, backward included (for a sharded model, the ops on
the local shards); it cannot see memory an op allocates internally and frees before returning, nor
memory made without an op (a generator's state), nor what a collective allocates inside the
process group. Tensors created before the block do not count.
"""
from __future__ import annotations

import weakref
from collections import Counter
from typing import Any, Callable, Dict, List, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten


def _has_storage(t: Any) -> bool:
    """A tensor with memory of its own: not a meta tensor, nor a wrapper such as a DTensor (whose
    local shards pass through the dispatcher themselves)."""
    return isinstance(t, torch.Tensor) and t.device.type != "meta" and not is_traceable_wrapper_subclass(t)


class StepTracker(TorchDispatchMode):
    """Dispatched ops and live tensor storage while active, split into the closures' and the rest.

    ```python
    tracker = StepTracker()
    with tracker:
        opt.step(tracker.closure(closure))
    tracker.own_ops, tracker.peak_bytes, tracker.own_peak_bytes
    ```

    Attributes:
        own_op_counts: ops dispatched outside the closures, by name.
        closure_ops: how many ops the closures dispatched.
        peak_bytes: the most bytes of storage alive at once (created inside the block).
        own_peak_bytes: the same, counting only storage created outside the closures.
    """

    def __init__(self) -> None:
        super().__init__()
        self.own_op_counts: Counter = Counter()
        self.closure_ops = 0
        self.peak_bytes = 0
        self.own_peak_bytes = 0
        self._live: Dict[int, Tuple[int, bool, List[weakref.ref]]] = {}  # storage ptr -> (bytes, own, refs)
        self._current = 0
        self._current_own = 0
        self._depth = 0

    @property
    def own_ops(self) -> int:
        """How many ops were dispatched outside the closures."""
        return sum(self.own_op_counts.values())

    def closure(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        """``fn`` with its work attributed to the closures.

        Args:
            fn: a closure (or any function of no arguments).

        Returns:
            A function that calls ``fn`` and returns what it returns.
        """

        def wrapped() -> Any:
            self._depth += 1
            try:
                return fn()
            finally:
                self._depth -= 1

        return wrapped

    def _free_dead(self) -> None:
        dead = [ptr for ptr, (_, _, refs) in self._live.items() if all(r() is None for r in refs)]
        for ptr in dead:
            nbytes, own, _ = self._live.pop(ptr)
            self._current -= nbytes
            if own:
                self._current_own -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self._free_dead()
        own = self._depth == 0
        if own:
            self.own_op_counts[str(func.overloadpacket)] += 1
        else:
            self.closure_ops += 1
        out = func(*args, **(kwargs or {}))
        # In-place ops and views return tensors on their inputs' storage: no new memory.
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if _has_storage(t)}
        for t in tree_flatten(out)[0]:
            if not _has_storage(t):
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr in self._live:
                self._live[ptr][2].append(weakref.ref(t))
            elif ptr not in inputs and storage.nbytes() > 0:
                self._live[ptr] = (storage.nbytes(), own, [weakref.ref(t)])
                self._current += storage.nbytes()
                self.peak_bytes = max(self.peak_bytes, self._current)
                if own:
                    self._current_own += storage.nbytes()
                    self.own_peak_bytes = max(self.own_peak_bytes, self._current_own)
        return out
