"""Audio → 3DMM motion coefficients (SPEC §5): ExpNet for expression, PoseVAE for head pose, random eye blinks.

The module names and parameter layout follow the checkpoints exactly (`audio2exp.*`, `audio2pose.*` of the SadTalker
safetensors file with the prefix stripped), so `ExpNet.from_state_dict` / `PoseVAE.from_state_dict` load them
strictly. Differences from upstream, all deliberate:

* every random draw (blink placement, one pose latent per 32-frame window) comes from the `torch.Generator` the
  caller passes, so a video is reproducible from its seed; blinks are drawn first, then the latents in window order;
* the PoseVAE audio encoder is batch-correct (upstream's is only right for batch 1) and encodes every frame once,
  then the windows are sliced from the shared embeddings (equal up to float noise);
* short clips that upstream crashes on are handled: 21 frames → no blink (empty range), fewer than 3 frames → no
  Savitzky–Golay smoothing;
* still mode skips the pose network: the pose is the source pose on every frame (upstream predicts it and overwrites
  it later, with the same result).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from renderer.sadtalker.transfer import to_device, to_host

#: Frames per PoseVAE window, latent size, number of pose styles.
POSE_SEQ_LEN = 32
POSE_LATENT = 64
NUM_POSE_STYLES = 46
#: Coefficient layout: 64 expression, then 3 rotation angles and 3 translations.
NUM_EXP = 64
NUM_POSE = 6
NUM_COEFFS = NUM_EXP + NUM_POSE
#: Blink profile over 5 frames (0 = open, 1 = closed) and the range of gaps between blinks (frames).
BLINK_PROFILE = (0.5, 0.9, 1.0, 0.9, 0.5)
BLINK_MIN_GAP = 10
BLINK_MAX_GAP = 70
#: Savitzky–Golay smoothing of the head pose along time.
SMOOTH_WINDOW = 13
SMOOTH_ORDER = 2
#: Key prefixes of the Audio2Pose checkpoint used only in training (CVAE encoder, motion discriminator).
POSE_TRAINING_ONLY_PREFIXES = ("netG.encoder.", "netD_motion.")
#: Frames per ExpNet / audio-encoder forward pass (bounds activation memory on long clips).
_CHUNK = 256

# (in, out, kernel, stride, padding, residual) of the 13 Wav2Lip-style audio encoder blocks: 1×80×16 → 512×1×1.
_AUDIO_ENCODER_LAYOUT: tuple[tuple[int, int, int, int | tuple[int, int], int, bool], ...] = (
    (1, 32, 3, 1, 1, False),
    (32, 32, 3, 1, 1, True),
    (32, 32, 3, 1, 1, True),
    (32, 64, 3, (3, 1), 1, False),
    (64, 64, 3, 1, 1, True),
    (64, 64, 3, 1, 1, True),
    (64, 128, 3, 3, 1, False),
    (128, 128, 3, 1, 1, True),
    (128, 128, 3, 1, 1, True),
    (128, 256, 3, (3, 2), 1, False),
    (256, 256, 3, 1, 1, True),
    (256, 512, 3, 1, 0, False),
    (512, 512, 1, 1, 0, False),
)


class ConvBlock(nn.Module):
    """Conv2d → BatchNorm2d (→ + input) → ReLU; the parameters live in `conv_block.0` / `conv_block.1`."""

    def __init__(
        self, cin: int, cout: int, kernel: int, stride: int | tuple[int, int], padding: int, residual: bool
    ) -> None:
        super().__init__()
        self.conv_block = nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding), nn.BatchNorm2d(cout))
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_block(x)
        if self.residual:
            out = out + x
        return F.relu(out)


def audio_encoder() -> nn.Sequential:
    """The per-frame mel encoder shared (as a topology) by ExpNet and PoseVAE: (B, 1, 80, 16) → (B, 512, 1, 1)."""
    return nn.Sequential(*(ConvBlock(*spec) for spec in _AUDIO_ENCODER_LAYOUT))


def _load_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Strict load that tolerates only missing BatchNorm `num_batches_tracked` (absent from legacy pickles)."""
    missing, unexpected = module.load_state_dict(dict(state_dict), strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise KeyError(
            f"{type(module).__name__} state dict does not match: missing {missing[:5]}"
            f"{' …' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{' …' if len(unexpected) > 5 else ''}"
        )


class ExpNet(nn.Module):
    """Per-frame expression predictor ("audio2exp"): mel window + reference expression + blink → 64 expression."""

    def __init__(self) -> None:
        super().__init__()
        self.audio_encoder = audio_encoder()
        self.mapping1 = nn.Linear(512 + NUM_EXP + 1, NUM_EXP)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> ExpNet:
        """Build, load strictly (keys of `audio2exp.*` with the prefix stripped) and switch to eval mode."""
        net = cls()
        _load_strict(net, state_dict)
        return net.eval()

    def embed(self, mel: torch.Tensor) -> torch.Tensor:
        """(B, 1, 80, 16) mel windows → (B, 512) audio embeddings."""
        return self.audio_encoder(mel).flatten(1)

    def forward(self, mel: torch.Tensor, ref_exp: torch.Tensor, blink: torch.Tensor) -> torch.Tensor:
        """(B, 1, 80, 16), (B, 64), (B, 1) → (B, 64): the predicted expression itself (not a residual)."""
        return self.mapping1(torch.cat([self.embed(mel), ref_exp, blink], dim=1))


class ResidualConv(nn.Module):
    """Pre-activation residual block of the pose ResUnet (BN → ReLU → conv, twice; conv + BN skip)."""

    def __init__(self, cin: int, cout: int, stride: int | tuple[int, int], padding: int = 1) -> None:
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.BatchNorm2d(cin),
            nn.ReLU(),
            nn.Conv2d(cin, cout, 3, stride, padding),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
            nn.Conv2d(cout, cout, 3, 1, 1),
        )
        self.conv_skip = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_block(x) + self.conv_skip(x)


class Upsample(nn.Module):
    """Transposed convolution that doubles the time axis only."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.upsample = nn.ConvTranspose2d(cin, cout, kernel_size=(2, 1), stride=(2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.upsample(x)


class ResUnet(nn.Module):
    """U-Net over a (1, 32 time, 6 pose) map, strides along time only; output in (0, 1)."""

    def __init__(self, channel: int = 1, filters: Sequence[int] = (32, 64, 128, 256)) -> None:
        super().__init__()
        f0, f1, f2, f3 = filters
        self.input_layer = nn.Sequential(
            nn.Conv2d(channel, f0, 3, padding=1), nn.BatchNorm2d(f0), nn.ReLU(), nn.Conv2d(f0, f0, 3, padding=1)
        )
        self.input_skip = nn.Sequential(nn.Conv2d(channel, f0, 3, padding=1))
        self.residual_conv_1 = ResidualConv(f0, f1, (2, 1))
        self.residual_conv_2 = ResidualConv(f1, f2, (2, 1))
        self.bridge = ResidualConv(f2, f3, (2, 1))
        self.upsample_1 = Upsample(f3, f3)
        self.up_residual_conv1 = ResidualConv(f3 + f2, f2, 1)
        self.upsample_2 = Upsample(f2, f2)
        self.up_residual_conv2 = ResidualConv(f2 + f1, f1, 1)
        self.upsample_3 = Upsample(f1, f1)
        self.up_residual_conv3 = ResidualConv(f1 + f0, f0, 1)
        self.output_layer = nn.Sequential(nn.Conv2d(f0, 1, 1, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.input_layer(x) + self.input_skip(x)
        x2 = self.residual_conv_1(x1)
        x3 = self.residual_conv_2(x2)
        x4 = self.bridge(x3)
        x6 = self.up_residual_conv1(torch.cat([self.upsample_1(x4), x3], dim=1))
        x8 = self.up_residual_conv2(torch.cat([self.upsample_2(x6), x2], dim=1))
        x10 = self.up_residual_conv3(torch.cat([self.upsample_3(x8), x1], dim=1))
        return self.output_layer(x10)


class PoseDecoder(nn.Module):
    """CVAE decoder: (latent + style bias, reference pose, 32 audio embeddings) → 32 frames of pose motion."""

    def __init__(self) -> None:
        super().__init__()
        audio_out = NUM_POSE
        self.classbias = nn.Parameter(torch.randn(NUM_POSE_STYLES, POSE_LATENT))
        self.resunet = ResUnet()
        self.MLP = nn.Sequential()
        sizes = (NUM_POSE + POSE_LATENT + POSE_SEQ_LEN * audio_out, 128, POSE_SEQ_LEN * NUM_POSE)
        for i, (cin, cout) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            self.MLP.add_module(f"L{i}", nn.Linear(cin, cout))
            self.MLP.add_module(f"A{i}", nn.ReLU() if i + 2 < len(sizes) else nn.Sigmoid())
        self.pose_linear = nn.Linear(NUM_POSE, NUM_POSE)
        self.linear_audio = nn.Linear(512, audio_out)

    def mlp_input(
        self, z: torch.Tensor, style: torch.Tensor, ref_pose: torch.Tensor, audio_emb: torch.Tensor
    ) -> torch.Tensor:
        """Concatenate [reference pose (6), z + style bias (64), per-frame audio projection (32·6)] → (B, 262)."""
        audio = self.linear_audio(audio_emb).flatten(1)
        return torch.cat([ref_pose, z + self.classbias[style], audio], dim=-1)

    def forward(
        self, z: torch.Tensor, style: torch.Tensor, ref_pose: torch.Tensor, audio_emb: torch.Tensor
    ) -> torch.Tensor:
        """(B, 64), (B,) int64, (B, 6), (B, 32, 512) → (B, 32, 6) motion relative to the reference pose."""
        hidden = self.MLP(self.mlp_input(z, style, ref_pose, audio_emb))
        pose_map = self.resunet(hidden.reshape(hidden.shape[0], 1, POSE_SEQ_LEN, NUM_POSE))
        return self.pose_linear(pose_map.squeeze(1))


class PoseAudioEncoder(nn.Module):
    """Audio encoder of the PoseVAE: (B, T, 1, 80, 16) → (B, T, 512)."""

    def __init__(self) -> None:
        super().__init__()
        self.audio_encoder = audio_encoder()

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        batch, steps = mel.shape[:2]
        return self.audio_encoder(mel.flatten(0, 1)).reshape(batch, steps, -1)


class _PoseGenerator(nn.Module):
    """Holds the CVAE decoder under the checkpoint's `netG.decoder.` names (the training-only encoder is left out)."""

    def __init__(self) -> None:
        super().__init__()
        self.decoder = PoseDecoder()


class PoseVAE(nn.Module):
    """Head-pose generator ("audio2pose"): audio encoder + CVAE decoder, 32-frame windows, one latent per window."""

    def __init__(self) -> None:
        super().__init__()
        self.audio_encoder = PoseAudioEncoder()
        self.netG = _PoseGenerator()

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> PoseVAE:
        """Build and load strictly from the `audio2pose.*` keys (prefix stripped), minus the training-only parts."""
        net = cls()
        kept = {k: v for k, v in state_dict.items() if not k.startswith(POSE_TRAINING_ONLY_PREFIXES)}
        _load_strict(net, kept)
        return net.eval()

    @property
    def decoder(self) -> PoseDecoder:
        return self.netG.decoder


# ----------------------------------------------------------------------------------------------------------------
# Inference (SPEC §5.1–§5.5).


def _net_placement(net: nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(net.parameters())
    return param.device, param.dtype


def _as_windows(mel_windows: np.ndarray | torch.Tensor) -> torch.Tensor:
    windows = torch.as_tensor(mel_windows)
    if windows.ndim == 3:
        windows = windows[:, None]
    if windows.ndim != 4 or tuple(windows.shape[1:]) != (1, 80, 16):
        raise ValueError(f"expected mel windows of shape (N, 1, 80, 16), got {tuple(windows.shape)}")
    return windows


def random_blinks(frames: int, generator: torch.Generator) -> np.ndarray:
    """Blink control per frame (N, 1) float32: 5-frame blinks 10–69 frames apart (SPEC §5.3), drawn from `generator`."""
    ratio = np.zeros((frames, 1), dtype=np.float32)
    low, high = min(BLINK_MIN_GAP, frames), min(frames // 2, BLINK_MAX_GAP)
    if frames <= 20 or high <= low:
        return ratio
    cursor = 0
    while True:
        gap = int(torch.randint(low, high, (1,), generator=generator).item())
        if cursor + gap + len(BLINK_PROFILE) > frames - 1:
            return ratio
        ratio[cursor + gap : cursor + gap + len(BLINK_PROFILE), 0] = BLINK_PROFILE
        cursor += gap + len(BLINK_PROFILE)


@torch.no_grad()
def predict_expression(
    exp_net: ExpNet, mel_windows: np.ndarray | torch.Tensor, ref_exp: np.ndarray, blink: np.ndarray
) -> np.ndarray:
    """ExpNet over every frame: (N, 1, 80, 16) windows, the source expression ((64,), or (N, 64): one per frame, as
    when several videos run at once) and (N, 1) blinks → (N, 64) float32, `_CHUNK` frames per forward pass."""
    device, dtype = _net_placement(exp_net)
    windows = _as_windows(mel_windows)
    frames = windows.shape[0]
    ref = torch.as_tensor(np.asarray(ref_exp, dtype=np.float32).reshape(-1, NUM_EXP)).expand(frames, NUM_EXP)
    ratio = torch.as_tensor(np.asarray(blink, dtype=np.float32).reshape(frames, 1))
    out = []
    for start in range(0, frames, _CHUNK):
        stop = min(start + _CHUNK, frames)
        pred = exp_net(
            to_device(windows[start:stop], device, dtype),
            to_device(ref[start:stop], device, dtype),
            to_device(ratio[start:stop], device, dtype),
        )
        out.append(to_host(pred.float()))
    if not out:
        return np.zeros((0, NUM_EXP), dtype=np.float32)
    return torch.cat(out).numpy()


def pose_windows(frames: int) -> list[tuple[int, int, int]]:
    """PoseVAE windows over the N − 1 motion frames: (first, last + 1, frames kept from the window's end).

    Full 32-frame windows first; a remainder r re-encodes the last 32 motion frames (fewer if the clip is short) and
    keeps only their last r outputs. Indices count motion frames, i.e. video frame index − 1.
    """
    motion = max(frames - 1, 0)
    full, rest = divmod(motion, POSE_SEQ_LEN)
    windows = [(j * POSE_SEQ_LEN, (j + 1) * POSE_SEQ_LEN, POSE_SEQ_LEN) for j in range(full)]
    if rest:
        windows.append((max(motion - POSE_SEQ_LEN, 0), motion, rest))
    return windows


@torch.no_grad()
def encode_pose_audio(pose_net: PoseVAE, mel_windows: np.ndarray | torch.Tensor) -> torch.Tensor:
    """PoseVAE audio embeddings of every frame: (N, 1, 80, 16) → (N, 512) float32 on the CPU."""
    device, dtype = _net_placement(pose_net)
    windows = _as_windows(mel_windows)
    out = [
        to_host(pose_net.audio_encoder(to_device(windows[start : start + _CHUNK][None], device, dtype))[0].float())
        for start in range(0, windows.shape[0], _CHUNK)
    ]
    return torch.cat(out) if out else torch.zeros(0, 512)


@dataclasses.dataclass(frozen=True)
class PoseRequest:
    """One clip's inputs to `predict_poses`: mel windows (N, 1, 80, 16), reference pose (6,), pose style, and one
    64-d latent per window of `pose_windows(N)`, in that order."""

    mel_windows: np.ndarray | torch.Tensor
    ref_pose: np.ndarray
    pose_style: int
    latents: torch.Tensor


def predict_pose(
    pose_net: PoseVAE,
    mel_windows: np.ndarray | torch.Tensor,
    ref_pose: np.ndarray,
    pose_style: int,
    latents: torch.Tensor,
) -> np.ndarray:
    """Raw head pose (N, 6) float32 = reference pose + predicted motion (frame 0 has zero motion), before smoothing.

    `latents` holds one 64-d z per window of `pose_windows(N)`, in that order.
    """
    return predict_poses(pose_net, [PoseRequest(mel_windows, ref_pose, pose_style, latents)])[0]


@torch.no_grad()
def predict_poses(pose_net: PoseVAE, requests: Sequence[PoseRequest]) -> list[np.ndarray]:
    """`predict_pose` for several clips at once: the audio encoder runs over all their frames and the decoder over
    all their windows, `_CHUNK` at a time, instead of once per clip and window (equal up to float noise)."""
    if not requests:
        return []
    device, dtype = _net_placement(pose_net)
    plans, windows, refs, styles, latents = [], [], [], [], []
    for request in requests:
        clip = _as_windows(request.mel_windows)
        plan = pose_windows(clip.shape[0])
        z = torch.as_tensor(request.latents).reshape(-1, POSE_LATENT)
        if z.shape[0] != len(plan):
            raise ValueError(f"{len(plan)} pose windows need {len(plan)} latents, got {z.shape[0]}")
        if not 0 <= request.pose_style < NUM_POSE_STYLES:
            raise ValueError(f"pose_style must be in 0..{NUM_POSE_STYLES - 1}, got {request.pose_style}")
        plans.append(plan)
        windows.append(clip[1:])
        refs.append(torch.as_tensor(np.asarray(request.ref_pose, dtype=np.float32).reshape(NUM_POSE)))
        styles += [request.pose_style] * len(plan)
        latents.append(z)
    # Embeddings of every motion frame of every clip, then the decoder's (32, 512) window per latent.
    embeddings = encode_pose_audio(pose_net, torch.cat(windows))
    inputs, offset = [], 0
    for plan, clip in zip(plans, windows, strict=True):
        own = embeddings[offset : offset + clip.shape[0]]
        offset += clip.shape[0]
        for first, stop, _ in plan:
            emb = own[first:stop]
            if emb.shape[0] < POSE_SEQ_LEN:  # short clip: left-pad by repeating the first embedding
                emb = torch.cat([emb[:1].expand(POSE_SEQ_LEN - emb.shape[0], -1), emb])
            inputs.append(emb)
    ref_rows = torch.cat([ref[None].expand(len(plan), -1) for ref, plan in zip(refs, plans, strict=True)])
    z_rows = torch.cat(latents)
    style_rows = torch.tensor(styles, dtype=torch.int64)
    motion = []
    for start in range(0, len(inputs), _CHUNK):
        stop = min(start + _CHUNK, len(inputs))
        pred = pose_net.decoder(
            to_device(z_rows[start:stop], device, dtype),
            to_device(style_rows[start:stop], device),
            to_device(ref_rows[start:stop], device, dtype),
            to_device(torch.stack(inputs[start:stop]), device, dtype),
        )
        motion.append(to_host(pred.float()))
    predicted = torch.cat(motion) if motion else torch.zeros(0, POSE_SEQ_LEN, NUM_POSE)
    out, row = [], 0
    for plan, ref in zip(plans, refs, strict=True):
        kept = [torch.zeros(1, NUM_POSE)]
        for _, _, keep in plan:
            kept.append(predicted[row, -keep:])
            row += 1
        out.append((ref[None] + torch.cat(kept)).numpy())
    return out


def smooth_pose(pose: np.ndarray) -> np.ndarray:
    """Savitzky–Golay along time (window 13 or the largest odd ≤ N, order 2); clips under 3 frames are unchanged."""
    from scipy.signal import savgol_filter

    pose = np.asarray(pose, dtype=np.float32)
    frames = pose.shape[0]
    window = SMOOTH_WINDOW if frames >= SMOOTH_WINDOW else (frames - 1) // 2 * 2 + 1
    if window <= SMOOTH_ORDER:
        return pose.copy()
    return savgol_filter(pose, window, SMOOTH_ORDER, axis=0).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class CoeffRequest:
    """One video's inputs to `predict_coeffs_batch` (the arguments of `predict_coeffs`)."""

    mel_windows: np.ndarray | torch.Tensor
    source_coeff: np.ndarray
    generator: torch.Generator
    pose_style: int = 0
    still: bool = False
    expression_scale: float = 1.0


def predict_coeffs(
    exp_net: ExpNet,
    pose_net: PoseVAE | None,
    mel_windows: np.ndarray | torch.Tensor,
    source_coeff: np.ndarray,
    *,
    pose_style: int = 0,
    still: bool = False,
    expression_scale: float = 1.0,
    generator: torch.Generator,
) -> np.ndarray:
    """Driving coefficients (N, 70) float32 for N mel windows: 64 expression | 3 angles | 3 translations.

    `source_coeff` is the source's 3DMM vector (70 or 73 values; the first 70 are used). `expression_scale` multiplies
    the predicted expression (the source's is unchanged); `still` freezes the pose to the source pose, and then
    `pose_net` may be None. Random draws (blinks, then pose latents) come from `generator` (a CPU generator).
    """
    request = CoeffRequest(mel_windows, source_coeff, generator, pose_style, still, expression_scale)
    return predict_coeffs_batch(exp_net, pose_net, [request])[0]


def predict_coeffs_batch(
    exp_net: ExpNet, pose_net: PoseVAE | None, requests: Sequence[CoeffRequest]
) -> list[np.ndarray]:
    """`predict_coeffs` for several videos at once: each network runs over all their frames together (a few forward
    passes instead of a few per video; equal up to float noise). Each video's random draws come from its own
    generator, in the same order as alone, so a video's coefficients do not depend on its companions."""
    windows, refs, blinks, poses = [], [], [], []
    for request in requests:
        clip = _as_windows(request.mel_windows)
        frames = clip.shape[0]
        if frames < 1:
            raise ValueError("no audio frames: the audio is shorter than one video frame (40 ms)")
        ref = np.asarray(request.source_coeff, dtype=np.float32).reshape(-1)
        if ref.size < NUM_COEFFS:
            raise ValueError(f"source_coeff needs at least {NUM_COEFFS} values, got {ref.size}")
        windows.append(clip)
        refs.append(ref[:NUM_COEFFS])
        blinks.append(random_blinks(frames, request.generator))
        if not request.still:
            if pose_net is None:
                raise ValueError("pose_net is required unless still=True")
            latents = torch.randn(len(pose_windows(frames)), POSE_LATENT, generator=request.generator)
            poses.append(PoseRequest(clip, ref[NUM_EXP:NUM_COEFFS], request.pose_style, latents))
    if not requests:
        return []
    frame_refs = np.concatenate(
        [np.repeat(ref[None, :NUM_EXP], len(clip), axis=0) for ref, clip in zip(refs, windows, strict=True)]
    )
    exp = predict_expression(exp_net, torch.cat(windows), frame_refs, np.concatenate(blinks))
    raw_poses = iter(predict_poses(pose_net, poses))
    out, offset = [], 0
    for request, ref, clip in zip(requests, refs, windows, strict=True):
        own = exp[offset : offset + len(clip)] * np.float32(request.expression_scale)
        offset += len(clip)
        if request.still:
            pose = np.repeat(ref[None, NUM_EXP:], len(clip), axis=0)
        else:
            pose = smooth_pose(next(raw_poses))
        out.append(np.concatenate([own, pose], axis=1).astype(np.float32))
    return out
