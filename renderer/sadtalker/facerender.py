"""SadTalker's face renderer (face-vid2vid style), written from the clean-room SPEC §6–§7.

Three networks turn a source portrait and per-frame 3DMM coefficients into frames:

* `KPDetector` — 15 canonical 3-D keypoints of the source, once per video (§7.2);
* `MappingNet` — a 27-frame coefficient window → head pose bins, translation and keypoint deltas (§7.3);
* `OcclusionAwareSPADEGenerator` — warps the source's 3-D feature volume from source to driving keypoints and
  decodes it with a SPADE decoder (§7.5–§7.8).

Module and parameter names follow the checkpoints' state-dict keys exactly, so `load_state_dict(strict=True)`
takes the official weights unchanged (renderer/sadtalker/weights.py). `fuse_for_inference` then folds every
BatchNorm that directly follows a convolution into it and turns spectral-norm triplets into plain weights; the
checkpoint layout is kept only until then.

Conventions that the trained weights depend on (kept on purpose, SPEC §10): grids built with the
align-corners=True formula but sampled with `align_corners=False`; π = 3.14 in the degree→radian conversion;
only the y translation is used; dense-motion mask values below 1e-3 are zeroed without renormalising;
spectral norm uses the stored u, v (σ = uᵀWv, no power iteration).

The generator is split in two: `encode_source` (the source's feature volume, identical for every frame of a
video, computed once) and `animate` (one batch of frames). Frames are independent of each other, so a batch may
mix frames of several videos (`pipeline.py` does that).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from renderer.sadtalker import kernels
from renderer.sadtalker.fold import fold_pair
from renderer.sadtalker.kernels import modulated_instance_norm
from renderer.sadtalker.transfer import to_host

#: Number of keypoints (face-vid2vid's num_kp).
NUM_KP = 15
#: Head-pose bins of the mapping net: degree = 3·E[bin] − 99.
NUM_BINS = 66
#: Half width of the coefficient window fed to the mapping net ("semantic radius"): 2·13 + 1 = 27 frames.
SEMANTIC_RADIUS = 13
WINDOW = 2 * SEMANTIC_RADIUS + 1
#: Coefficient columns: 64 expression + 3 angles + 3 translations (+ 3 crop params in `full` modes).
EXPRESSION_DIM = 64
CROP_COEFFS = 70
FULL_COEFFS = 73
#: Upstream converts degrees to radians with this value of π (SPEC §7.4, quirk kept: the weights expect it).
PI_APPROX = 3.14
#: Keypoint softmax temperature and heatmap variance of face-vid2vid.
KP_TEMPERATURE = 0.1
KP_VARIANCE = 0.01
#: Dense-motion mask values below this are set to zero after the softmax (no renormalisation).
MASK_FLOOR = 1e-3
#: Feature volume of the generator: 32 channels × 16 depth slices.
FEATURE_CHANNELS = 32
FEATURE_DEPTH = 16

_PREPROCESS_MODES = ("crop", "extcrop", "resize", "full", "extfull")


# ----------------------------------------------------------------------------------------------------------------
# Geometry helpers (SPEC §7.1, §7.4)


def make_coordinate_grid(depth: int, height: int, width: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """d×h×w×3 grid of (x, y, z) in [−1, 1] with exact endpoints (the align-corners=True formula)."""

    def axis(n: int) -> torch.Tensor:
        r = torch.arange(n, device=device, dtype=dtype)
        return 2 * (r / (n - 1)) - 1

    z, y, x = axis(depth), axis(height), axis(width)
    zz = z.view(-1, 1, 1).expand(depth, height, width)
    yy = y.view(1, -1, 1).expand(depth, height, width)
    xx = x.view(1, 1, -1).expand(depth, height, width)
    return torch.stack([xx, yy, zz], dim=-1)


def headpose_pred_to_degree(logits: torch.Tensor) -> torch.Tensor:
    """66 bin logits → degrees: Σ softmax·bin·3 − 99 (range −99…+96)."""
    idx = torch.arange(NUM_BINS, device=logits.device, dtype=logits.dtype)
    prob = F.softmax(logits, dim=1)
    return torch.sum(prob * idx, dim=1) * 3 - 99


def rotation_matrix(yaw: torch.Tensor, pitch: torch.Tensor, roll: torch.Tensor) -> torch.Tensor:
    """Degrees [B] → R = Rx(pitch)·Ry(yaw)·Rz(roll) [B, 3, 3], with π taken as 3.14 like the trained model."""
    yaw = yaw / 180 * PI_APPROX
    pitch = pitch / 180 * PI_APPROX
    roll = roll / 180 * PI_APPROX
    one, zero = torch.ones_like(pitch), torch.zeros_like(pitch)
    rx = torch.stack([one, zero, zero, zero, pitch.cos(), -pitch.sin(), zero, pitch.sin(), pitch.cos()], dim=1)
    ry = torch.stack([yaw.cos(), zero, yaw.sin(), zero, one, zero, -yaw.sin(), zero, yaw.cos()], dim=1)
    rz = torch.stack([roll.cos(), -roll.sin(), zero, roll.sin(), roll.cos(), zero, zero, zero, one], dim=1)
    rx, ry, rz = rx.view(-1, 3, 3), ry.view(-1, 3, 3), rz.view(-1, 3, 3)
    return torch.einsum("bij,bjk,bkm->bim", rx, ry, rz)


@dataclasses.dataclass
class MappingOutput:
    """MappingNet heads for a batch: pose logits [B, 66] ×3, translation [B, 3], keypoint deltas [B, 45]."""

    yaw: torch.Tensor
    pitch: torch.Tensor
    roll: torch.Tensor
    t: torch.Tensor
    exp: torch.Tensor


def transform_keypoints(
    kp_canonical: torch.Tensor,
    he: MappingOutput,
    yaw: torch.Tensor | None = None,
    pitch: torch.Tensor | None = None,
    roll: torch.Tensor | None = None,
) -> torch.Tensor:
    """Canonical keypoints [B, 15, 3] posed by a mapping output (SPEC §7.4).

    `yaw`/`pitch`/`roll` ([B] degrees) replace the predicted angles (free view, driving frames only). Only the y
    translation is used; `he` is not modified (upstream zeroes t's x and z in place).
    """
    yaw = headpose_pred_to_degree(he.yaw) if yaw is None else yaw.to(kp_canonical)
    pitch = headpose_pred_to_degree(he.pitch) if pitch is None else pitch.to(kp_canonical)
    roll = headpose_pred_to_degree(he.roll) if roll is None else roll.to(kp_canonical)
    rot = rotation_matrix(yaw, pitch, roll)
    kp_rotated = torch.einsum("bmp,bkp->bkm", rot, kp_canonical)
    t = torch.zeros_like(he.t)
    t[:, 1] = he.t[:, 1]
    kp_t = kp_rotated + t.unsqueeze(1)
    return kp_t + he.exp.view(he.exp.shape[0], -1, 3)


def kp_to_gaussian(kp: torch.Tensor, spatial_size: tuple[int, int, int], variance: float = KP_VARIANCE) -> torch.Tensor:
    """Gaussian blobs exp(−‖grid − kp‖² / (2·variance)) for keypoints [B, K, 3] → [B, K, d, h, w]."""
    grid = make_coordinate_grid(*spatial_size, device=kp.device, dtype=kp.dtype)
    diff = grid.view(1, 1, *spatial_size, 3) - kp.view(*kp.shape[:2], 1, 1, 1, 3)
    return torch.exp(-0.5 * (diff**2).sum(-1) / variance)


# ----------------------------------------------------------------------------------------------------------------
# Building blocks (SPEC §7.1). Each block with a conv directly followed by BatchNorm can fold the norm (`fuse`).

#: Run each convolution that a ReLU follows as one cuDNN call (`torch.cudnn_convolution_relu`: convolution, bias
#: and ReLU fused) on CUDA in half precision, instead of a bias-free cuDNN convolution and one Triton pass for the
#: bias and the ReLU (`kernels.bias_act_`; without Triton, PyTorch's two more passes). Off: not yet measured on a
#: GPU (`bash bench/gpu_check.sh cudnnrelu`); the fused kernel also rounds once where PyTorch's ops round twice.
FUSED_CONV_RELU = False


def conv_relu(
    conv: nn.Conv2d | nn.Conv3d, x: torch.Tensor, norm: nn.Module | None = None, slope: float = 0.0
) -> torch.Tensor:
    """relu(norm(conv(x))) (LeakyReLU where `slope` > 0). With the norm folded away (`fuse`): on CUDA the
    convolution runs without its bias and one Triton pass adds the bias and applies the activation
    (`kernels.bias_act_`), or, with FUSED_CONV_RELU on, one fused cuDNN call. The activation works in place on the
    tensor the convolution (or norm) just made: one full-size tensor fewer, same values."""
    if norm is not None and not isinstance(norm, nn.Identity):
        return kernels.act_(norm(conv(x)), slope)
    if slope == 0.0 and FUSED_CONV_RELU and x.is_cuda and conv.bias is not None and conv.padding_mode == "zeros":
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
        if dtype in (torch.float16, torch.bfloat16):
            weight = conv.weight.to(dtype)
            return torch.cudnn_convolution_relu(
                x.to(dtype), weight, conv.bias.to(dtype), conv.stride, conv.padding, conv.dilation, conv.groups
            )
    if conv.bias is not None and conv.padding_mode == "zeros" and kernels.may_run(x):
        return kernels.bias_act_(conv._conv_forward(x, conv.weight, None), conv.bias, slope=slope)
    return kernels.act_(conv(x), slope)


#: On CUDA, make the nearest upsamplings of the decoder and the dense-motion hourglass by one copy of a broadcast view
#: (`repeat_nearest`) instead of PyTorch's nearest kernel. Off: its speed is not yet measured on a GPU
#: (`bench_sadtalker.py --broadcast-upsample`). The upsampled values are the same (tested on the CPU; on CUDA by the
#: GPU test), but on an H100 the float16 frames were not bit-identical to the default's: 6.5 % of values differed,
#: by at most 2 of 255 levels (cause not yet found). On a CPU PyTorch's kernel is the faster (70 vs 88 ms for
#: [8, 256, 64, 64] × 4 in bfloat16 on this project's 2-core machine).
BROADCAST_UPSAMPLE = False


def upsample_nearest(x: torch.Tensor, factors: Sequence[int]) -> torch.Tensor:
    """Nearest upsampling of the spatial dims by whole `factors` (see BROADCAST_UPSAMPLE)."""
    if BROADCAST_UPSAMPLE and x.is_cuda:
        return repeat_nearest(x, factors)
    return F.interpolate(x, scale_factor=tuple(float(f) for f in factors), mode="nearest")


def repeat_nearest(x: torch.Tensor, factors: Sequence[int]) -> torch.Tensor:
    """The values of `F.interpolate(mode="nearest")` by whole `factors`, made by one copy of a broadcast view, in
    x's memory layout (channels-last stays channels-last).

    Why: CUDA's channels-last nearest kernel took 584 µs per decoder upsampling at batch 8 on an H200, 5.8 % of the
    render's GPU time (bench/results/2026-11-26-h200/call1-profile.log): about 0.4 of the GPU's 4.8 TB/s."""
    spatial = x.dim() - 2
    if len(factors) != spatial or any(f < 1 for f in factors):
        raise ValueError(f"need {spatial} whole factors ≥ 1, got {tuple(factors)}")
    last = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    channels_last = last is not None and not x.is_contiguous() and x.is_contiguous(memory_format=last)
    view = x.movedim(1, -1) if channels_last else x  # channels-last: [B, *spatial, C] is the contiguous order
    first = 1 if channels_last else 2
    factor_of = {first + i: f for i, f in enumerate(factors)}
    # Each spatial dim n gets a broadcast dim of its factor f right after it: [.., n, f, ..] → [.., n·f, ..].
    ones, broadcast, merged = [], [], []
    for dim, n in enumerate(view.shape):
        f = factor_of.get(dim)
        ones += [n] if f is None else [n, 1]
        broadcast += [n] if f is None else [n, f]
        merged.append(n if f is None else n * f)
    out = view.reshape(ones).expand(broadcast).reshape(merged)
    return out.movedim(-1, 1) if channels_last else out


class SameBlock2d(nn.Module):
    """Conv2d (k, same padding) → BatchNorm → ReLU or LeakyReLU(0.01)."""

    def __init__(self, in_features: int, out_features: int, kernel_size: int = 3, lrelu: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_features, out_features, kernel_size, padding=kernel_size // 2)
        self.norm: nn.Module = nn.BatchNorm2d(out_features)
        self.lrelu = lrelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv_relu(self.conv, x, self.norm, slope=0.01 if self.lrelu else 0.0)

    def fuse(self) -> None:
        fold_pair(self, "conv", "norm")


class DownBlock2d(nn.Module):
    """Conv2d 3×3 → BatchNorm → ReLU → AvgPool 2×2."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_features, out_features, 3, padding=1)
        self.norm: nn.Module = nn.BatchNorm2d(out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(conv_relu(self.conv, x, self.norm), 2)

    def fuse(self) -> None:
        fold_pair(self, "conv", "norm")


class DownBlock3d(nn.Module):
    """Conv3d 3³ → BatchNorm3d → ReLU → AvgPool (1, 2, 2) (depth untouched)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_features, out_features, 3, padding=1)
        self.norm: nn.Module = nn.BatchNorm3d(out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool3d(conv_relu(self.conv, x, self.norm), (1, 2, 2))

    def fuse(self) -> None:
        fold_pair(self, "conv", "norm")


class UpBlock3d(nn.Module):
    """Nearest upsampling ×(1, 2, 2) → Conv3d 3³ → BatchNorm3d → ReLU."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_features, out_features, 3, padding=1)
        self.norm: nn.Module = nn.BatchNorm3d(out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv_relu(self.conv, upsample_nearest(x, (1, 2, 2)), self.norm)

    def fuse(self) -> None:
        fold_pair(self, "conv", "norm")


class ResBlock3d(nn.Module):
    """Pre-activation residual block: BN → ReLU → Conv3d → BN → ReLU → Conv3d, plus identity.

    Only `norm2` follows a convolution (`conv1`), so only it can be folded; `norm1` stays a per-channel affine.
    """

    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(features, features, 3, padding=1)
        self.conv2 = nn.Conv3d(features, features, 3, padding=1)
        self.norm1 = nn.BatchNorm3d(features)
        self.norm2: nn.Module = nn.BatchNorm3d(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = conv_relu(self.conv1, F.relu(self.norm1(x)), self.norm2)
        out = self.conv2(out)
        return out + x

    def fuse(self) -> None:
        fold_pair(self, "conv1", "norm2")


class SNConv2d(nn.Module):
    """Conv2d whose checkpoint stores spectral-norm triplets (weight_orig, weight_u, weight_v).

    Effective weight = weight_orig / σ with σ = uᵀ(W v) from the stored u, v (no power iteration, as in eval).
    `fuse` computes it once and drops the triplet.
    """

    #: Tensors that only feed autocast-cast convolutions (`weights.cast_for_autocast`; `weight` once fused).
    AUTOCAST_TENSORS = ("weight", "bias")

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int = 0, bias: bool = True):
        super().__init__()
        self.padding = padding
        self.weight_orig = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.register_buffer("weight_u", torch.empty(out_channels))
        self.register_buffer("weight_v", torch.empty(in_channels * kernel_size * kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.weight: torch.Tensor | None = None

    def normalized_weight(self) -> torch.Tensor:
        w = self.weight_orig
        sigma = torch.dot(self.weight_u, torch.mv(w.reshape(w.shape[0], -1), self.weight_v))
        return w / sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight if self.weight is not None else self.normalized_weight()
        return F.conv2d(x, weight, self.bias, padding=self.padding)

    def plus(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """conv(x) + residual; on CUDA the bias and the residual are added in one Triton pass (`kernels.bias_act_`)
        instead of two."""
        if self.weight is not None and kernels.may_run(x):
            return kernels.bias_act_(F.conv2d(x, self.weight, None, padding=self.padding), self.bias, residual)
        # In-place sum on the tensor the convolution just made: fewer allocations, same values.
        out = self.forward(x)
        return out.add_(residual.to(out.dtype))

    def fuse(self) -> None:
        weight = self.normalized_weight().detach()
        del self.weight_orig, self.weight_u, self.weight_v
        self.weight = nn.Parameter(weight, requires_grad=False)


# ----------------------------------------------------------------------------------------------------------------
# KPDetector (SPEC §7.2)


class AntiAliasDownsample(nn.Module):
    """Depthwise Gaussian blur (13×13, σ 1.5, stored as buffer `weight`) then every 4th pixel."""

    AUTOCAST_TENSORS = ("weight",)

    def __init__(self, channels: int = 3, scale: float = 0.25) -> None:
        super().__init__()
        sigma = (1 / scale - 1) / 2
        kernel_size = 2 * round(sigma * 4) + 1
        self.stride = int(1 / scale)
        self.pad = kernel_size // 2
        self.register_buffer("weight", torch.zeros(channels, 1, kernel_size, kernel_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (self.pad, self.pad, self.pad, self.pad))
        # A stride-4 convolution equals "convolve, then keep every 4th pixel from 0", at 1/16 of the cost.
        return F.conv2d(x, self.weight, groups=x.shape[1], stride=self.stride)


class KPHourglass(nn.Module):
    """2-D encoder (5 DownBlock2d) → 1×1 conv to 16384 = 1024×16 → 3-D decoder (5 UpBlock3d), no skips."""

    def __init__(self, block_expansion: int = 32, in_features: int = 3, max_features: int = 1024, num_blocks: int = 5):
        super().__init__()
        self.reshape_depth = FEATURE_DEPTH
        self.down_blocks = nn.Sequential()
        for i in range(num_blocks):
            cin = in_features if i == 0 else min(max_features, block_expansion * 2**i)
            cout = min(max_features, block_expansion * 2 ** (i + 1))
            self.down_blocks.add_module(f"down{i}", DownBlock2d(cin, cout))
        cout = min(max_features, block_expansion * 2**num_blocks)
        self.conv = nn.Conv2d(cout, 16384, 1)
        self.up_blocks = nn.Sequential()
        for i in range(num_blocks):
            cin = min(max_features, block_expansion * 2 ** (num_blocks - i))
            cout = min(max_features, block_expansion * 2 ** (num_blocks - i - 1))
            self.up_blocks.add_module(f"up{i}", UpBlock3d(cin, cout))
        self.out_filters = block_expansion

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(self.down_blocks(x))
        b, c, h, w = out.shape
        out = out.view(b, c // self.reshape_depth, self.reshape_depth, h, w)
        return self.up_blocks(out)


class KPDetector(nn.Module):
    """Source image [B, 3, S, S] in [0, 1] → 15 canonical keypoints [B, 15, 3] (x, y, z) in [−1, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.predictor = KPHourglass()
        self.kp = nn.Conv3d(self.predictor.out_filters, NUM_KP, 3, padding=1)
        self.down = AntiAliasDownsample(3, 0.25)

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        """Raw keypoint maps [B, 15, 16, S/4, S/4] (before the temperature softmax)."""
        return self.kp(self.predictor(self.down(image)))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits = self.logits(image)
        b, k, d, h, w = logits.shape
        heat = F.softmax(logits.reshape(b, k, -1).float() / KP_TEMPERATURE, dim=2)
        grid = make_coordinate_grid(d, h, w, device=heat.device, dtype=heat.dtype).view(1, 1, -1, 3)
        return (heat.unsqueeze(-1) * grid).sum(dim=2)


# ----------------------------------------------------------------------------------------------------------------
# MappingNet (SPEC §7.3)


class MappingNet(nn.Module):
    """Coefficient window [B, C, 27] (C = 70 or 73) → pose bins, translation and keypoint deltas."""

    def __init__(self, coeff_nc: int = CROP_COEFFS, descriptor_nc: int = 1024, layers: int = 3) -> None:
        super().__init__()
        self.coeff_nc = coeff_nc
        self.layers = layers
        self.first = nn.Sequential(nn.Conv1d(coeff_nc, descriptor_nc, kernel_size=7, bias=True))
        for i in range(layers):
            block = nn.Sequential(nn.LeakyReLU(0.1), nn.Conv1d(descriptor_nc, descriptor_nc, 3, dilation=3))
            self.add_module(f"encoder{i}", block)
        self.fc_roll = nn.Linear(descriptor_nc, NUM_BINS)
        self.fc_pitch = nn.Linear(descriptor_nc, NUM_BINS)
        self.fc_yaw = nn.Linear(descriptor_nc, NUM_BINS)
        self.fc_t = nn.Linear(descriptor_nc, 3)
        self.fc_exp = nn.Linear(descriptor_nc, 3 * NUM_KP)

    def forward(self, x: torch.Tensor) -> MappingOutput:
        out = self.first(x)
        for i in range(self.layers):
            out = getattr(self, f"encoder{i}")(out) + out[:, :, 3:-3]
        out = out.mean(dim=2)
        return MappingOutput(
            yaw=self.fc_yaw(out),
            pitch=self.fc_pitch(out),
            roll=self.fc_roll(out),
            t=self.fc_t(out),
            exp=self.fc_exp(out),
        )


# ----------------------------------------------------------------------------------------------------------------
# Dense motion (SPEC §7.6)


class HourglassEncoder(nn.Module):
    def __init__(self, block_expansion: int, in_features: int, num_blocks: int, max_features: int) -> None:
        super().__init__()
        self.down_blocks = nn.ModuleList(
            DownBlock3d(
                in_features if i == 0 else min(max_features, block_expansion * 2**i),
                min(max_features, block_expansion * 2 ** (i + 1)),
            )
            for i in range(num_blocks)
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = [x]
        for block in self.down_blocks:
            outs.append(block(outs[-1]))
        return outs


class HourglassDecoder(nn.Module):
    def __init__(self, block_expansion: int, in_features: int, num_blocks: int, max_features: int) -> None:
        super().__init__()
        blocks = []
        for i in reversed(range(num_blocks)):
            cin = (1 if i == num_blocks - 1 else 2) * min(max_features, block_expansion * 2 ** (i + 1))
            blocks.append(UpBlock3d(cin, min(max_features, block_expansion * 2**i)))
        self.up_blocks = nn.ModuleList(blocks)
        self.out_filters = block_expansion + in_features
        self.conv = nn.Conv3d(self.out_filters, self.out_filters, 3, padding=1)
        self.norm: nn.Module = nn.BatchNorm3d(self.out_filters)

    def forward(self, outs: list[torch.Tensor]) -> torch.Tensor:
        out = outs.pop()
        for block in self.up_blocks:
            out = torch.cat([block(out), outs.pop()], dim=1)
        return conv_relu(self.conv, out, self.norm)

    def fuse(self) -> None:
        fold_pair(self, "conv", "norm")


class Hourglass(nn.Module):
    """3-D U-Net (5 levels, depth kept) with skip concatenations."""

    def __init__(self, block_expansion: int, in_features: int, num_blocks: int = 5, max_features: int = 1024):
        super().__init__()
        self.encoder = HourglassEncoder(block_expansion, in_features, num_blocks, max_features)
        self.decoder = HourglassDecoder(block_expansion, in_features, num_blocks, max_features)
        self.out_filters = self.decoder.out_filters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class MotionHeads(nn.Module):
    """Dense motion's two heads as one 2-D convolution (made by `DenseMotionNetwork.fuse`; same values).

    The heads are a 7³ Conv3d (hourglass output → 16 mask logits) and a 7×7 Conv2d over the hourglass output with
    its depth stacked into channels (→ 1 occlusion logit). cuDNN runs both with slow generic kernels (16 and 1
    output channels). Both are sums of 7×7 2-D convolutions of single depth slices, so one Conv2d over the depth
    slices as a batch ([B·D, C, H, W]: a free view of a channels-last-3d tensor) computes every partial product at
    once, with 7·16 + 16 = 128 output channels, a shape tensor cores run well:

    * channel i·16 + k: depth tap i of mask kernel k; mask[d] = bias + Σ_i y[d + i − 3, tap i] (zero outside);
    * channel 112 + d': the occlusion kernel's part for depth slice d'; occlusion = bias + Σ_d y[d, 112 + d].

    The partial sums are added in float32. Arithmetic is the same as the two convolutions up to summation order.
    """

    AUTOCAST_TENSORS = ("weight",)  # the biases are added in float32

    def __init__(self, mask: nn.Conv3d, occlusion: nn.Conv2d) -> None:
        super().__init__()
        kernels, channels, taps, kh, kw = mask.weight.shape
        if (kh, kw) != tuple(occlusion.weight.shape[-2:]) or mask.padding[1:] != occlusion.padding:
            raise ValueError("mask and occlusion heads need the same spatial kernel and padding")
        depth = occlusion.in_channels // channels
        mask_taps = mask.weight.detach().permute(2, 0, 1, 3, 4).reshape(taps * kernels, channels, kh, kw)
        occlusion_slices = occlusion.weight.detach().view(channels, depth, kh, kw).transpose(0, 1)
        weight = torch.cat([mask_taps, occlusion_slices]).contiguous()
        if mask.weight.is_contiguous(memory_format=torch.channels_last_3d):
            weight = weight.contiguous(memory_format=torch.channels_last)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.mask_bias = nn.Parameter(mask.bias.detach().clone(), requires_grad=False)
        self.occlusion_bias = nn.Parameter(occlusion.bias.detach().clone(), requires_grad=False)
        self.kernels, self.taps, self.depth, self.padding = kernels, taps, depth, occlusion.padding

    def forward(self, prediction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hourglass output [B, C, D, H, W] → float32 mask logits [B, 16, D, H, W] and occlusion logits
        [B, 1, H, W]."""
        b, c, d, h, w = prediction.shape
        if d != self.depth:
            raise ValueError(f"motion heads were built for depth {self.depth}, got {d}")
        slices = prediction.transpose(1, 2).reshape(b * d, c, h, w)
        y = F.conv2d(slices, self.weight, padding=self.padding).view(b, d, -1, h, w)
        k, taps, centre = self.kernels, self.taps, self.taps // 2
        parts = y[:, :, : taps * k].view(b, d, taps, k, h, w)
        mask = parts[:, :, centre].float() + self.mask_bias.float().view(1, 1, k, 1, 1)
        for tap in range(taps):
            shift = tap - centre
            if tap == centre or abs(shift) >= d:
                continue
            lo, hi = max(0, -shift), d - max(0, shift)
            mask[:, lo:hi] += parts[:, lo + shift : hi + shift, tap]
        occlusion = torch.diagonal(y[:, :, taps * k :], dim1=1, dim2=2).float().sum(-1)
        occlusion = occlusion + self.occlusion_bias.float()
        return mask.transpose(1, 2), occlusion.unsqueeze(1)


@dataclasses.dataclass
class DenseMotion:
    """Dense motion of a batch: deformation [B, d, h, w, 3], occlusion [B, 1, h, w], softmax mask [B, 16, d, h, w]."""

    deformation: torch.Tensor
    occlusion_map: torch.Tensor
    mask: torch.Tensor | None = None


class DenseMotionNetwork(nn.Module):
    """Source features + keypoints → per-voxel mixture of 16 keypoint translations and an occlusion map."""

    def __init__(self, block_expansion: int = 32, num_blocks: int = 5, max_features: int = 1024, compress: int = 4):
        super().__init__()
        in_features = (NUM_KP + 1) * (compress + 1)
        self.hourglass = Hourglass(block_expansion, in_features, num_blocks, max_features)
        self.mask = nn.Conv3d(self.hourglass.out_filters, NUM_KP + 1, 7, padding=3)
        self.compress = nn.Conv3d(FEATURE_CHANNELS, compress, 1)
        self.norm: nn.Module = nn.BatchNorm3d(compress)
        self.occlusion = nn.Conv2d(self.hourglass.out_filters * FEATURE_DEPTH, 1, 7, padding=3)
        self.heads: MotionHeads | None = None

    def fuse(self) -> None:
        fold_pair(self, "compress", "norm")
        self.heads = MotionHeads(self.mask, self.occlusion)
        del self.mask, self.occlusion

    def forward(
        self, feature: torch.Tensor, kp_driving: torch.Tensor, kp_source: torch.Tensor, keep_mask: bool = False
    ) -> DenseMotion:
        bs, _, d, h, w = feature.shape
        k1 = NUM_KP + 1
        # Geometry (grids, warps, heatmaps, the mask mixture) runs in float32 even under autocast: it is cheap, and
        # half-precision coordinates would shift every sample; only the convolutions use the autocast dtype.
        feature = conv_relu(self.compress, feature, self.norm).float()
        kp_driving, kp_source = kp_driving.float(), kp_source.float()
        # Sparse motions [B, 16, d, h, w, 3]: identity (background), then grid − kp_driving + kp_source.
        grid = make_coordinate_grid(d, h, w, device=feature.device).view(1, 1, d, h, w, 3)
        moved = grid - kp_driving.view(bs, NUM_KP, 1, 1, 1, 3)
        moved = moved + kp_source.view(bs, NUM_KP, 1, 1, 1, 3)
        sparse_motion = torch.cat([grid.expand(bs, 1, d, h, w, 3), moved], dim=1)
        # Source features warped by each sparse motion [B, 16, 4, d, h, w].
        compressed = feature.unsqueeze(1).expand(bs, k1, -1, d, h, w).reshape(bs * k1, -1, d, h, w)
        deformed = F.grid_sample(compressed, sparse_motion.reshape(bs * k1, d, h, w, 3), align_corners=False)
        deformed = deformed.view(bs, k1, -1, d, h, w)
        # Keypoint heatmaps [B, 16, 1, d, h, w]: driving − source gaussians, zero for the background.
        heat = kp_to_gaussian(kp_driving, (d, h, w)) - kp_to_gaussian(kp_source, (d, h, w))
        heat = torch.cat([torch.zeros_like(heat[:, :1]), heat], dim=1).unsqueeze(2)
        x = torch.cat([heat, deformed], dim=2).view(bs, -1, d, h, w)
        prediction = self.hourglass(x)
        if self.heads is not None:
            mask_logits, occlusion_logits = self.heads(prediction)
        else:
            mask_logits = self.mask(prediction).float()
            occlusion_logits = self.occlusion(prediction.reshape(bs, -1, h, w)).float()
        mask = F.softmax(mask_logits, dim=1)
        kept = torch.where(mask < MASK_FLOOR, torch.zeros_like(mask), mask)
        deformation = (kept.unsqueeze(-1) * sparse_motion).sum(dim=1)
        occlusion = torch.sigmoid(occlusion_logits)
        return DenseMotion(deformation, occlusion, mask if keep_mask else None)


# ----------------------------------------------------------------------------------------------------------------
# SPADE decoder (SPEC §7.7)


class SPADE(nn.Module):
    """Instance norm (per-sample statistics) modulated by γ, β predicted from the conditioning map:
    IN(x) · (1 + γ) + β, optionally followed by LeakyReLU (`slope`, the block's activation).

    `fuse` folds the 1 into γ's bias and makes γ's and β's convolutions one (`gamma_beta`: weights stacked, 2C
    outputs): one larger GEMM instead of two, and on CUDA one Triton pass (`kernels.spade_modulate`) adds both
    biases, normalises, modulates and activates, where PyTorch's ops take five passes over full-size tensors."""

    def __init__(self, norm_nc: int, label_nc: int = 256, hidden: int = 128) -> None:
        super().__init__()
        self.mlp_shared = nn.Sequential(nn.Conv2d(label_nc, hidden, 3, padding=1), nn.ReLU(inplace=True))
        self.mlp_gamma = nn.Conv2d(hidden, norm_nc, 3, padding=1)
        self.mlp_beta = nn.Conv2d(hidden, norm_nc, 3, padding=1)
        self.gain_offset = 1.0
        self.gamma_beta: nn.Conv2d | None = None

    def forward(
        self,
        x: torch.Tensor,
        seg: torch.Tensor,
        stats: tuple[torch.Tensor, torch.Tensor] | None = None,
        slope: float | None = None,
    ) -> torch.Tensor:
        """`stats`: x's instance statistics (`kernels.instance_stats`) where the caller shares them between two
        SPADEs of the same x."""
        if seg.shape[-2:] != x.shape[-2:]:
            seg = F.interpolate(seg, size=x.shape[-2:], mode="nearest")
        actv = conv_relu(self.mlp_shared[0], seg)  # mlp_shared: Conv2d, ReLU
        if self.gamma_beta is None:
            gain = self.mlp_gamma(actv)
            if self.gain_offset:
                gain = gain + self.gain_offset
            shift = self.mlp_beta(actv).to(x.dtype)
            # Fewer full-size tensors alive at once, the same values: the hidden map goes before the normalisation,
            # and the result is written over `shift` (this block made it). At 512 the renderer's memory peaks here.
            del actv
            return kernels.act_(modulated_instance_norm(x, gain.to(x.dtype), shift, out=shift, stats=stats), slope)
        mean, rstd = stats if stats is not None else kernels.instance_stats(x)
        conv = self.gamma_beta
        # Where the kernel may run, the bias goes into its pass (it falls back to PyTorch's ops by itself).
        bias = conv.bias if kernels.may_run(x) else None
        gain_shift = conv._conv_forward(actv, conv.weight, None) if bias is not None else conv(actv)
        del actv
        return kernels.spade_modulate(x, gain_shift, mean, rstd, bias, slope)

    def fuse(self) -> None:
        gamma, beta = self.mlp_gamma, self.mlp_beta
        conv = nn.Conv2d(gamma.in_channels, 2 * gamma.out_channels, gamma.kernel_size, padding=gamma.padding)
        conv = conv.to(device=gamma.weight.device, dtype=gamma.weight.dtype)
        # New tensors: the loaded ones may be shared with the state dict they came from (assign=True).
        weight = torch.cat([gamma.weight.detach(), beta.weight.detach()])
        bias = torch.cat([gamma.bias.detach() + self.gain_offset, beta.bias.detach()])
        conv.weight = nn.Parameter(weight, requires_grad=False)
        conv.bias = nn.Parameter(bias, requires_grad=False)
        self.gamma_beta = conv
        del self.mlp_gamma, self.mlp_beta
        self.gain_offset = 0.0


class SPADEResnetBlock(nn.Module):
    def __init__(self, fin: int, fout: int) -> None:
        super().__init__()
        fmid = min(fin, fout)
        self.learned_shortcut = fin != fout
        self.conv_0 = SNConv2d(fin, fmid, 3, padding=1)
        self.conv_1 = SNConv2d(fmid, fout, 3, padding=1)
        self.norm_0 = SPADE(fin)
        self.norm_1 = SPADE(fmid)
        if self.learned_shortcut:
            self.conv_s = SNConv2d(fin, fout, 1, bias=False)
            self.norm_s = SPADE(fin)

    def forward(self, x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        # norm_s and norm_0 normalise the same x, so its statistics are computed once.
        stats = kernels.instance_stats(x) if self.learned_shortcut else None
        x_s = self.conv_s(self.norm_s(x, seg, stats)) if self.learned_shortcut else x
        dx = self.conv_0(self.norm_0(x, seg, stats, slope=0.2))
        dx = self.norm_1(dx, seg, slope=0.2)
        return self.conv_1.plus(dx, x_s)

    def fuse(self) -> None:
        # conv_0's output only feeds norm_1, an instance norm, which subtracts every channel's mean: a per-channel
        # constant added before it cancels exactly (in real arithmetic), so conv_0 runs without its bias.
        self.conv_0.bias = None


class SPADEDecoder(nn.Module):
    """fc → 6 SPADE blocks at 64² → ×2 → block → ×2 → block → LeakyReLU → conv → sigmoid (S = 4 × input)."""

    def __init__(self, label_nc: int = 256, channels: int = 512, middle: int = 6) -> None:
        super().__init__()
        self.middle = middle
        self.fc = nn.Conv2d(label_nc, channels, 3, padding=1)
        for i in range(middle):
            self.add_module(f"G_middle_{i}", SPADEResnetBlock(channels, channels))
        self.up_0 = SPADEResnetBlock(channels, channels // 2)
        self.up_1 = SPADEResnetBlock(channels // 2, 64)
        self.conv_img = nn.Conv2d(64, 3, 3, padding=1)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        seg = feature
        x = self.fc(feature)
        for i in range(self.middle):
            x = getattr(self, f"G_middle_{i}")(x, seg)
        # Each up block's three SPADEs need the map at the block's size: resize it once per size, not per SPADE
        # (nearest resizing is a pure copy, so the values are the same).
        x = upsample_nearest(x, (2, 2))
        x = self.up_0(x, upsample_nearest(seg, (2, 2)))
        x = upsample_nearest(x, (2, 2))
        x = self.up_1(x, upsample_nearest(seg, (4, 4)))
        x = self.conv_img(F.leaky_relu(x, 0.2))
        return torch.sigmoid(x)


# ----------------------------------------------------------------------------------------------------------------
# Generator (SPEC §7.5)


@dataclasses.dataclass
class GeneratorOutput:
    """One batch of frames: prediction [B, 3, S, S] in [0, 1], occlusion [B, 1, S/4, S/4], optional details."""

    prediction: torch.Tensor
    occlusion_map: torch.Tensor
    deformation: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    decoder_input: torch.Tensor | None = None


class OcclusionAwareSPADEGenerator(nn.Module):
    """Source image + source/driving keypoints → frame; `encode_source` once per video, `animate` per batch."""

    def __init__(self, block_expansion: int = 64, max_features: int = 512, num_down_blocks: int = 2) -> None:
        super().__init__()
        self.first = SameBlock2d(3, block_expansion, kernel_size=3)
        self.down_blocks = nn.ModuleList(
            DownBlock2d(min(max_features, block_expansion * 2**i), min(max_features, block_expansion * 2 ** (i + 1)))
            for i in range(num_down_blocks)
        )
        cout = min(max_features, block_expansion * 2**num_down_blocks)
        self.second = nn.Conv2d(cout, max_features, 1)
        self.resblocks_3d = nn.Sequential()
        for i in range(6):
            self.resblocks_3d.add_module(f"3dr{i}", ResBlock3d(FEATURE_CHANNELS))
        self.dense_motion_network = DenseMotionNetwork()
        self.third = SameBlock2d(max_features, cout, kernel_size=3, lrelu=True)
        self.fourth = nn.Conv2d(cout, cout, 1)
        self.decoder = SPADEDecoder(label_nc=cout)

    def encode_source(self, source_image: torch.Tensor) -> torch.Tensor:
        """Source image [B, 3, S, S] → feature volume [B, 32, 16, S/4, S/4] (same for every frame of a video)."""
        out = self.first(source_image)
        for block in self.down_blocks:
            out = block(out)
        out = self.second(out)
        b, c, h, w = out.shape
        return self.resblocks_3d(out.view(b, c // FEATURE_DEPTH, FEATURE_DEPTH, h, w))

    def animate(
        self, feature_3d: torch.Tensor, kp_source: torch.Tensor, kp_driving: torch.Tensor, details: bool = False
    ) -> GeneratorOutput:
        """Warp the source feature volume from source to driving keypoints and decode one batch of frames."""
        motion = self.dense_motion_network(feature_3d, kp_driving, kp_source, keep_mask=details)
        out = F.grid_sample(feature_3d.float(), motion.deformation, align_corners=False)
        b, c, d, h, w = out.shape
        out = self.fourth(self.third(out.reshape(b, c * d, h, w)))
        occlusion = motion.occlusion_map
        if occlusion.shape[-2:] != out.shape[-2:]:
            occlusion = F.interpolate(occlusion, size=out.shape[-2:], mode="bilinear")
        out = out * occlusion.to(out.dtype)  # float32 map; `out` may be half under autocast
        prediction = self.decoder(out)
        if not details:
            return GeneratorOutput(prediction, motion.occlusion_map)
        return GeneratorOutput(prediction, motion.occlusion_map, motion.deformation, motion.mask, out)

    def forward(self, source_image: torch.Tensor, kp_source: torch.Tensor, kp_driving: torch.Tensor) -> GeneratorOutput:
        return self.animate(self.encode_source(source_image), kp_source, kp_driving)


def fuse_for_inference(module: nn.Module) -> nn.Module:
    """Fold BatchNorms into the convolutions before them and precompute spectral-norm weights (eval only).

    Exact in real arithmetic; in float32 the outputs move by rounding only (measured on the golden files:
    well inside their tolerances). After this the module no longer has the checkpoint's state-dict layout.
    """
    module.eval()
    for sub in list(module.modules()):
        fuse = getattr(sub, "fuse", None)
        if callable(fuse) and not getattr(sub, "_fused", False):
            fuse()
            sub._fused = True  # a second call must not fold the same statistics twice
    module.requires_grad_(False)
    return module


# ----------------------------------------------------------------------------------------------------------------
# Render preparation (SPEC §6) and the render loop (§7.10)


def mapping_channels(preprocess: str) -> int:
    """Coefficient columns the mapping net takes: 73 for `full`/`extfull` (crop params appended), else 70."""
    if preprocess not in _PREPROCESS_MODES:
        raise ValueError(f"unknown preprocess mode {preprocess!r}; expected one of {', '.join(_PREPROCESS_MODES)}")
    return FULL_COEFFS if "full" in preprocess else CROP_COEFFS


def target_coefficients(
    coeffs_70: np.ndarray,
    source_coeff_73: np.ndarray,
    preprocess: str = "crop",
    expression_scale: float = 1.0,
    still: bool = False,
) -> np.ndarray:
    """Per-frame mapping inputs [N, C] from predicted coefficients [N, 70] (SPEC §6.2).

    Expression columns are scaled (target only); full modes append the source's crop params (cols 70–72);
    `still` copies the source's pose (and crop params) into every frame.
    """
    channels = mapping_channels(preprocess)
    source = np.asarray(source_coeff_73, dtype=np.float32).reshape(-1)
    target = np.array(coeffs_70, dtype=np.float32).reshape(-1, CROP_COEFFS)
    target[:, :EXPRESSION_DIM] = target[:, :EXPRESSION_DIM] * np.float32(expression_scale)
    if channels == FULL_COEFFS:
        target = np.concatenate([target, np.repeat(source[None, CROP_COEFFS:FULL_COEFFS], len(target), 0)], 1)
    if still:
        target[:, EXPRESSION_DIM:] = source[EXPRESSION_DIM:channels]
    return target


def source_window(source_coeff_73: np.ndarray, preprocess: str = "crop") -> np.ndarray:
    """The source's coefficients repeated over the 27-frame window: [C, 27]."""
    source = np.asarray(source_coeff_73, dtype=np.float32).reshape(-1)[: mapping_channels(preprocess)]
    return np.repeat(source[:, None], WINDOW, axis=1)


def window_indices(frame: int, num_frames: int) -> np.ndarray:
    """Frames of the mapping window of `frame`: frame−13 … frame+13 clamped to [0, N−1]."""
    return np.clip(np.arange(frame - SEMANTIC_RADIUS, frame + SEMANTIC_RADIUS + 1), 0, num_frames - 1)


def target_windows(target: np.ndarray, frames: Sequence[int] | np.ndarray) -> np.ndarray:
    """Mapping-net inputs [len(frames), C, 27] for the given frame indices of a target [N, C]."""
    n = len(target)
    idx = np.stack([window_indices(int(f), n) for f in frames])  # [B, 27]
    return np.ascontiguousarray(target[idx].transpose(0, 2, 1))


def camera_pose_sequence(degrees: Sequence[float], num_frames: int) -> np.ndarray:
    """Free-view angles [N] from a list of degrees (SPEC §6.5): one value → constant; several → a linear path.

    Each segment is `np.arange(d_i, d_{i+1}, step)` with step = (P/(N−1))·|Δ|/Δ, P the total path length,
    computed in that order as upstream does: the rounding decides whether arange's float length reaches the
    listed end angle (it does for [-20, 20] over 12 frames). The result is cut to N or padded with its last value.
    Equal consecutive values are a ValueError (upstream divides by zero).
    """
    degrees = [float(d) for d in degrees]
    if not degrees:
        raise ValueError("free-view angle list is empty")
    if len(degrees) == 1 or num_frames < 2:
        return np.full(num_frames, degrees[0], dtype=np.float64)
    if any(a == b for a, b in zip(degrees, degrees[1:], strict=False)):
        raise ValueError(f"free-view angles {degrees} repeat a value back to back; remove the duplicate")
    total = 0.0
    for a, b in zip(degrees, degrees[1:], strict=False):
        total += abs(b - a)
    per_frame = total / (num_frames - 1)
    seq: list[float] = []
    for a, b in zip(degrees, degrees[1:], strict=False):
        seq.extend(np.arange(a, b, per_frame * abs(b - a) / (b - a)).tolist())
    seq = seq[:num_frames]
    seq += [seq[-1]] * (num_frames - len(seq))
    return np.asarray(seq, dtype=np.float64)


def image_to_tensor(image_u8: np.ndarray) -> torch.Tensor:
    """H×W×3 uint8 → [1, 3, H, W] float32 as `u8 · float32(1/255)` (skimage's img_as_float32, which the
    golden data used; it differs from u8/255 by one ulp for about half of the byte values)."""
    x = torch.from_numpy(np.ascontiguousarray(image_u8)).to(torch.float32) * torch.tensor(1 / 255, dtype=torch.float32)
    return x.permute(2, 0, 1).unsqueeze(0).contiguous()


def frames_to_uint8_tensor(frames: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] → [B, H, W, 3] uint8 on the frames' device, round-half-to-even and clipped."""
    x = frames.detach().float().clamp(0, 1).mul(255).round()  # torch.round is half-to-even, like np.rint
    return x.to(torch.uint8).permute(0, 2, 3, 1)


def frames_to_uint8(frames: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [0, 1] → [B, H, W, 3] uint8 on the host (np.rint rounding, clipped)."""
    return to_host(frames_to_uint8_tensor(frames)).numpy()


@dataclasses.dataclass
class SourceState:
    """What every frame of one video shares: feature volume, canonical and source keypoints."""

    feature: torch.Tensor  # [1, 32, 16, S/4, S/4]
    kp_canonical: torch.Tensor  # [1, 15, 3]
    kp_source: torch.Tensor  # [1, 15, 3]


class FaceRenderer(nn.Module):
    """The three renderer networks of one size and preprocess family, with the per-video and per-batch steps."""

    def __init__(self, kp_detector: KPDetector, mapping: MappingNet, generator: OcclusionAwareSPADEGenerator):
        super().__init__()
        self.kp_detector = kp_detector
        self.mapping = mapping
        self.generator = generator

    @property
    def coeff_channels(self) -> int:
        return self.mapping.coeff_nc

    def prepare_source(self, source_image: torch.Tensor, source_semantics: torch.Tensor) -> SourceState:
        """Per-video work, done once: keypoints of the source image [1, 3, S, S] and its feature volume."""
        kp_canonical = self.kp_detector(source_image).float()
        he = self.mapping(source_semantics)
        kp_source = transform_keypoints(kp_canonical, _float(he))
        return SourceState(self.generator.encode_source(source_image), kp_canonical, kp_source)

    def driving_keypoints(
        self,
        kp_canonical: torch.Tensor,
        windows: torch.Tensor,
        yaw: torch.Tensor | None = None,
        pitch: torch.Tensor | None = None,
        roll: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Driving keypoints [B, 15, 3] for coefficient windows [B, C, 27] (free-view angles optional)."""
        return transform_keypoints(kp_canonical.float(), _float(self.mapping(windows)), yaw, pitch, roll)

    def render(
        self, feature: torch.Tensor, kp_source: torch.Tensor, kp_driving: torch.Tensor, details: bool = False
    ) -> GeneratorOutput:
        """One forward batch of frames; rows may belong to different videos."""
        return self.generator.animate(feature, kp_source, kp_driving, details=details)


def _float(he: MappingOutput) -> MappingOutput:
    """Keypoint maths runs in float32 even under autocast: the pose softmax and rotations are cheap and touchy."""
    return MappingOutput(he.yaw.float(), he.pitch.float(), he.roll.float(), he.t.float(), he.exp.float())
