"""The kernels at the model's real shapes, natively on a GPU (skipped without CUDA).

Half-precision comparisons are against the PyTorch references computed in fp32 from the same
half-precision inputs; tolerances are relative to 1 + |reference| (see tests/test_kernels.py).
"""

import pytest
import torch

import kernels
from kernels.attention import attention_reference
from kernels.cuda_ext import cuda_ext_available, groupnorm_silu_cuda
from kernels.groupnorm_silu import groupnorm_silu_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# fp16/bf16 round P and dS to the input dtype before their matmuls (as FlashAttention does);
# summed over up to 1280 keys, that stays within a few units of the last place.
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def _assert_close(actual, expected, tol, name=""):
    actual, expected = actual.float(), expected.float()
    worst = ((actual - expected).abs() / (1 + expected.abs())).max().item()
    assert worst <= tol, f"{name}: relative error {worst:.2e} > {tol:.0e}"


def _attention_inputs(B, H, Lq, Lk, D, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    make = lambda L: torch.randn(B, H, L, D, device="cuda", generator=g).to(dtype).requires_grad_()  # noqa: E731
    return [make(Lq), make(Lk), make(Lk)], torch.randn(B, H, Lq, D, device="cuda", generator=g).to(dtype)


# Each (dtype, D) pair compiles and autotunes every config once, so the matrix is kept sparse.
@pytest.mark.parametrize("B,H,Lq,Lk,D,dtype", [
    (4, 6, 1024, 1280, 64, torch.bfloat16),   # base model at 32x32: 1024 image + 256 condition tokens
    (4, 6, 1024, 1280, 64, torch.float16),
    (4, 9, 256, 512, 64, torch.bfloat16),     # 16x16
    (4, 12, 64, 320, 64, torch.bfloat16),     # 8x8
    (2, 4, 77, 333, 32, torch.bfloat16),
    (2, 4, 200, 300, 128, torch.bfloat16),
])
def test_attention_real_shapes(B, H, Lq, Lk, D, dtype):
    inputs, do = _attention_inputs(B, H, Lq, Lk, D, dtype)
    got = kernels.attention(*inputs)
    want = attention_reference(*inputs)
    _assert_close(got, want, TOL[dtype], "out")
    for name, a, b in zip(["dq", "dk", "dv"], torch.autograd.grad(got, inputs, do), torch.autograd.grad(want, inputs, do)):
        _assert_close(a, b, TOL[dtype], name)


def test_attention_fp32_is_exact_on_gpu():
    """fp32 inputs use IEEE fp32 dots (not TF32), so the brief's 1e-4 holds natively too."""
    inputs, do = _attention_inputs(2, 3, 77, 333, 64, torch.float32)
    got, want = kernels.attention(*inputs), attention_reference(*inputs)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for a, b in zip(torch.autograd.grad(got, inputs, do), torch.autograd.grad(want, inputs, do)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_attention_backward_is_deterministic():
    inputs, do = _attention_inputs(4, 6, 1024, 1280, 64, torch.bfloat16)
    first = torch.autograd.grad(kernels.attention(*inputs), inputs, do)
    second = torch.autograd.grad(kernels.attention(*inputs), inputs, do)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def _groupnorm_inputs(shape, dtype, film):
    g = torch.Generator(device="cuda").manual_seed(0)
    B, C = shape[:2]
    x = (torch.randn(shape, device="cuda", generator=g) * 2 + 1).to(dtype).requires_grad_()
    weight = (1 + 0.3 * torch.randn(C, device="cuda", generator=g)).requires_grad_()
    bias = (0.3 * torch.randn(C, device="cuda", generator=g)).requires_grad_()
    emb = (0.5 * torch.randn(B, 2 * C, 1, 1, device="cuda", generator=g)).to(dtype)
    scale, shift = (t.detach().requires_grad_() for t in emb.chunk(2, dim=1)) if film else (None, None)
    return x, weight, bias, scale, shift


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,film", [
    ((16, 192, 64, 64), True),    # base model 64x64, scale-shift ResBlock
    ((16, 384, 32, 32), False),
    ((2, 1536, 8, 8), True),      # 48 channels per group
    ((1, 192, 256, 256), False),  # upsampler at 256x256: 6 * 65536 elements per group
])
def test_groupnorm_silu_real_shapes(shape, film, dtype):
    x, weight, bias, scale, shift = _groupnorm_inputs(shape, dtype, film)
    inputs = [t for t in (x, weight, bias, scale, shift) if t is not None]
    got = kernels.groupnorm_silu(x, weight, bias, 32, scale=scale, shift=shift)
    want = groupnorm_silu_reference(x, weight, bias, 32, scale=scale, shift=shift)
    tol = 1e-4 if dtype == torch.float32 else TOL[dtype]
    _assert_close(got, want, tol, "out")
    dy = torch.randn_like(got)
    for i, (a, b) in enumerate(zip(torch.autograd.grad(got, inputs, dy), torch.autograd.grad(want, inputs, dy))):
        # dweight and dbias sum over B * H * W elements: compare relative to their largest entry.
        scale_ref = 1.0 if i == 0 else b.float().abs().max().item()
        _assert_close(a / scale_ref, b / scale_ref, tol, f"grad {i}")


@pytest.mark.skipif(not cuda_ext_available(), reason="needs nvcc and a CUDA build of PyTorch")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,film", [((4, 192, 64, 64), True), ((1, 192, 256, 256), False), ((3, 96, 7, 9), True)])
def test_cuda_extension_matches_triton(shape, film, dtype):
    x, weight, bias, scale, shift = _groupnorm_inputs(shape, dtype, film)
    with torch.no_grad():
        triton_out = kernels.groupnorm_silu(x, weight, bias, 32, scale=scale, shift=shift)
        cuda_out = groupnorm_silu_cuda(x, weight, bias, 32, scale=scale, shift=shift)
    assert cuda_out.dtype == dtype and cuda_out.shape == x.shape
    _assert_close(cuda_out, triton_out, 1e-4 if dtype == torch.float32 else TOL[dtype], "cuda vs triton")
