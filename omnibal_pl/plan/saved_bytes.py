"""Activation bytes as autograd keeps them: the distinct storages saved for backward.

One instrument for the profiler (bytes one block saves in one forward) and for the runtime (the peak of
what a whole training step holds at once, :class:`PeakSavedBytes`), so the memory model and the run it
describes are measured the same way. Both leave out what is no activation (:class:`ParameterFilter`).

What it cannot see: tensors saved inside a recomputed region (``torch.utils.checkpoint`` keeps them with
its own hooks while it recomputes in backward, the *recompute transient*), and memory no autograd node
holds (gradients, communication buffers). On CUDA the allocator's peak sees those too.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch.distributed.tensor import DTensor


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a ``DTensor`` (a ZeRO 2/3 parameter), the tensor itself otherwise."""
    return t.to_local() if isinstance(t, DTensor) else t


class ParameterFilter:
    """Which saved tensors are no activation: the storage of one of ``tensors`` (the parameters, the step's
    input data), any ``nn.Parameter`` (also the unsharded copies FSDP2 registers while a block runs), or a
    tensor computed from one parameter alone through single-input autograd nodes (autocast's cast of a
    weight, a transpose of that cast). Autocast caches those casts for a whole autocast region, so they cost
    once per step, not per micro-batch."""

    def __init__(self, tensors: Iterable[torch.Tensor]) -> None:
        self.storages = {_local(t).untyped_storage().data_ptr() for t in tensors}

    def __contains__(self, t: torch.Tensor) -> bool:
        if isinstance(t, torch.nn.Parameter) or t.untyped_storage().data_ptr() in self.storages:
            return True
        fn = t.grad_fn
        while fn is not None and not hasattr(fn, "variable"):  # AccumulateGrad (a leaf) has ``variable``
            inputs = [n for n, _ in fn.next_functions if n is not None]
            fn = inputs[0] if len(inputs) == 1 else None
        return fn is not None and isinstance(fn.variable, torch.nn.Parameter)


def saved_bytes(run: Callable[[], torch.Tensor], skip: ParameterFilter) -> tuple[int, torch.Tensor]:
    """Bytes of the distinct storages autograd saves while ``run()`` executes (tensors in ``skip``
    excluded), and its output."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t not in skip:
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
        return t.detach()  # see PeakSavedBytes._pack

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return sum(storages.values()), out


class _Held:
    """A saved tensor while autograd holds it; releases its storage's count when autograd drops it."""

    __slots__ = ("tensor", "owner", "key")

    def __init__(self, tensor: torch.Tensor, owner: "PeakSavedBytes", key: int) -> None:
        self.tensor, self.owner, self.key = tensor, owner, key

    def __del__(self) -> None:
        self.owner._release(self.key)


class PeakSavedBytes:
    """While entered, tracks the bytes of the distinct storages autograd holds for backward (what
    :func:`saved_bytes` counts, parameters excluded by ``skip``) and their peak since the last
    :meth:`reset`. A storage counts once however many nodes save it, until the last of them is freed
    (after its backward, or when the graph is dropped). Install it on the thread that runs forward."""

    def __init__(self, skip: ParameterFilter) -> None:
        self.skip = skip
        self.live: dict[int, list[int]] = {}  # storage address -> [bytes, nodes holding it]
        self.current = 0
        self.peak = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def reset(self) -> None:
        """Starts a new peak from what is held now."""
        self.peak = self.current

    def _pack(self, t: torch.Tensor) -> object:
        if t in self.skip:
            return t
        storage = t.untyped_storage()
        key = storage.data_ptr()
        entry = self.live.get(key)
        if entry is None:
            self.live[key] = [storage.nbytes(), 1]
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        else:
            entry[1] += 1
        return _Held(t.detach(), self, key)  # detached: holding an op's own output would keep its graph alive

    @staticmethod
    def _unpack(held: object) -> torch.Tensor:
        return held.tensor if isinstance(held, _Held) else held  # type: ignore[return-value]

    def _release(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    def __enter__(self) -> "PeakSavedBytes":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)
