"""Gaussian diffusion: golden values from the original code, respacing, losses, samplers."""

import numpy as np
import pytest
import torch

from nanopiti.diffusion import (
    DiffusionError,
    GaussianDiffusion,
    get_named_beta_schedule,
    space_timesteps,
)
from nanopiti.timesteps import LossAwareTimesteps, high_noise_timesteps

@pytest.fixture(scope="module")
def ref(golden):
    return golden.load("diffusion.pt")  # golden values of the original code, see tests/golden/README.md


def make(schedule="squaredcos_cap_v2", respacing=""):
    return GaussianDiffusion(get_named_beta_schedule(schedule, 1000), respacing)


class FakeModel(torch.nn.Module):
    """A tiny stand-in for the UNet: epsilon and variance values from a 1x1 conv and t."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.weight = torch.nn.Parameter(0.3 * torch.randn(6, 3, generator=gen))

    def forward(self, x, t):
        out = torch.einsum("oc,bchw->bohw", self.weight, x) + (t / 1000.0).view(-1, 1, 1, 1)
        return torch.cat([out[:, :3], torch.tanh(out[:, 3:])], dim=1)


# --- golden values of the original code ---------------------------------------------


@pytest.mark.parametrize("name", ["squaredcos_cap_v2", "linear"])
def test_beta_schedules_match_reference(ref, name):
    np.testing.assert_allclose(get_named_beta_schedule(name, 1000), ref["betas"][name].numpy(), rtol=0, atol=1e-15)


def test_every_respacing_matches_reference(ref):
    for spec, steps in ref["respacing"].items():
        assert space_timesteps(1000, spec) == list(steps), spec


@pytest.mark.parametrize("index", range(4))
def test_case_matches_reference(ref, index):
    case = ref["cases"][index]
    diffusion = make(case["schedule"], case["respacing"])
    assert diffusion.num_timesteps == case["num_timesteps"]
    t, model_output = case["t"], case["model_output"]
    seen = []

    def model_fn(x, t_model):
        seen.append(t_model)
        return model_output

    pmv = diffusion.p_mean_variance(model_fn, case["x_t"], t)
    losses = diffusion.training_losses(model_fn, case["x_start"], t, case["noise"])
    got = {
        "model_saw_t": seen[0],
        "q_sample": diffusion.q_sample(case["x_start"], t, case["noise"]),
        "p_mean": pmv["mean"],
        "p_variance": pmv["variance"],
        "p_log_variance": pmv["log_variance"],
        "pred_xstart": pmv["pred_xstart"],
        "ddim_sample_eta0": diffusion.ddim_sample(model_fn, case["x_t"], t, eta=0.0)["sample"],
        "loss_mse": losses["mse"],
        "loss_vb": losses["vb"],
        "loss": losses["loss"],
    }
    assert len(seen) == 3  # p_mean_variance, training_losses, ddim_sample each call the model once
    for key, value in got.items():
        assert value.shape == case[key].shape, key
        torch.testing.assert_close(value, case[key], rtol=0, atol=1e-5, msg=key)
    # A model output passed directly gives the same result as a callable.
    torch.testing.assert_close(diffusion.p_mean_variance(model_output, case["x_t"], t)["mean"], pmv["mean"])


# --- respacing -----------------------------------------------------------------


def test_respacing_forms():
    assert space_timesteps(1000, "") == list(range(1000))
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    fast = space_timesteps(1000, "fast27")
    assert len(fast) == 27 and fast[-1] == 997 and 999 not in fast
    assert space_timesteps(10, "2,3") == [0, 4, 5, 7, 9]


@pytest.mark.parametrize("spec", ["abc", "ddimx", "ddim999", "2000", "0", "1"])
def test_bad_respacing_raises(spec):
    with pytest.raises(DiffusionError):
        make(respacing=spec)


def test_respaced_schedule_keeps_alpha_bar_and_maps_timesteps():
    base, spaced = make("linear"), make("linear", "fast27")
    kept = space_timesteps(1000, "fast27")
    torch.testing.assert_close(spaced.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-12, atol=0)
    t = torch.arange(27)
    assert spaced.model_timesteps(t).tolist() == [float(s) for s in kept]


# --- forward process and losses ----------------------------------------------------


def test_q_sample_inverts_through_predict_xstart():
    diffusion = make(respacing="100")
    gen = torch.Generator().manual_seed(1)
    # float64 inputs get float64 coefficients: at t = 99 abar is ~1e-5, which float32 cannot invert.
    x0 = torch.rand(4, 3, 8, 8, generator=gen, dtype=torch.float64) * 2 - 1
    eps = torch.randn(4, 3, 8, 8, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 10, 50, 99])
    x_t = diffusion.q_sample(x0, t, eps)
    assert x_t.dtype == torch.float64
    torch.testing.assert_close(diffusion.predict_xstart_from_eps(x_t, t, eps), x0, atol=1e-10, rtol=0)
    torch.testing.assert_close(diffusion.predict_eps_from_xstart(x_t, t, x0), eps, atol=1e-10, rtol=0)


def test_training_losses_gradients():
    diffusion = make(respacing="250")
    model = FakeModel()
    gen = torch.Generator().manual_seed(2)
    x0 = torch.rand(3, 3, 8, 8, generator=gen) * 2 - 1
    t = torch.tensor([0, 100, 249])
    captured = {}

    def model_fn(x, t_model):
        captured["out"] = out = model(x, t_model)
        out.retain_grad()
        return out

    losses = diffusion.training_losses(model_fn, x0, t, generator=gen)
    assert set(losses) == {"mse", "vb", "loss", "pred_xstart", "x_t"}
    assert all(losses[k].shape == (3,) for k in ("mse", "vb", "loss"))
    # The VB term trains only the variance channels: the epsilon channels are frozen.
    losses["vb"].sum().backward(retain_graph=True)
    grad = captured["out"].grad
    assert grad[:, :3].abs().max() == 0 and grad[:, 3:].abs().max() > 0
    # pred_xstart keeps its graph to the epsilon channels (for perceptual/adversarial losses).
    captured["out"].grad = None
    losses["pred_xstart"].sum().backward()
    assert captured["out"].grad[:, :3].abs().max() > 0
    assert losses["pred_xstart"].abs().max() <= 1


def test_wrong_output_channels_raise():
    diffusion = make(respacing="10")
    x = torch.zeros(2, 3, 4, 4)
    with pytest.raises(DiffusionError):
        diffusion.p_mean_variance(lambda x, t: torch.zeros(2, 3, 4, 4), x, torch.tensor([1, 2]))


# --- sampling loops --------------------------------------------------------------


@pytest.mark.parametrize("method", ["p_sample_loop", "ddim_sample_loop"])
def test_sampling_loops_are_deterministic_under_a_generator(method):
    diffusion = make("linear", "fast27")
    model = FakeModel()
    loop = getattr(diffusion, method)
    kwargs = {"eta": 0.5} if method == "ddim_sample_loop" else {}

    def run(seed):
        return loop(model, (2, 3, 8, 8), generator=torch.Generator().manual_seed(seed), progress=False, **kwargs)

    a, b, c = run(0), run(0), run(1)
    assert a.shape == (2, 3, 8, 8) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_temperature_scales_initial_noise_and_ddim_eta0_is_deterministic():
    diffusion = make(respacing="ddim50")
    model = FakeModel()
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    a = diffusion.ddim_sample_loop(model, noise.shape, noise=noise, temperature=0.997, progress=False)
    b = diffusion.ddim_sample_loop(model, noise.shape, noise=noise * 0.997, progress=False)
    torch.testing.assert_close(a, b)
    # With eta = 0, no random numbers are drawn: the global RNG state does not matter.
    torch.manual_seed(123)
    c = diffusion.ddim_sample_loop(model, noise.shape, noise=noise * 0.997, progress=False)
    assert torch.equal(b, c)


def test_p_sample_adds_no_noise_at_t0():
    diffusion = make(respacing="10")
    model = FakeModel()
    x = torch.randn(2, 3, 8, 8)
    t = torch.zeros(2, dtype=torch.long)
    out = diffusion.p_sample(model, x, t, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out["sample"], diffusion.p_mean_variance(model, x, t)["mean"])


# --- timestep samplers -------------------------------------------------------------


def test_uniform_timesteps():
    diffusion = make(respacing="250")
    a = diffusion.sample_timesteps(1000, "cpu", torch.Generator().manual_seed(0))
    b = diffusion.sample_timesteps(1000, "cpu", torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 249 and len(a.unique()) > 200


def test_loss_aware_timesteps():
    timesteps = LossAwareTimesteps(4, history_per_term=2, uniform_prob=0.0)
    t, w = timesteps.sample(8, "cpu", torch.Generator().manual_seed(0))
    assert torch.equal(w, torch.ones(8))  # uniform until warmed up
    timesteps.update([0, 0, 1, 1, 2, 2, 3], [3.0, 4.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    assert np.allclose(timesteps.weights(), 1.0)  # timestep 3 still has one loss only
    timesteps.update(torch.tensor([3]), torch.tensor([1.0]))
    expected = np.array([np.sqrt(12.5), 1.0, 1.0, 1.0])
    np.testing.assert_allclose(timesteps.weights(), expected / expected.sum())
    t, w = timesteps.sample(4000, "cpu", torch.Generator().manual_seed(0))
    p = expected / expected.sum()
    torch.testing.assert_close(w, torch.tensor(1 / (4 * p[t.numpy()]), dtype=torch.float32))
    assert abs((t == 0).float().mean().item() - p[0]) < 0.03
    # A full history shifts out the oldest loss.
    timesteps.update([0], [0.0])
    assert timesteps._history[0].tolist() == [4.0, 0.0]


def test_high_noise_timesteps_lean_linearly_to_the_end_of_the_chain():
    t = high_noise_timesteps(200_000, 1000, "cpu", torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and int(t.min()) >= 0 and int(t.max()) == 999
    # p(t) = (2t + 1) / T^2: mean 2T/3, half the draws above T / sqrt(2)
    assert abs(float(t.float().mean()) - 666.2) < 3
    assert abs(float((t >= 708).float().mean()) - 0.5) < 0.005
    again = high_noise_timesteps(200_000, 1000, "cpu", torch.Generator().manual_seed(0))
    assert torch.equal(t, again)
