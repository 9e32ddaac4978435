"""Peak tensor memory of a call, on CPU and on CUDA (chapter 8).

    out, peak_bytes = peak_memory(fn, *args, **kwargs)

``peak_bytes`` is the largest amount of tensor memory that was alive at any moment
during ``fn(*args, **kwargs)``, counted above the level at its start: tensors that
existed before the call (the inputs, say) are not counted, temporaries that ``fn``
frees before it returns are counted while they lived, and the result is counted if
it is new.

How it is measured:

* **CUDA** (the tensors among ``args``/``kwargs`` are on a GPU): the caching
  allocator's own counters, ``torch.cuda.reset_peak_memory_stats`` and
  ``torch.cuda.max_memory_allocated``, minus ``torch.cuda.memory_allocated`` at the
  start. These include the allocator's rounding to blocks of 512 bytes.
* **CPU** (everything else): ``tracemalloc`` does not see PyTorch's allocator, and the
  process RSS is too coarse. Instead a ``TorchDispatchMode`` sees every ATen operator
  that runs during the call (forward and backward). Each output whose storage is new
  (not a view of an input, not written in place) adds ``storage.nbytes()`` to a live
  count, and a weak reference on that storage subtracts it again when the storage is
  freed. The peak of that count is exact to the byte for tensors; it does not see
  scratch buffers that a single C++ kernel allocates and frees inside itself.
  ``torch.distributed._tools.MemTracker`` works the same way.

The CPU tracker costs some microseconds of Python per operator, so measure a loop of
many tiny operators (a tiled kernel with small tiles) at the sizes you care about,
not inside a benchmark.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["peak_memory", "StorageTracker"]


def _storage(t: torch.Tensor):
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse, nested, or no storage
        return None


class StorageTracker(TorchDispatchMode):
    """Count the bytes of the tensor storages created while the mode is active.

    Attributes:
        current: bytes alive now, among the storages created inside the mode.
        peak: the largest value ``current`` has taken.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict[int, tuple[weakref.ref, int]] = {}  # storage key -> (weakref, nbytes)

    def _freed(self, key: int, _ref: weakref.ref | None = None) -> None:
        """The weakref callback of a tracked storage: it was freed."""
        entry = self._live.pop(key, None)
        if entry is not None:
            self.current -= entry[1]

    def _track(self, storage) -> None:
        key = storage._cdata  # the StorageImpl's address: unique while it is alive
        nbytes = storage.nbytes()
        if key in self._live:  # an existing storage that an op resized (out=, resize_)
            ref, old = self._live[key]
            if nbytes != old:
                self._live[key] = (ref, nbytes)
                self.current += nbytes - old
        elif nbytes > 0:
            ref = weakref.ref(storage, functools.partial(self._freed, key))
            self._live[key] = (ref, nbytes)
            self.current += nbytes
        self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = set()
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor) and (s := _storage(t)) is not None:
                seen.add(s._cdata)
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            s = _storage(t)
            if s is None:
                continue
            if s._cdata in seen and s._cdata not in self._live:
                continue  # a view of, or an in-place write into, a pre-existing tensor
            self._track(s)
        return out


def _cuda_device(args: Any, kwargs: Any) -> torch.device | None:
    for t in tree_leaves((args, kwargs)):
        if isinstance(t, torch.Tensor) and t.device.type == "cuda":
            return t.device
    return None


def peak_memory(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, int]:
    """Call ``fn(*args, **kwargs)``; return its result and the peak tensor bytes it allocated.

    Args:
        fn: any callable; it may run a backward pass too.
        *args, **kwargs: passed to ``fn`` unchanged.

    Returns:
        ``(result, peak_bytes)``: the peak, above the level at the start of the call, of
        the tensor memory alive on the device of the tensors involved: CUDA if any
        argument is a CUDA tensor, else the storage tracker described in the module
        docstring (which counts the storages that ``fn`` creates, on any device).
    """
    device = _cuda_device(args, kwargs)
    if device is not None:
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn(*args, **kwargs)
        torch.cuda.synchronize(device)
        return result, int(torch.cuda.max_memory_allocated(device) - start)
    tracker = StorageTracker()
    with tracker:
        result = fn(*args, **kwargs)
    return result, int(tracker.peak)
