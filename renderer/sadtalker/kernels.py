"""Triton kernels for the renderer's elementwise work on CUDA (no `torch.compile`, nothing to build ahead of time).

Why: without compiling, the generator spends most of its GPU time outside the convolutions. On an H200 at 256,
float16 (bench/results/2026-11-26-h200/call1-profile.log) convolutions took 37 % of it; the rest went to passes
over full-size tensors that PyTorch runs one op at a time: conv bias adds (15.5 %), the two multiply-adds of each
SPADE (10 %), activations, statistics. Each pass reads and writes the whole tensor. These kernels do the same
arithmetic in one pass each:

- `bias_act_(y, bias, residual, slope)`: y ← act(y + bias + residual), in place, for a convolution run without its
  bias (ReLU after conv + folded BatchNorm; the SPADE block's second conv and its shortcut sum).
- `spade_modulate(x, gain_shift, mean, rstd, bias, slope)`: act(IN(x) · (γ + b_γ) + β + b_β), where γ and β are
  the two halves of one convolution's output: four passes (two bias adds, normalise, modulate) and the
  activation become one.

Both work on tensors whose channels are innermost and dense (channels-last, as the stage keeps every activation on
CUDA), seen as [pixels, channels]. They compute in float32 and round once, so in half precision they are a little
closer to float32 than PyTorch's sequence, which rounds after every op. `enabled(t)` says whether a tensor takes
them: a CUDA tensor in that layout, Triton importable (it ships with PyTorch's CUDA builds), `ENABLED` on, and not
while `torch.compile` / `torch.export` traces the model (TorchInductor fuses the plain ops itself). Otherwise the
callers run the same arithmetic as PyTorch ops (`bias_act_reference`, `spade_modulate_reference`), which is also
what the CPU runs. Kernels are compiled on first use (about a second each, then cached on disk by Triton) and
are recorded into the stage's CUDA graphs like any other launch. On the CPU, tests run them through Triton's
interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import os

import torch

#: Use the kernels where a tensor takes them (see `enabled`). DHB_TRITON_KERNELS=0 turns them off (to compare).
ENABLED = os.environ.get("DHB_TRITON_KERNELS", "1") != "0"

#: How many times each kernel was launched in this process (tests check that the fast path really ran), and how
#: many calls on CUDA fell back to the PyTorch ops, by reason (benches print both).
LAUNCHES = {"bias_act": 0, "spade_modulate": 0}
FALLBACKS: dict[str, int] = {}

try:  # PyTorch's CUDA builds ship Triton; its CPU builds do not
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None
    tl = None

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def available() -> bool:
    """Triton is importable and kernels are on."""
    return ENABLED and triton is not None


def channels_innermost(t: torch.Tensor) -> bool:
    """Whether `t` [N, C, *spatial] is dense with its channels innermost (channels-last), so [pixels, C] views it."""
    if t.dim() < 3:
        return False
    return t.movedim(1, -1).is_contiguous()


def enabled(*tensors: torch.Tensor | None) -> bool:
    """Whether the kernels run for these tensors (all channels-last, all on CUDA, or on the CPU under Triton's
    interpreter), not while compiling. A CUDA call that falls back is counted in FALLBACKS."""
    present = [t for t in tensors if t is not None]
    if not all(may_run(t) for t in present):
        return False
    if all(channels_innermost(t) for t in present):
        return True
    _fell_back("layout " + " ".join("last" if channels_innermost(t) else str(tuple(t.stride())) for t in present))
    return False


def may_run(t: torch.Tensor) -> bool:
    """Whether kernels may run on t's device now (before its layout is known: a convolution's output is
    channels-last where its weights are, whatever its input's layout)."""
    return available() and (t.is_cuda or _INTERPRET) and not torch.compiler.is_compiling()


def _fell_back(reason: str) -> None:
    FALLBACKS[reason] = FALLBACKS.get(reason, 0) + 1


def report() -> str:
    """One line: kernel launches and fallbacks so far in this process."""
    falls = ", ".join(f"{n}× {why}" for why, n in sorted(FALLBACKS.items())) or "none"
    return f"Triton kernel launches {LAUNCHES}; fell back to PyTorch ops: {falls}"


def _blocks(channels: int) -> tuple[int, int]:
    """(pixels, channels) per program: the whole channel row where it fits, about 4096 elements per program."""
    block_c = min(triton.next_power_of_2(channels), 256)
    return max(4096 // block_c, 1), block_c


if triton is not None:

    @triton.jit
    def _bias_act_kernel(
        y_ptr, bias_ptr, res_ptr, pixels, channels, slope,
        HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        inside = (p[:, None] < pixels) & (c[None, :] < channels)
        offset = p[:, None].to(tl.int64) * channels + c[None, :]
        v = tl.load(y_ptr + offset, mask=inside, other=0.0).to(tl.float32)
        if HAS_BIAS:
            v += tl.load(bias_ptr + c, mask=c < channels, other=0.0).to(tl.float32)[None, :]
        if HAS_RES:
            v += tl.load(res_ptr + offset, mask=inside, other=0.0).to(tl.float32)
        if ACT:
            v = tl.where(v >= 0, v, v * slope)
        tl.store(y_ptr + offset, v.to(y_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _spade_kernel(
        x_ptr, gs_ptr, mean_ptr, rstd_ptr, bias_ptr, out_ptr, hw, channels, slope,
        HAS_BIAS: tl.constexpr, ACT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        # Programs never straddle two samples: axis 0 counts (sample, block of that sample's pixels).
        blocks_per_sample = tl.cdiv(hw, BLOCK_P)
        sample = tl.program_id(0) // blocks_per_sample
        q = (tl.program_id(0) % blocks_per_sample) * BLOCK_P + tl.arange(0, BLOCK_P)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        in_c = c < channels
        inside = (q[:, None] < hw) & in_c[None, :]
        pixel = sample.to(tl.int64) * hw + q[:, None].to(tl.int64)
        x = tl.load(x_ptr + pixel * channels + c[None, :], mask=inside, other=0.0).to(tl.float32)
        gain = tl.load(gs_ptr + pixel * (2 * channels) + c[None, :], mask=inside, other=0.0).to(tl.float32)
        shift = tl.load(gs_ptr + pixel * (2 * channels) + channels + c[None, :], mask=inside, other=0.0)
        shift = shift.to(tl.float32)
        if HAS_BIAS:
            gain += tl.load(bias_ptr + c, mask=in_c, other=0.0).to(tl.float32)[None, :]
            shift += tl.load(bias_ptr + channels + c, mask=in_c, other=0.0).to(tl.float32)[None, :]
        mean = tl.load(mean_ptr + sample * channels + c, mask=in_c, other=0.0)[None, :]
        rstd = tl.load(rstd_ptr + sample * channels + c, mask=in_c, other=0.0)[None, :]
        v = (x - mean) * rstd * gain + shift
        if ACT:
            v = tl.where(v >= 0, v, v * slope)
        tl.store(out_ptr + pixel * channels + c[None, :], v.to(out_ptr.dtype.element_ty), mask=inside)


def act_(v: torch.Tensor, slope: float | None) -> torch.Tensor:
    """LeakyReLU(slope) in place (0: ReLU); v itself when slope is None."""
    if slope is None:
        return v
    return torch.relu_(v) if slope == 0 else torch.nn.functional.leaky_relu_(v, slope)


def bias_act_reference(
    y: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None = None, slope: float | None = None
) -> torch.Tensor:
    """`bias_act_` as PyTorch ops, in place on y (each op rounds to y's dtype)."""
    if bias is not None:
        y.add_(bias.to(y.dtype).view(1, -1, *([1] * (y.dim() - 2))))
    if residual is not None:
        y.add_(residual.to(y.dtype))
    return act_(y, slope)


def bias_act_(
    y: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None = None, slope: float | None = None
) -> torch.Tensor:
    """y ← act(y + bias[c] + residual) in place; act is LeakyReLU(slope) (0: ReLU), none when slope is None. The
    residual (y's shape) may have another dtype."""
    if residual is not None and residual.shape != y.shape:
        if y.is_cuda:
            _fell_back(f"residual {tuple(residual.shape)} for {tuple(y.shape)}")
        return bias_act_reference(y, bias, residual, slope)
    if not enabled(y, residual):
        return bias_act_reference(y, bias, residual, slope)
    if bias is not None and bias.dtype != y.dtype:  # as autocast would round it for the convolution
        bias = bias.to(y.dtype)
    channels = y.shape[1]
    pixels = y.numel() // channels
    block_p, block_c = _blocks(channels)
    grid = (triton.cdiv(pixels, block_p), triton.cdiv(channels, block_c))
    _bias_act_kernel[grid](
        y, bias if bias is not None else y, residual if residual is not None else y, pixels, channels,
        0.0 if slope is None else float(slope),
        HAS_BIAS=bias is not None, HAS_RES=residual is not None, ACT=slope is not None,
        BLOCK_P=block_p, BLOCK_C=block_c,
    )  # fmt: skip
    LAUNCHES["bias_act"] += 1
    return y


def instance_stats(x: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel mean and 1/√(var + eps) of x [N, C, H, W] over (H, W), float32, [N, C, 1, 1]
    (biased variance, as instance norm)."""
    var, mean = torch.var_mean(x, dim=(2, 3), keepdim=True, correction=0)
    return mean.float(), torch.rsqrt(var.float() + eps)


def modulated_instance_norm(
    x: torch.Tensor,
    gain: torch.Tensor,
    shift: torch.Tensor,
    eps: float = 1e-5,
    out: torch.Tensor | None = None,
    stats: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """instance_norm(x) · gain + shift in three passes over x that keep its memory layout.

    `F.instance_norm` copies a channels-last input to NCHW (and SPADE's float32 round trip added two more copies);
    the elementwise products that follow then mix layouts, which runs CUDA's slow strided kernels. Here the
    statistics come from one reduction over (H, W) (float accumulation on CUDA also for half inputs), the
    normalisation is one multiply-add with per-channel factors, the modulation another: every full-size tensor
    keeps x's layout. Same value as instance_norm in real arithmetic (biased variance, eps inside the root).
    `out`: where to write the result (it may be `shift` itself: SPADE saves a full-size tensor that way; by default
    over the normalised temporary). `stats`: x's (mean, rstd) from `instance_stats`, where already computed.
    """
    mean, rstd = stats if stats is not None else instance_stats(x, eps)
    normalized = torch.addcmul((-mean * rstd).to(x.dtype), x, rstd.to(x.dtype))
    return torch.addcmul(shift, normalized, gain, out=normalized if out is None else out)


def spade_modulate_reference(
    x: torch.Tensor,
    gain_shift: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    bias: torch.Tensor | None = None,
    slope: float | None = None,
) -> torch.Tensor:
    """`spade_modulate` as PyTorch ops (three passes that keep x's memory layout; each rounds to x's dtype)."""
    channels = x.shape[1]
    if bias is not None:
        gain_shift = gain_shift + bias.to(gain_shift.dtype).view(1, -1, 1, 1)
    gain, shift = gain_shift[:, :channels].to(x.dtype), gain_shift[:, channels:].to(x.dtype)
    return act_(modulated_instance_norm(x, gain, shift, stats=(mean, rstd)), slope)


def spade_modulate(
    x: torch.Tensor,
    gain_shift: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    bias: torch.Tensor | None = None,
    slope: float | None = None,
) -> torch.Tensor:
    """act((x − mean) · rstd · (γ + b_γ) + β + b_β) as a new tensor in x's layout and dtype.

    x [N, C, H, W]; gain_shift [N, 2C, H, W]: γ then β (one convolution's output, without its bias; its dtype may
    differ from x's); mean, rstd [N, C, 1, 1] float32 (`instance_stats`); bias [2C] or None; slope: LeakyReLU's
    (None: no activation)."""
    if not enabled(x, gain_shift):
        return spade_modulate_reference(x, gain_shift, mean, rstd, bias, slope)
    if bias is not None and bias.dtype != gain_shift.dtype:  # as autocast would round it for the convolution
        bias = bias.to(gain_shift.dtype)
    n, channels, h, w = x.shape
    out = torch.empty_like(x)  # keeps x's layout (channels-last)
    block_p, block_c = _blocks(channels)
    grid = (n * triton.cdiv(h * w, block_p), triton.cdiv(channels, block_c))
    _spade_kernel[grid](
        x, gain_shift, mean.contiguous(), rstd.contiguous(), bias if bias is not None else x, out, h * w, channels,
        0.0 if slope is None else float(slope),
        HAS_BIAS=bias is not None, ACT=slope is not None, BLOCK_P=block_p, BLOCK_C=block_c,
    )  # fmt: skip
    LAUNCHES["spade_modulate"] += 1
    return out
