"""The UNet and the encoders give the same outputs and gradients with the Triton kernels on and
off. Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets it up)."""

import pytest
import torch

from nanopiti.model import build_model, toy_config

triton = pytest.importorskip("triton")


def tiny_piti():
    config = dict(toy_config("piti"), channel_mult=[1, 2], attention_ds=[2], encoder_layers=1, cond_size=32)
    torch.manual_seed(0)
    model = build_model(config)
    for p in model.parameters():  # leave no zero-initialised layer: every path must carry gradient
        torch.nn.init.normal_(p, std=0.05)
    return model


def forward_backward(model, inputs, kernels, monkeypatch):
    monkeypatch.setenv("NANOPITI_KERNELS", "1" if kernels else "0")
    model.zero_grad()
    out = model(*inputs[:2], ref=inputs[2])
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_kernels_on_and_off_agree_through_the_model(monkeypatch):
    model = tiny_piti()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    inputs = (torch.randn(2, 3, 16, 16, device=device), torch.tensor([3, 700], device=device),
              torch.randn(2, 3, 32, 32, device=device))
    out_ref, grads_ref = forward_backward(model, inputs, False, monkeypatch)
    out_k, grads_k = forward_backward(model, inputs, True, monkeypatch)
    assert out_ref.abs().max() > 0.1  # a real signal, not zeros
    torch.testing.assert_close(out_k, out_ref, atol=1e-4, rtol=1e-4)
    for name, g in grads_ref.items():
        torch.testing.assert_close(grads_k[name], g, atol=1e-4, rtol=1e-3, msg=lambda m: f"{name}: {m}")


def test_kernel_path_is_taken(monkeypatch):
    """Guard against the test above passing because the kernels were never called."""
    import kernels

    calls = []
    for name in ("attention", "groupnorm_silu"):
        original = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    monkeypatch.setenv("NANOPITI_KERNELS", "1")
    model = tiny_piti()
    with torch.no_grad():
        model(torch.randn(1, 3, 16, 16), torch.tensor([5]), ref=torch.randn(1, 3, 32, 32))
    assert "attention" in calls and "groupnorm_silu" in calls
