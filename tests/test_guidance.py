"""Classifier-free guidance (eq. 7) and normalized classifier-free guidance (eq. 8)."""

import pytest
import torch
import torch.nn.functional as F

from nanopiti.diffusion import GaussianDiffusion, get_named_beta_schedule
from nanopiti.guidance import GuidanceError, batch_condition_kwargs, guided_eps, make_guided_model_fn


def stats(x):
    return x.mean(dim=(1, 2, 3)), x.std(dim=(1, 2, 3))


def random_eps(seed, batch=3):
    gen = torch.Generator().manual_seed(seed)
    cond = torch.randn(batch, 3, 8, 8, generator=gen) * 0.9 + 0.2
    uncond = torch.randn(batch, 3, 8, 8, generator=gen) * 1.3 - 0.4
    return cond, uncond


class TinyPITI(torch.nn.Module):
    """Stand-in for a PITI model: forward(x_t, t, cond=..., low_res=None) -> B x 6 x H x W."""

    def __init__(self, upsampler=False):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        in_ch = 6 if upsampler else 3
        self.conv = torch.nn.Parameter(0.3 * torch.randn(6, in_ch, 3, 3, generator=gen))
        self.ref_proj = torch.nn.Parameter(torch.randn(6, 3, generator=gen))
        self.calls = []

    def forward(self, x, t, cond, low_res=None):
        self.calls.append(len(x))
        if low_res is not None:
            x = torch.cat([x, F.interpolate(low_res, x.shape[-2:], mode="bilinear", align_corners=False)], 1)
        h = F.conv2d(x, self.conv, padding=1)
        h = h + (self.ref_proj @ cond.mean(dim=(2, 3)).T).T[:, :, None, None] + (t / 1000.0)[:, None, None, None]
        return torch.cat([h[:, :3], torch.tanh(h[:, 3:])], dim=1)


class TinyGlide(torch.nn.Module):
    """Stand-in for a GLIDE text model: forward(x_t, t, text=..., text_mask=...)."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(1)
        self.embed = torch.nn.Parameter(torch.randn(50, 6, generator=gen))

    def forward(self, x, t, text, text_mask):
        pooled = (self.embed[text] * text_mask[..., None]).sum(1) / text_mask.sum(1, keepdim=True).clamp(min=1)
        return x.repeat(1, 2, 1, 1) * 0.5 + pooled[:, :, None, None] + (t / 1000.0)[:, None, None, None]


# --- guided_eps --------------------------------------------------------------------


def test_ncf_restores_the_conditional_statistics():
    cond, uncond = random_eps(0)
    for w in (0.5, 3.0, 10.0):
        out = guided_eps(cond, uncond, w, "ncf")
        mu, sigma = stats(cond)
        mu_out, sigma_out = stats(out)
        torch.testing.assert_close(mu_out, mu, atol=1e-5, rtol=0)
        torch.testing.assert_close(sigma_out, sigma, atol=1e-5, rtol=1e-5)
        # ... while CF has shifted them (the problem eq. 8 fixes).
        mu_cf, sigma_cf = stats(guided_eps(cond, uncond, w, "cf"))
        assert (sigma_cf - sigma).abs().min() > 0.1 and (mu_cf - mu).abs().min() > 0.1


def test_cf_formula_and_piti_scale_convention():
    cond, uncond = random_eps(1)
    w = 2.5
    torch.testing.assert_close(guided_eps(cond, uncond, w, "cf"), cond + w * (cond - uncond))
    # The released PITI code writes uncond + s * (cond - uncond) with s = 1 + w.
    torch.testing.assert_close(guided_eps(cond, uncond, w, "cf"), uncond + (1 + w) * (cond - uncond))


def test_ncf_is_cf_renormalized_per_sample():
    cond, uncond = random_eps(2)
    cf = guided_eps(cond, uncond, 4.0, "cf")
    ncf = guided_eps(cond, uncond, 4.0, "ncf")
    # Per sample, NCF is an affine map of CF, so they are perfectly correlated.
    for a, b in zip(cf.flatten(1), ncf.flatten(1)):
        assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 1 - 1e-5


def test_w0_ncf_equals_cf_equals_cond():
    cond, uncond = random_eps(3)
    assert torch.equal(guided_eps(cond, uncond, 0.0, "cf"), cond)
    torch.testing.assert_close(guided_eps(cond, uncond, 0.0, "ncf"), cond, atol=1e-6, rtol=0)
    assert guided_eps(cond, uncond, 5.0, "none") is cond


def test_unknown_kind_raises():
    cond, uncond = random_eps(4)
    with pytest.raises(GuidanceError):
        guided_eps(cond, uncond, 1.0, "normalized")
    with pytest.raises(GuidanceError):
        make_guided_model_fn(TinyPITI(), {"cond": cond}, {"cond": cond}, 1.0, "CFG")


# --- batched guided model ------------------------------------------------------------


@pytest.mark.parametrize("guidance", ["cf", "ncf"])
def test_batched_model_fn_equals_two_separate_calls_piti_upsampler(guidance):
    model = TinyPITI(upsampler=True)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 16, 16, generator=gen)
    t = torch.tensor([10.0, 500.0])
    ref = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1
    low_res = torch.rand(2, 3, 8, 8, generator=gen) * 2 - 1
    fn = make_guided_model_fn(model, {"cond": ref, "low_res": low_res}, {"cond": torch.ones_like(ref)}, 3.0, guidance)
    with torch.no_grad():
        out = fn(x, t)
        assert model.calls == [4]  # one forward over both branches
        cond = model(x, t, cond=ref, low_res=low_res)
        uncond = model(x, t, cond=torch.ones_like(ref), low_res=low_res)
    expected = torch.cat([guided_eps(cond[:, :3], uncond[:, :3], 3.0, guidance), cond[:, 3:]], dim=1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_batched_model_fn_glide_text_kwargs():
    model = TinyGlide()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    t = torch.tensor([3.0, 700.0])
    tokens = torch.tensor([[5, 9, 0, 0], [7, 1, 2, 0]])
    mask = tokens != 0
    null = {"text": torch.zeros_like(tokens), "text_mask": torch.zeros_like(mask)}
    fn = make_guided_model_fn(model, {"text": tokens, "text_mask": mask}, null, 2.0, "cf")
    cond, uncond = model(x, t, tokens, mask), model(x, t, **null)
    expected = torch.cat([cond[:, :3] + 2.0 * (cond[:, :3] - uncond[:, :3]), cond[:, 3:]], dim=1)
    torch.testing.assert_close(fn(x, t), expected, atol=1e-6, rtol=1e-6)


def test_batch_condition_kwargs_rules():
    ref, low_res = torch.rand(2, 3, 4, 4), torch.rand(2, 3, 2, 2)
    batched = batch_condition_kwargs({"cond": ref, "low_res": low_res, "flag": True}, {"cond": -ref})
    assert torch.equal(batched["cond"], torch.cat([ref, -ref]))
    assert torch.equal(batched["low_res"], torch.cat([low_res, low_res]))
    assert batched["flag"] is True
    with pytest.raises(GuidanceError):
        batch_condition_kwargs({"cond": ref}, {"cond": ref[:1]})
    with pytest.raises(GuidanceError):
        batch_condition_kwargs({"cond": ref}, {"text": ref})


def test_kind_none_runs_only_the_conditional_branch():
    model = TinyPITI()
    ref = torch.rand(2, 3, 8, 8)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1.0, 2.0])
    fn = make_guided_model_fn(model, {"cond": ref}, {"cond": torch.ones_like(ref)}, 3.0, "none")
    with torch.no_grad():
        assert torch.equal(fn(x, t), model(x, t, cond=ref))
    assert model.calls == [2, 2]


def test_guided_sampling_keeps_statistics_at_every_step():
    diffusion = GaussianDiffusion(get_named_beta_schedule("squaredcos_cap_v2", 1000), "10")
    model = TinyPITI()
    ref = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(7)) * 2 - 1
    guided = make_guided_model_fn(model, {"cond": ref}, {"cond": torch.ones_like(ref)}, 5.0, "ncf")
    checked = []

    def recording_fn(x, t):
        out = guided(x, t)
        mu, sigma = stats(model(x, t, cond=ref)[:, :3])
        mu_out, sigma_out = stats(out[:, :3])
        checked.append(bool(torch.allclose(mu_out, mu, atol=1e-5) and torch.allclose(sigma_out, sigma, atol=1e-5)))
        return out

    sample = diffusion.p_sample_loop(recording_fn, (2, 3, 8, 8), generator=torch.Generator().manual_seed(0),
                                     progress=False)
    assert checked == [True] * diffusion.num_timesteps
    assert torch.isfinite(sample).all()
