"""3DMM coefficients of the source face (SPEC §3.6, §9.1): a ResNet-50 regressor on the 224×224 aligned crop.

Written from scratch with torchvision's ResNet-50 parameter names (`backbone.conv1`, `backbone.layer1.0.conv1`, …)
so the `face_3drecon.*` part of the SadTalker checkpoint (or `net_recon` of the legacy `epoch_20.pth`) loads strictly
without torchvision.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from renderer.sadtalker.preprocess import align_for_recon
from renderer.sadtalker.transfer import to_device, to_host

#: Output layout of the regressor (257 numbers): identity, expression, texture, angles, lighting, translation.
COEFF_SPLITS = {"id": 80, "exp": 64, "tex": 80, "angle": 3, "gamma": 27, "trans": 3}
#: Channels of the seven 1×1 output convolutions (translation is split into xy and z).
_FINAL_CHANNELS = (80, 64, 80, 3, 27, 2, 1)
#: Bottleneck blocks per ResNet-50 stage and their widths.
_STAGES = ((3, 64), (4, 128), (6, 256), (3, 512))
_EXPANSION = 4
#: Face crops per forward pass of `coeffs_from_crops`.
BATCH = 16


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck: 1×1 → 3×3 (carries the stride) → 1×1 (×4), identity or projected shortcut."""

    CONV_BN = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))  # pairs `fold.fold_batchnorms` may fold

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * _EXPANSION
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class ResNet50Backbone(nn.Module):
    """ResNet-50 without its classifier: (B, 3, H, W) → globally averaged features (B, 2048, 1, 1)."""

    CONV_BN = (("conv1", "bn1"),)

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        for index, (blocks, width) in enumerate(_STAGES):
            stride = 1 if index == 0 else 2
            layers = []
            for block in range(blocks):
                layers.append(Bottleneck(cin, width, stride if block == 0 else 1))
                cin = width * _EXPANSION
            self.add_module(f"layer{index + 1}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.avgpool(x)


class ReconNet(nn.Module):
    """Deep3DFaceRecon's regressor: RGB in [0, 1], (B, 3, 224, 224) → (B, 257) 3DMM coefficients."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = ResNet50Backbone()
        self.final_layers = nn.ModuleList(nn.Conv2d(2048, c, 1) for c in _FINAL_CHANNELS)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> ReconNet:
        """Build, load strictly (`face_3drecon.*` keys with the prefix stripped) and switch to eval mode.

        Only BatchNorm `num_batches_tracked` may be missing (legacy pickles lack it).
        """
        net = cls()
        missing, unexpected = net.load_state_dict(dict(state_dict), strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise KeyError(f"ReconNet state dict does not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return net.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)
        return torch.cat([layer(features) for layer in self.final_layers], dim=1).flatten(1)


def split_coeffs(full: np.ndarray) -> dict[str, np.ndarray]:
    """Split (…, 257) coefficients into the named groups of `COEFF_SPLITS`."""
    full = np.asarray(full)
    out, start = {}, 0
    for name, size in COEFF_SPLITS.items():
        out[name] = full[..., start : start + size]
        start += size
    return out


def recon_input(aligned_u8: np.ndarray) -> torch.Tensor:
    """(224, 224, 3) uint8 RGB → (1, 3, 224, 224) float32 in [0, 1] (divided in float64, as upstream)."""
    image = (np.asarray(aligned_u8, dtype=np.uint8) / 255.0).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None]


def coeffs_from_crop(
    net: ReconNet, crop_rgb: np.ndarray, landmarks: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """3DMM coefficients of a face crop: returns (coeff_3dmm (1, 73), full_3dmm (1, 257)), both float32.

    `crop_rgb` is the S×S render source, `landmarks` its 68 points in crop pixels (None = no face: the standard
    5-point placement is used). coeff_3dmm = expression 64 | angles 3 | translation 3 | s, tx, ty of the alignment.
    """
    return coeffs_from_crops(net, [crop_rgb], [landmarks])[0]


@torch.no_grad()
def coeffs_from_crops(
    net: ReconNet, crops_rgb: list[np.ndarray], landmarks: list[np.ndarray | None]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """`coeffs_from_crop` for several crops, `BATCH` per forward pass (equal to one at a time up to float noise)."""
    aligned = [align_for_recon(crop, points) for crop, points in zip(crops_rgb, landmarks, strict=True)]
    param = next(net.parameters())
    full = np.zeros((len(aligned), 257), dtype=np.float32)
    for start in range(0, len(aligned), BATCH):
        batch = torch.cat([recon_input(image) for image, _ in aligned[start : start + BATCH]])
        full[start : start + len(batch)] = to_host(net(to_device(batch, param.device, param.dtype)).float()).numpy()
    out = []
    for row, (_, trans_params) in zip(full, aligned, strict=True):
        parts = split_coeffs(row[None])
        coeff = np.concatenate(
            [parts["exp"], parts["angle"], parts["trans"], trans_params[2:].astype(np.float32)[None]], axis=1
        )
        out.append((coeff.astype(np.float32), row[None].copy()))
    return out
