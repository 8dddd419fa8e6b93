"""Peak live tensor memory of a piece of code, measured on CPU through a TorchDispatchMode.

Every op's outputs are recorded by storage; a storage counts as live while any tensor recorded on
it is alive (checked through weak references before each op). Tensors created before the block
do not count. This sees everything that passes through the dispatcher, backward included.
"""
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakMemory(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live = {}  # storage data_ptr -> (nbytes, [weakrefs of tensors on it])
        self.current = 0
        self.peak = 0

    def _purge(self):
        for ptr in [ptr for ptr, (_, refs) in self.live.items() if all(r() is None for r in refs)]:
            self.current -= self.live.pop(ptr)[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._purge()
        out = func(*args, **(kwargs or {}))
        # In-place ops and views return tensors on their inputs' storage: no new memory.
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor) and t.device.type != "meta"
        }
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr in self.live:
                self.live[ptr][1].append(weakref.ref(t))
            elif ptr not in inputs and storage.nbytes() > 0:
                self.live[ptr] = (storage.nbytes(), [weakref.ref(t)])
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
        return out


def peak_bytes(fn) -> int:
    """Peak bytes of tensor storage allocated and alive at once while ``fn()`` runs."""
    with PeakMemory() as tracker:
        fn()
    return tracker.peak
