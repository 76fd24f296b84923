"""The UNet and the encoders give the same outputs and gradients with the Triton kernels on and
off. Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets it up)."""

import pytest
import torch

from nanopiti.model import build_model, toy_config

triton = pytest.importorskip("triton")


def tiny_piti():
    # One level and batch 1: under Triton's interpreter every kernel program costs tens of ms.
    config = dict(toy_config("piti"), channel_mult=[1], attention_ds=[1], encoder_layers=1, cond_size=32)
    torch.manual_seed(0)
    model = build_model(config)
    for p in model.parameters():  # leave no zero-initialised layer: every path must carry gradient
        torch.nn.init.normal_(p, std=0.05)
    return model


def forward_backward(model, inputs, kernels, monkeypatch):
    monkeypatch.setenv("NANOPITI_KERNELS", "1" if kernels else "0")
    model.zero_grad()
    out = model(*inputs[:2], cond=inputs[2])
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.fixture
def no_tf32():
    """On a GPU, cuDNN convolutions and matmuls may round fp32 to TF32 (10-bit mantissa); the 1e-4
    comparison of the two fp32 paths needs real fp32 everywhere, not just inside the kernels."""
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        yield
    torch.set_float32_matmul_precision(precision)


def test_kernels_on_and_off_agree_through_the_model(monkeypatch, no_tf32):
    import kernels

    calls = []  # guard against passing because the kernels were never called
    for name in ("attention", "groupnorm_silu"):
        original = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    model = tiny_piti()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    inputs = (torch.randn(1, 3, 8, 8, device=device), torch.tensor([700], device=device),
              torch.randn(1, 3, 32, 32, device=device))
    out_ref, grads_ref = forward_backward(model, inputs, False, monkeypatch)
    assert not calls
    out_k, grads_k = forward_backward(model, inputs, True, monkeypatch)
    assert "attention" in calls and "groupnorm_silu" in calls
    assert out_ref.abs().max() > 0.1  # a real signal, not zeros
    torch.testing.assert_close(out_k, out_ref, atol=1e-4, rtol=1e-4)
    for name, g in grads_ref.items():
        torch.testing.assert_close(grads_k[name], g, atol=1e-4, rtol=1e-3, msg=lambda m: f"{name}: {m}")
