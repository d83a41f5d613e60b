"""Large scratch buffers handed from one call of the attention function to the next.

A CPU tensor of more than a few MiB is allocated by glibc as a fresh memory mapping, and every page
of it faults (and is zeroed by the kernel) the first time it is written. A training step at the
pascal setting touched 365-510 MiB of such fresh pages (the kept probability maps, the chunk
buffers), and a step with the faults taken away (glibc told never to map or trim) ran 0.1-0.25 s
faster out of 1.6-1.8 s. CUDA's caching allocator already reuses its blocks; this pool does the
same for the attention's own buffers on CPU.

Buffers change hands, they are never shared: `take` removes a buffer from the pool, and the caller
owns it until it `give`s it back. A forward whose backward has not run yet still holds its maps, so
a second forward (or a backward that never comes) can never write into them; it finds the pool
empty and allocates. The pool holds what one training step needs between steps (about 0.3 GB at
pascal, 0.8 GB at coco), which that step would have needed at its peak anyway; `clear()` hands it
back to the system.
"""
from __future__ import annotations

import torch

# Buffers kept per pool at most: a training step of the attention passes about twelve through it
# (two maps, keys, values, their two gradient sums, four chunk buffers, the centred keys); more,
# left from other shapes, are dropped smallest first.
MAX_POOLED_BUFFERS = 16


class ScratchPool:
    """Flat buffers keyed by dtype and device, each handed out whole to one owner at a time."""

    def __init__(self) -> None:
        self._free: list[torch.Tensor] = []

    def take(self, numel: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """A flat buffer of `numel` elements (a view of the smallest pooled buffer that fits, else
        a new one); its contents are arbitrary."""
        device = torch.device(device)
        fitting = [
            index
            for index, buffer in enumerate(self._free)
            if buffer.dtype == dtype and buffer.device == device and buffer.numel() >= numel
        ]
        if not fitting:
            return torch.empty(numel, dtype=dtype, device=device)
        best = min(fitting, key=lambda index: self._free[index].numel())
        return self._free.pop(best)[:numel]

    def give(self, *buffers: torch.Tensor | None) -> None:
        """Puts buffers from `take` back, whole: a view of one (a slice, a reshape) returns the flat
        buffer it was cut from. The caller must not touch them afterwards."""
        for buffer in buffers:
            if buffer is None:
                continue
            base = buffer if buffer._base is None else buffer._base
            if base.dim() != 1:
                raise ValueError("only buffers from ScratchPool.take can be given back")
            if not any(base is pooled for pooled in self._free):
                self._free.append(base)
        while len(self._free) > MAX_POOLED_BUFFERS:
            smallest = min(range(len(self._free)), key=lambda index: self._free[index].numel())
            del self._free[smallest]

    def clear(self) -> None:
        self._free.clear()

    @property
    def nbytes(self) -> int:
        return sum(buffer.numel() * buffer.element_size() for buffer in self._free)
