"""The renderer's Triton kernels (renderer/sadtalker/kernels.py) against the PyTorch ops they replace.

On the CPU they run through Triton's interpreter (TRITON_INTERPRET=1, read when Triton compiles a kernel's
decorator, hence a child process); on a GPU (RUN_GPU=1) for real, in the whole renderer."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from _sadtalker_util import random_spade_block  # noqa: E402

from renderer.sadtalker import facerender as fr  # noqa: E402
from renderer.sadtalker import kernels  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

INTERPRETED = textwrap.dedent(
    """
    import torch
    from _sadtalker_util import random_spade_block
    from renderer.sadtalker import facerender as fr, kernels as K

    assert K.available(), "Triton is not importable"
    torch.manual_seed(0)
    last = lambda t: t.contiguous(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)
    checked = 0
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 4e-3)):
        # bias + residual + activation, 2-D and 3-D, channel counts above and below the kernel's block
        for shape in ((2, 40, 5, 7), (1, 300, 3, 4, 5), (3, 3, 2, 2)):
            for residual in (False, True):
                for slope in (None, 0.0, 0.2):
                    y = last(torch.randn(shape).to(dtype))
                    r = last(torch.randn(shape).to(dtype)) if residual else None
                    b = torch.randn(shape[1])
                    want = K.bias_act_reference(y.float(), b.to(dtype).float(), None if r is None else r.float(), slope)
                    before = K.LAUNCHES["bias_act"]
                    got = K.bias_act_(y, b, r, slope)
                    assert K.LAUNCHES["bias_act"] == before + 1, "the kernel did not run"
                    assert got is y and got.dtype == dtype and K.channels_innermost(got)
                    err = (got.float() - want).abs().max().item()
                    assert err <= tol * max(1.0, want.abs().max().item()), (dtype, shape, residual, slope, err)
                    checked += 1
        # SPADE's modulation, sample statistics per (sample, channel); pixels per sample not a block multiple
        for bias in (False, True):
            for slope in (None, 0.2):
                x = last(torch.randn(3, 24, 9, 11).to(dtype) * 3 + 1)
                gs = last(torch.randn(3, 48, 9, 11).to(dtype))
                b = torch.randn(48) if bias else None
                mean, rstd = K.instance_stats(x)
                want = K.spade_modulate_reference(x.float(), gs.float(), mean, rstd,
                                                  None if b is None else b.to(dtype).float(), slope)
                before = K.LAUNCHES["spade_modulate"]
                got = K.spade_modulate(x, gs, mean, rstd, b, slope)
                assert K.LAUNCHES["spade_modulate"] == before + 1, "the kernel did not run"
                assert got.dtype == dtype and K.channels_innermost(got) and got.shape == x.shape
                err = (got.float() - want).abs().max().item()
                assert err <= tol * max(1.0, want.abs().max().item()), (dtype, bias, slope, err)
                checked += 1
    # Mixed dtypes: a float32 input beside float16 conv outputs (the output keeps the input's dtype, as PyTorch's)
    x, gs = last(torch.randn(2, 24, 5, 6)), last(torch.randn(2, 48, 5, 6).half())
    mean, rstd, b = *K.instance_stats(x), torch.randn(48).half()
    want = K.spade_modulate_reference(x, gs.float() + b.float().view(1, -1, 1, 1), mean, rstd, None, 0.2)
    got = K.spade_modulate(x, gs, mean, rstd, b, 0.2)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    checked += 1
    y, r = last(torch.randn(2, 40, 5, 7).half()), last(torch.randn(2, 40, 5, 7))
    want = K.bias_act_reference(y.float(), None, r, None).half()
    got = K.bias_act_(y, None, r, None)
    assert got.dtype == torch.float16 and (got.float() - want.float()).abs().max().item() <= 4e-3 * 8
    checked += 1
    # Whole fused SPADE blocks (learned shortcut and identity), kernels on vs the PyTorch ops, float32
    for fin, fout in ((16, 8), (8, 8)):
        block = fr.fuse_for_inference(random_spade_block(fin, fout)).to(memory_format=torch.channels_last)
        x, seg = last(torch.randn(2, fin, 12, 12)), last(torch.randn(2, 256, 6, 6))
        with torch.inference_mode():
            launched = dict(K.LAUNCHES)
            got = block(x, seg)
            spade_calls = 3 if fin != fout else 2
            assert K.LAUNCHES["spade_modulate"] == launched["spade_modulate"] + spade_calls
            assert K.LAUNCHES["bias_act"] == launched["bias_act"] + spade_calls + 1  # shared MLPs + conv_1's sum
            K.ENABLED = False
            want = block(x, seg)
            K.ENABLED = True
        # float32 rounding apart ((x − mean)·rstd·γ vs x·rstd − mean·rstd, then γ), through two convolutions
        scale = want.abs().max().item()
        assert (got - want).abs().max().item() <= 1e-5 * scale, ((got - want).abs().max().item(), scale)
        checked += 1
    print("checked", checked)
    """
)


@pytest.mark.skipif(not kernels.available(), reason="Triton is not installed (make setup installs it on x86_64 Linux)")
def test_kernels_equal_the_pytorch_ops_they_replace_under_the_interpreter() -> None:
    """Every kernel variant (bias, residual, ReLU / LeakyReLU / none; 2-D and 3-D; float32 and float16; channel
    counts above and below one block) against its PyTorch reference, and whole fused SPADE blocks kernels on vs off.
    float16: within one rounding of the result (the kernel rounds once, PyTorch after each op)."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    run = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "checked 48" in run.stdout, run.stdout


def test_without_a_gpu_or_the_interpreter_the_pytorch_ops_run() -> None:
    """On a CPU (no interpreter) `enabled` is false and the callers run the reference ops: same values."""
    x = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    assert not kernels.enabled(x) or os.environ.get("TRITON_INTERPRET") == "1"
    assert kernels.channels_innermost(x) and not kernels.channels_innermost(torch.randn(2, 8, 4, 4))
    y, b, r = torch.randn(2, 8, 4, 4), torch.randn(8), torch.randn(2, 8, 4, 4)
    want = torch.nn.functional.leaky_relu(y + b.view(1, -1, 1, 1) + r, 0.2)
    torch.testing.assert_close(kernels.bias_act_(y.clone(), b, r, 0.2), want)


def test_fused_spade_block_drops_conv0_bias_and_shares_statistics_with_the_same_output() -> None:
    """`fuse`: conv_0 runs without its bias (norm_1's instance norm cancels it), γ and β are one convolution, and
    norm_s and norm_0 share x's statistics: the block's output is the unfused one's, float32 rounding apart."""
    torch.manual_seed(3)
    for fin, fout in ((16, 8), (8, 8)):
        block = random_spade_block(fin, fout)
        x, seg = torch.randn(2, fin, 12, 12), torch.randn(2, 256, 6, 6)
        with torch.inference_mode():
            want = block(x, seg)
            fused = fr.fuse_for_inference(copy.deepcopy(block))
            got = fused(x, seg)
        assert fused.conv_0.bias is None and block.conv_0.bias is not None
        assert fused.norm_0.gamma_beta.out_channels == 2 * fin and not hasattr(fused.norm_0, "mlp_gamma")
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        # the dropped bias really mattered nowhere: a large one changes nothing either
        fused.conv_0.bias = torch.nn.Parameter(torch.full((min(fin, fout),), 50.0), requires_grad=False)
        with torch.inference_mode():
            torch.testing.assert_close(fused(x, seg), got, atol=1e-4, rtol=1e-4)
