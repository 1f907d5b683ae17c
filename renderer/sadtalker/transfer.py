"""Copies between the host and a CUDA device that never stall the process's other threads.

A plain `tensor.cpu()` or `tensor.to("cuda")` goes through pageable host memory: the driver then waits for the stream
inside the copy call, and while it waits other threads' CUDA calls on the same device wait too. With the stage's
preparation thread beside the render loop, that made every small network call of the preparation wait for a whole
render batch. On an H100, preparing one 4 s clip beside the render loop took 16.2 s with plain copies and 88 ms
with these (39 ms alone; bench/profile_prepare.py, bench/results/2026-11-26-h100c). Here copies go through pinned
(page-locked) buffers, asynchronously on the current stream, and the host waits on an event with blocking sync,
outside the driver's copy path and without spinning a core. On the CPU both functions are plain conversions.
"""

from __future__ import annotations

import torch


class HostCopy:
    """A copy of `tensor` to the host, started now and queued on the current stream; `result()` waits for it.

    The render loop starts a batch's copy, queues the next batch behind it and only then waits, so the GPU never
    idles while the host hands frames on. The source may be overwritten by work queued after the copy (a graph's
    static output, replayed again): the stream runs the copy first."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self._done: torch.cuda.Event | None = None
        if tensor.device.type != "cuda":
            self._host = tensor.detach().cpu()
            return
        self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self._host.copy_(tensor.detach(), non_blocking=True)
        self._done = torch.cuda.Event(blocking=True)
        self._done.record()

    def result(self) -> torch.Tensor:
        """The CPU tensor, once the copy has arrived."""
        if self._done is not None:
            self._done.synchronize()
            self._done = None
        return self._host


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` as a CPU tensor (the same values; a CUDA tensor is copied through a pinned buffer)."""
    return HostCopy(tensor).result()


def to_device(tensor: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`tensor` on `device` (converted to `dtype` first, on the host); from the host to a CUDA device through a pinned
    buffer, queued on the current stream (the copy is ordered before the work that uses it)."""
    device = torch.device(device)
    if dtype is not None and tensor.device.type == "cpu":
        tensor = tensor.to(dtype)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device, dtype)
    return tensor.contiguous().pin_memory().to(device, non_blocking=True)
