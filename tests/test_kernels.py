"""Triton kernels vs their PyTorch references: forward outputs and every gradient.

Without a GPU these run under TRITON_INTERPRET=1 (set by conftest.py), so shapes are tiny; with a
GPU the same tests run natively. bf16 attention is GPU-only: the interpreter's tl.dot computes
bf16 operands wrongly (its numpy backend has no bf16), while fp16 and fp32 dots are exact there.
tests/test_kernels_gpu.py repeats the comparisons at the model's real shapes on a GPU. The CUDA C++
kernel is compiled here wherever nvcc exists (about two minutes); it runs only in the GPU tests.
"""

import os
import types

import pytest
import torch

import kernels
from kernels.attention import attention_reference
from kernels.cuda_ext import find_nvcc, nvcc_compile
from kernels.groupnorm_silu import groupnorm_silu_reference

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not INTERPRET, reason="needs a GPU or TRITON_INTERPRET=1")

# Half-precision tolerances, relative to the largest reference value: outputs are rounded once from
# fp32, so kernel and reference may differ by one unit in the last place (2^-10 fp16, 2^-7 bf16).
HALF_TOL = {torch.float16: 4e-3, torch.bfloat16: 2e-2}


def _assert_close(actual, expected, tol):
    """|actual - expected| <= tol * (1 + |expected|) elementwise, computed in fp32."""
    actual, expected = actual.float(), expected.float()
    worst = ((actual - expected).abs() / (1 + expected.abs())).max().item()
    assert worst <= tol, f"relative error {worst:.2e} > {tol:.0e}"


def _leaf(t):
    return t.detach().requires_grad_()


def _grads(fn, inputs, grad_out):
    out = fn(*inputs)
    return (out, *torch.autograd.grad(out, inputs, grad_out))


def _attention_case(B, H, Lq, Lk, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, D, generator=g).to(DEVICE, dtype) for L in (Lq, Lk, Lk))
    do = torch.randn(B, H, Lq, D, generator=g).to(DEVICE, dtype)
    return [_leaf(q), _leaf(k), _leaf(v)], do


@pytest.mark.parametrize("B,H,D", [(2, 2, 32), (1, 2, 64), (1, 1, 128)])
def test_attention_fp32_matches_reference(B, H, D):
    inputs, do = _attention_case(B, H, 77, 333, D, torch.float32)
    got = _grads(kernels.attention, inputs, do)
    want = _grads(attention_reference, inputs, do)
    for name, a, b in zip(["out", "dq", "dk", "dv"], got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_half_matches_reference(dtype):
    if dtype == torch.bfloat16 and INTERPRET:
        pytest.skip("the Triton interpreter cannot multiply bf16 matrices; covered on GPU")
    inputs, do = _attention_case(1, 2, 77, 333, 64, dtype)
    got = _grads(kernels.attention, inputs, do)
    # Reference in fp32 from the same half-precision values; its gradients come back in `dtype`.
    want = _grads(attention_reference, inputs, do)
    for a, b in zip(got, want):
        assert a.dtype == dtype
        _assert_close(a, b, HALF_TOL[dtype])


def test_attention_reads_strided_views():
    """q, k, v as transposed slices of one fused projection (GLIDE's (B, 3*H*D, L) layout)."""
    B, H, L, D = 1, 2, 40, 32
    qkv = torch.randn(B, 3 * H * D, L).to(DEVICE)
    views = [t.reshape(B, H, D, L).transpose(2, 3) for t in qkv.chunk(3, dim=1)]
    assert views[0].stride(-1) != 1
    do = torch.randn(B, H, L, D).to(DEVICE)
    strided = _grads(kernels.attention, [_leaf(t) for t in views], do)
    packed = _grads(kernels.attention, [_leaf(t.contiguous()) for t in views], do)
    for a, b in zip(strided, packed):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_attention_single_query_equals_softmax_weighted_values():
    inputs, _ = _attention_case(1, 1, 1, 5, 32, torch.float32)
    q, k, v = inputs
    weights = torch.softmax((q @ k.transpose(-1, -2)) / 32 ** 0.5, dim=-1)
    torch.testing.assert_close(kernels.attention(q, k, v), weights @ v, atol=1e-5, rtol=1e-5)


def test_attention_rejects_unsupported_head_size():
    q = torch.randn(1, 1, 8, 48, device=DEVICE)
    with pytest.raises(ValueError, match="head size"):
        kernels.attention(q, q, q)


FILM = {"none": (False, False), "scale_shift": (True, True), "scale": (True, False), "shift": (False, True)}


def _groupnorm_case(shape, film, dtype, seed=0):
    """x with a non-zero mean, fp32 affine parameters, scale/shift as halves of a (B, 2C, 1, 1) tensor."""
    g = torch.Generator().manual_seed(seed)
    B, C = shape[:2]
    x = (torch.randn(shape, generator=g) * 2 + 1).to(DEVICE, dtype)
    weight = (1 + 0.3 * torch.randn(C, generator=g)).to(DEVICE)
    bias = (0.3 * torch.randn(C, generator=g)).to(DEVICE)
    emb = (0.5 * torch.randn(B, 2 * C, 1, 1, generator=g)).to(DEVICE, dtype)  # chunk() gives strided views
    has_scale, has_shift = FILM[film]
    scale, shift = [_leaf(t) if used else None for t, used in zip(emb.chunk(2, dim=1), (has_scale, has_shift))]
    dy = torch.randn(shape, generator=g).to(DEVICE, dtype)
    return [_leaf(x), _leaf(weight), _leaf(bias), scale, shift], dy


def _groupnorm_grads(fn, inputs, dy, num_groups, silu):
    x, weight, bias, scale, shift = inputs
    out = fn(x, weight, bias, num_groups, scale=scale, shift=shift, silu=silu)
    present = [t for t in inputs if t is not None]
    return (out, *torch.autograd.grad(out, present, dy))


@pytest.mark.parametrize("shape,groups,film,silu", [
    ((2, 6, 9, 23), 2, "none", True),          # C/G = 3 channels, N = 207: neither a power of two
    ((2, 6, 9, 23), 2, "none", False),
    ((2, 6, 9, 23), 2, "scale_shift", True),
    ((2, 6, 9, 23), 2, "scale_shift", False),
    ((2, 6, 9, 23), 2, "scale", True),
    ((2, 6, 9, 23), 2, "shift", True),
    ((1, 4, 600), 2, "scale_shift", True),      # rows split into several reduction chunks
])
def test_groupnorm_silu_fp32_matches_reference(shape, groups, film, silu):
    inputs, dy = _groupnorm_case(shape, film, torch.float32)
    got = _groupnorm_grads(kernels.groupnorm_silu, inputs, dy, groups, silu)
    want = _groupnorm_grads(groupnorm_silu_reference, inputs, dy, groups, silu)
    assert len(got) == len(want) == 4 + sum(FILM[film])
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_groupnorm_silu_half_matches_reference(dtype):
    inputs, dy = _groupnorm_case((2, 6, 9, 23), "scale_shift", dtype)
    got = _groupnorm_grads(kernels.groupnorm_silu, inputs, dy, 2, True)
    want = _groupnorm_grads(groupnorm_silu_reference, inputs, dy, 2, True)
    assert got[0].dtype == dtype
    for a, b in zip(got, want):
        _assert_close(a, b, HALF_TOL[dtype])


def test_groupnorm_statistics_survive_a_large_mean():
    """mean 1000, std 0.01: sum(x^2)/n - mean^2 in fp32 would return noise (or a NaN); the kernel
    must not. fp32 still rounds the mean to 3e-5 (half an ulp of 1000), 3e-3 after scaling by 1/std."""
    g = torch.Generator().manual_seed(0)
    x = (1000 + 0.01 * torch.randn(2, 4, 300, generator=g)).to(DEVICE)
    weight, bias = torch.ones(4, device=DEVICE), torch.zeros(4, device=DEVICE)
    got = kernels.groupnorm_silu(x, weight, bias, 2, silu=False)
    want = groupnorm_silu_reference(x.double(), weight.double(), bias.double(), 2, silu=False)
    torch.testing.assert_close(got.double(), want, atol=1e-2, rtol=0)


def test_groupnorm_rejects_indivisible_groups():
    x = torch.randn(1, 6, 4, device=DEVICE)
    with pytest.raises(ValueError, match="groups"):
        kernels.groupnorm_silu(x, torch.ones(6, device=DEVICE), torch.zeros(6, device=DEVICE), 4)


@pytest.mark.parametrize("env,expect_cpu,expect_cuda", [(None, False, True), ("0", False, False), ("1", True, True)])
def test_kernels_available_follows_env(monkeypatch, env, expect_cpu, expect_cuda):
    if env is None:
        monkeypatch.delenv("NANOPITI_KERNELS", raising=False)
    else:
        monkeypatch.setenv("NANOPITI_KERNELS", env)
    assert kernels.kernels_available(torch.zeros(1)) is expect_cpu
    assert kernels.kernels_available(types.SimpleNamespace(is_cuda=True)) is expect_cuda


@pytest.mark.skipif(find_nvcc() is None, reason="needs nvcc")
def test_cuda_source_compiles_with_nvcc(tmp_path):
    """groupnorm_silu.cu against this PyTorch's headers, for sm_90, without a GPU."""
    result = nvcc_compile(tmp_path / "groupnorm_silu.o")
    assert result.returncode == 0, result.stderr[-3000:]
    code = (tmp_path / "groupnorm_silu.o").read_bytes()
    assert b"gn_stats_kernel" in code and b"gn_apply_kernel" in code  # device code for both kernels
