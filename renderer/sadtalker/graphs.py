"""CUDA-graph replay of the per-batch render step (mapping net → driving keypoints → generator → uint8).

Why: at small batches the renderer's hundreds of small kernels are bound by the host launching them, not by the
GPU running them. A CUDA graph records the launches once and replays them with one call, bit-identical to the eager
run of the same batch (same kernels, same algorithms). Measured on an H100 at 256 (bench/results/): batch 1 float16
69.7 → 89.9 frames/s; from batch 8 on the GPU is the bound and the gain is small (114.5 → 120.7).

A graph is recorded for one batch size, dtype and set of input shapes: `GraphedRender` owns static input buffers;
each call copies the batch into them, replays, and copies the uint8 frames to the host. Batches of another size
(a group's last, partial batch) run eagerly. CUDA only; `GraphedRender.capture` raises `GraphUnavailable` when
recording fails (an unsupported op, a driver without graph support), and callers then stay eager.
"""

from __future__ import annotations

import numpy as np
import torch

from renderer.sadtalker.facerender import FaceRenderer, frames_to_uint8_tensor
from renderer.sadtalker.transfer import HostCopy

#: Eager warm-up passes before recording (cuDNN algorithm choice and allocator growth happen outside the graph).
WARMUP_PASSES = 2


class GraphUnavailable(RuntimeError):
    """Recording a CUDA graph failed; run eagerly instead."""


class CompileUnavailable(GraphUnavailable):
    """torch.compile of the render step failed; record the uncompiled step instead."""


class GraphedRender:
    """One recorded render batch; call it with tensors shaped like the ones it was captured with."""

    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: tuple[torch.Tensor, ...], output: torch.Tensor):
        self._graph = graph
        self._inputs = inputs
        self._output = output

    def matches(self, *tensors: torch.Tensor) -> bool:
        return all(t.shape == s.shape and t.dtype == s.dtype for t, s in zip(tensors, self._inputs, strict=True))

    def __call__(
        self, feature: torch.Tensor, kp_canonical: torch.Tensor, kp_source: torch.Tensor, windows: torch.Tensor
    ) -> np.ndarray:
        """The batch's uint8 frames on the host [B, S, S, 3]."""
        return self.launch(feature, kp_canonical, kp_source, windows).result().numpy()

    def launch(
        self, feature: torch.Tensor, kp_canonical: torch.Tensor, kp_source: torch.Tensor, windows: torch.Tensor
    ) -> HostCopy:
        """Queue the batch (copies into the static inputs, the replay, the frames' copy to the host) and return
        without waiting for it. A later launch may follow at once: its copies and replay queue behind this one's."""
        for static, value in zip(self._inputs, (feature, kp_canonical, kp_source, windows), strict=True):
            static.copy_(value)
        self._graph.replay()
        return HostCopy(self._output)

    @classmethod
    def capture(
        cls,
        renderer: FaceRenderer,
        feature: torch.Tensor,
        kp_canonical: torch.Tensor,
        kp_source: torch.Tensor,
        windows: torch.Tensor,
        dtype: torch.dtype | None,
        compile: bool = False,
    ) -> GraphedRender:
        """Record the batch given by these example tensors (their values are only used for the warm-up).

        `dtype`: the autocast dtype (None: float32). Autocast runs with its weight-cast cache off, as graphs need.
        `compile`: run the step through `torch.compile` (TorchInductor fuses the elementwise work around the
        convolutions) before recording; the warm-up passes compile it. Raises `CompileUnavailable` when compiling
        fails (no Triton, no C compiler), so the caller can record the eager step instead.
        """
        if feature.device.type != "cuda":
            raise GraphUnavailable(f"CUDA graphs need a CUDA device, not {feature.device}")
        device = feature.device
        inputs = tuple(t.clone() for t in (feature, kp_canonical, kp_source, windows))

        def step(feature: torch.Tensor, kp_canonical: torch.Tensor, kp_source: torch.Tensor, windows: torch.Tensor):
            with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None, cache_enabled=False):
                kp_driving = renderer.driving_keypoints(kp_canonical, windows)
                prediction = renderer.render(feature, kp_source, kp_driving).prediction
            return frames_to_uint8_tensor(prediction)

        if compile:
            step = torch.compile(step, dynamic=False)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        try:
            with torch.cuda.stream(side):
                for _ in range(WARMUP_PASSES):
                    step(*inputs)
        except torch.cuda.OutOfMemoryError as exc:
            torch.cuda.synchronize(device)
            raise GraphUnavailable(f"warming up the render batch ran out of GPU memory: {exc}") from exc
        except Exception as exc:
            torch.cuda.synchronize(device)
            if compile:
                raise CompileUnavailable(f"torch.compile of the render step failed: {exc}") from exc
            raise
        torch.cuda.current_stream(device).wait_stream(side)
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                output = step(*inputs)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
            torch.cuda.synchronize(device)
            raise GraphUnavailable(f"recording the render batch as a CUDA graph failed: {exc}") from exc
        return cls(graph, inputs, output)
