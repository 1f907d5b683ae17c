"""Fold eval-mode BatchNorms into the convolutions that feed them (the coefficient networks, at load).

A folded network runs one convolution where it ran a convolution and a normalisation: the same result in real
arithmetic, float32 rounding apart, and half the kernel launches in the 3DMM regressor and the audio encoders,
which are small enough on a GPU to be bound by launching kernels. The renderer's blocks call `fold_pair` from
their own `fuse` (`facerender.fuse_for_inference`).

Pairs are found in two places: a Conv2d directly followed by a BatchNorm2d inside an `nn.Sequential`, and the
attribute names a module lists in `CONV_BN` (e.g. ResNet's `("conv1", "bn1")`). The BatchNorm becomes an
`nn.Identity`, so forward code stays unchanged; the state-dict layout does not (load first, then fold).
"""

from __future__ import annotations

import torch
from torch import nn


def fold_batchnorms(module: nn.Module) -> nn.Module:
    """Fold every (Conv2d, BatchNorm2d) pair of `module` in place; returns it in eval mode, without gradients."""
    module.eval()
    for sub in list(module.modules()):
        pairs = list(getattr(sub, "CONV_BN", ()))
        if isinstance(sub, nn.Sequential):
            names = list(sub._modules)
            pairs += zip(names, names[1:], strict=False)
        for conv_name, bn_name in pairs:
            if type(getattr(sub, conv_name)) is nn.Conv2d and type(getattr(sub, bn_name)) is nn.BatchNorm2d:
                fold_pair(sub, conv_name, bn_name)
    return module.requires_grad_(False)


def fold_pair(parent: nn.Module, conv_name: str, bn_name: str) -> None:
    """Fold `parent.<bn_name>` into `parent.<conv_name>` (`fold_bn`) and replace the norm by an `nn.Identity`."""
    fold_bn(getattr(parent, conv_name), getattr(parent, bn_name))
    setattr(parent, bn_name, nn.Identity())


def fold_bn(conv: nn.Module, bn: nn.Module) -> None:
    """Fold an eval-mode BatchNorm into the preceding convolution's weight and bias, in place (exact in math)."""
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    weight = conv.weight.double() * scale.view(-1, *([1] * (conv.weight.dim() - 1)))
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    bias = (bias - bn.running_mean.double()) * scale + bn.bias.double()
    conv.weight = nn.Parameter(weight.to(conv.weight.dtype), requires_grad=False)
    conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)
