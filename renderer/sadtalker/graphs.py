"""CUDA-graph replay of the per-batch render step (mapping net → driving keypoints → generator → uint8).

Why: at small batches the renderer's hundreds of small kernels are bound by the host launching them, not by the
GPU running them. A CUDA graph records the launches once and replays them with one call, bit-identical to the eager
run of the same batch (same kernels, same algorithms). Measured on an H100 at 256 (bench/results/): batch 1 float16
69.7 → 89.9 frames/s; from batch 8 on the GPU is the bound and the gain is small (114.5 → 120.7).

A graph is recorded for one batch size, dtype and set of input shapes: `GraphedRender` owns static input buffers;
each call copies the batch into them, replays, and copies the uint8 frames to the host. A shorter batch (a group's
last) replays the same graph on its first rows. CUDA only; `GraphedRender.capture` raises `GraphUnavailable` when
recording fails (an unsupported op, a driver without graph support), and callers then stay eager. The recorded step
is `RenderStep` (eager) or, with `video.compile: true`, its ahead-of-time compiled form (compiled.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from renderer.sadtalker.facerender import FaceRenderer, frames_to_uint8_tensor
from renderer.sadtalker.transfer import HostCopy

#: Eager warm-up passes before recording (cuDNN algorithm choice and allocator growth happen outside the graph).
WARMUP_PASSES = 2


class GraphUnavailable(RuntimeError):
    """Recording a CUDA graph failed; run eagerly instead."""


class RenderStep(torch.nn.Module):
    """The per-batch render work as one module: mapping net → driving keypoints → generator → uint8 frames
    [B, S, S, 3], under autocast to `dtype` (None: float32) with its weight cache off, as graphs need.

    What a graph records and what compiled.py exports and compiles; the renderer's parameters are its own (under
    the attribute `renderer`)."""

    def __init__(self, renderer: FaceRenderer, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.renderer = renderer
        self.dtype = dtype

    def forward(
        self, feature: torch.Tensor, kp_canonical: torch.Tensor, kp_source: torch.Tensor, windows: torch.Tensor
    ) -> torch.Tensor:
        device_type = feature.device.type
        with torch.autocast(
            device_type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None, cache_enabled=False
        ):
            kp_driving = self.renderer.driving_keypoints(kp_canonical, windows)
            prediction = self.renderer.render(feature, kp_source, kp_driving).prediction
        return frames_to_uint8_tensor(prediction)


def the_step(step: Callable[..., torch.Tensor] | None, renderer: FaceRenderer, dtype: torch.dtype | None) -> Any:
    """`step`, or the eager RenderStep where None. Tested with `is None`: the truth of a torch.compile'd step is
    its len(), which raises."""
    return RenderStep(renderer, dtype) if step is None else step


class GraphedRender:
    """One recorded render batch; call it with tensors shaped like the ones it was captured with."""

    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: tuple[torch.Tensor, ...], output: torch.Tensor):
        self._graph = graph
        self._inputs = inputs
        self._output = output

    def matches(self, *tensors: torch.Tensor) -> bool:
        """Whether these tensors fit the recorded batch: the same shapes and dtypes, or fewer rows (a short batch)."""
        rows = tensors[0].shape[0]
        return all(
            t.shape[0] == rows <= s.shape[0] and t.shape[1:] == s.shape[1:] and t.dtype == s.dtype
            for t, s in zip(tensors, self._inputs, strict=True)
        )

    def __call__(
        self, feature: torch.Tensor, kp_canonical: torch.Tensor, kp_source: torch.Tensor, windows: torch.Tensor
    ) -> np.ndarray:
        """The batch's uint8 frames on the host [B, S, S, 3]."""
        return self.launch(feature, kp_canonical, kp_source, windows).result().numpy()

    def launch(
        self, feature: torch.Tensor, kp_canonical: torch.Tensor, kp_source: torch.Tensor, windows: torch.Tensor
    ) -> HostCopy:
        """Queue the batch (copies into the static inputs, the replay, the frames' copy to the host) and return
        without waiting for it. A later launch may follow at once: its copies and replay queue behind this one's.

        A short batch (fewer rows than recorded) fills the first rows and takes their frames: every row is computed
        on its own, so the rows left from the batch before only cost their share of the replay."""
        rows = feature.shape[0]
        for static, value in zip(self._inputs, (feature, kp_canonical, kp_source, windows), strict=True):
            static[:rows].copy_(value)
        self._graph.replay()
        return HostCopy(self._output[:rows])

    @classmethod
    def capture(
        cls,
        renderer: FaceRenderer,
        feature: torch.Tensor,
        kp_canonical: torch.Tensor,
        kp_source: torch.Tensor,
        windows: torch.Tensor,
        dtype: torch.dtype | None,
        step: Callable[..., torch.Tensor] | None = None,
    ) -> GraphedRender:
        """Record the batch given by these example tensors (their values are only used for the warm-up).

        `dtype`: the autocast dtype (None: float32). `step`: what to record instead of the eager `RenderStep`
        (the compiled step of compiled.py, which takes the same tensors and returns the same frames).
        """
        step = the_step(step, renderer, dtype)
        if feature.device.type != "cuda":
            raise GraphUnavailable(f"CUDA graphs need a CUDA device, not {feature.device}")
        if not getattr(step, "graphable", True):
            raise GraphUnavailable("this compiled render step cannot be recorded as a CUDA graph (its runner queries "
                                   "CUDA events between calls); call it batch by batch")  # fmt: skip
        device = feature.device
        inputs = tuple(t.clone() for t in (feature, kp_canonical, kp_source, windows))
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        try:
            with torch.cuda.stream(side):
                for _ in range(WARMUP_PASSES):
                    step(*inputs)
        except RuntimeError as exc:  # out of memory (a compiled step reports it as a plain RuntimeError), or worse
            torch.cuda.synchronize(device)
            raise GraphUnavailable(f"warming up the render batch failed: {exc}") from exc
        torch.cuda.current_stream(device).wait_stream(side)
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                output = step(*inputs)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
            torch.cuda.synchronize(device)
            raise GraphUnavailable(f"recording the render batch as a CUDA graph failed: {exc}") from exc
        return cls(graph, inputs, output)
