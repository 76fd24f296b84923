"""The condition measure (nanopiti.guidance.condition_use): does a model listen to its condition?"""

from pathlib import Path

import pytest
import torch

from nanopiti import build_model, load_model, toy_config
from nanopiti.diffusion import model_diffusion
from nanopiti.guidance import GuidanceError, condition_use
from nanopiti.timesteps import high_noise_timesteps


class Oracle(torch.nn.Module):
    """Knows x0 from its condition (cond = x0 plus a little noise), so it predicts the noise of x_t
    almost exactly from the right condition and badly from another one: a model that listens."""

    def __init__(self):
        super().__init__()
        self.config = {"noise_schedule": "squaredcos_cap_v2"}
        self.diffusion = model_diffusion(self.config["noise_schedule"])

    def forward(self, x_t, t, cond=None):
        abar = self.diffusion.alphas_cumprod.float()[t.long()].view(-1, 1, 1, 1)  # t: the 0..999 steps, as floats
        eps = (x_t - abar.sqrt() * cond) / (1 - abar).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], 1)


def scenes(n=6, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    return x0, g


def test_oracle_listens():
    x0, g = scenes()
    cond_picture = x0 + 0.01 * torch.randn(x0.shape, generator=g)
    use = condition_use(Oracle(), x0, {"cond": cond_picture}, {"cond": torch.ones_like(cond_picture)})
    assert sorted(use) == [300, 500, 700]
    for t, v in use.items():
        assert v["right"] < 1e-2 < v["wrong"], (t, v)
        assert v["ratio"] == pytest.approx(v["wrong"] / v["right"]) and v["ratio"] > 20
        assert v["null"] > v["right"]
        assert v["layout"] == pytest.approx(v["mirrored"] / v["right"]) and v["layout"] > 20  # it reads places too


def test_model_that_ignores_its_condition():
    """A toy PITI model whose decoder never reads the tokens or the pooled vector: ratio exactly 1."""
    torch.manual_seed(0)
    model = build_model(toy_config("piti")).eval()
    with torch.no_grad():
        for name, p in model.decoder.named_parameters():
            if "encoder_kv" in name or "transformer_proj" in name:
                p.zero_()
            elif "out.2" in name:  # the zero-initialized output conv: give the model an output
                p.normal_(0, 0.1)
    x0, g = scenes(4)
    cond_picture = torch.rand(4, 3, 128, 128, generator=g) * 2 - 1
    use = condition_use(model, x0, {"cond": cond_picture}, {"cond": torch.ones_like(cond_picture)}, timesteps=(500,))
    assert use[500]["ratio"] == use[500]["layout"] == 1.0
    assert use[500]["right"] == use[500]["wrong"] == use[500]["null"] == use[500]["mirrored"] > 0


def test_model_that_reads_only_which_colors_its_condition_holds():
    """Knows the mean color of x0 from the condition's mean: better with the right condition than
    with another scene's (ratio > 1), but blind to where things are (mirrored: layout exactly 1)."""
    class MeanOnly(Oracle):
        def forward(self, x_t, t, cond=None):
            return super().forward(x_t, t, cond=cond.mean((2, 3), keepdim=True).expand_as(x_t))

    g = torch.Generator().manual_seed(0)
    x0 = (torch.rand(6, 3, 1, 1, generator=g) * 2 - 1) * 0.8 + 0.2 * torch.rand(6, 3, 32, 32, generator=g)
    use = condition_use(MeanOnly(), x0, {"cond": x0}, {"cond": torch.ones_like(x0)})
    for v in use.values():
        assert v["ratio"] > 2 and v["layout"] == pytest.approx(1.0, abs=1e-6)


def test_upsampler_keeps_its_low_res_and_needs_two_samples():
    class LowResOnly(Oracle):  # reads only low_res: swapping conditions must not change it
        def forward(self, x_t, t, cond=None, low_res=None):
            return super().forward(x_t, t, cond=low_res)

    x0, g = scenes()
    kwargs = {"cond": torch.randn(x0.shape, generator=g), "low_res": x0 + 0.1 * torch.randn(x0.shape, generator=g)}
    use = condition_use(LowResOnly(), x0, kwargs, {"cond": torch.ones_like(x0)}, timesteps=(500,))
    assert use[500]["ratio"] == 1.0 and use[500]["null"] == use[500]["right"]
    with pytest.raises(GuidanceError, match="at least two"):
        condition_use(Oracle(), x0[:1], {"cond": x0[:1]}, {"cond": x0[:1]})


def test_copy_task_learns_where_its_condition_puts_things():
    """The copy task (the image is its own mask, so the mask decides it) as a threshold: with the toy
    encoder's start (ConditionEncoder.toy_init) and timesteps drawn towards high noise, a small toy
    PITI model from scratch, trained as train.py does, reads *where* the mask puts each class within
    1,250 steps: the mirrored mask's error at least 10 % above the right one's at t = 500 on 16
    held-out scenes (measured 1.15, ratio 1.40 with the toy's 8 norm groups; 1.39 and 1.66 with 32; with
    PITI's init 1.005, with uniform timesteps 1.009, ratio 1.16 and 1.14: docs/results.md). About two
    minutes on one core."""
    from toyworld.data import ToyDataset
    from train import model_kwargs  # train.py's condition and its classifier-free dropout

    torch.manual_seed(0)
    config = dict(toy_config("piti"), image_size=16, channel_mult=[1, 2], attention_ds=[2], cond_size=64, encoder_width=32)

    def pairs(n, first):
        data = ToyDataset(n, "mask", resolution=16, cond_size=64, random_flip=False, first_scene=first, copy=True,
                          vary_appearance=False)
        samples = [data[i] for i in range(n)]
        return torch.stack([s["image"] for s in samples]), torch.stack([s["cond"] for s in samples])

    x_train, c_train = pairs(512, 0)
    x_val, c_val = pairs(16, 10**6)
    model = build_model(config)
    diffusion = model_diffusion(config["noise_schedule"])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(1250):
        i = torch.randint(0, len(x_train), (8,), generator=g)
        kwargs, _ = model_kwargs(model, {"cond": c_train[i]}, "cpu", drop=torch.rand(8, generator=g) < 0.2)
        t = high_noise_timesteps(8, 1000, "cpu", g)
        loss = diffusion.training_losses(lambda x, s: model(x, s, **kwargs), x_train[i], t, generator=g)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        use = condition_use(model.eval(), x_val, *model_kwargs(model, {"cond": c_val}, "cpu"), timesteps=(500,))[500]
    assert use["ratio"] > 1.25 and use["layout"] > 1.1, use


CHECKPOINTS = Path(__file__).resolve().parent.parent / "checkpoints"


def heldout_toy(task, resolution, n=16):
    """n held-out toy scenes of `task` and their captions; at 64 the upsampler's pairs, with 32x32 low-res pictures."""
    from toyworld.data import ToyDataset
    from toyworld.world import HELDOUT_SEED0

    data = ToyDataset(n, task, resolution=resolution, cond_size=128, random_flip=False,
                      upsampler=resolution == 64, low_res=32, first_scene=HELDOUT_SEED0, vary_appearance=False)
    samples = [data[i] for i in range(n)]
    pairs = {k: torch.stack([s[k] for s in samples]) for k in samples[0] if k in ("image", "cond", "low_res")}
    return {**pairs, "caption": [s["caption"] for s in samples]}


def condition_use_at_500(base, pairs):
    """A shipped base model's condition measure on `pairs` at t = 500 (wrong, null and for a picture mirrored, over
    right), with the condition (a picture or a caption) and its null as train.py gives them."""
    from train import model_kwargs

    return condition_use(base, pairs["image"], *model_kwargs(base, pairs, "cpu"), timesteps=(500,))[500]


def low_res_errors(up, pairs, noise):
    """An upsampler's noise error at t = 500 with each scene's own low-res picture, then with another scene's."""
    diffusion, t = model_diffusion(up.config["noise_schedule"]), torch.full((pairs["image"].shape[0],), 500)
    x_t = diffusion.q_sample(pairs["image"], t, noise)
    return [float(((up(x_t, diffusion.model_timesteps(t), cond=pairs["cond"], low_res=low)[:, :3] - noise) ** 2)
                  .mean()) for low in (pairs["low_res"], pairs["low_res"].roll(1, 0))]


def test_shipped_toy_models_follow_their_inputs():
    """The shipped toy models (checkpoints/), on 16 held-out scenes: the base model predicts the noise
    far better with its own mask than with another scene's or its own mirrored (t = 500), its predicted
    noise follows x_t's mean color at high noise (what the toy's 8 norm groups made possible; the upsampler's
    one group), and the upsampler predicts far better with its own low-res picture than with another's.
    Measured: ratio 4.91, layout 3.43, mean gain 0.43; upsampler: mean gain 0.76, low-res ratio 19.6 (the
    8-group upsampler shipped before it: 0.26 and 8.07)."""
    base, up = load_model(CHECKPOINTS / "toy_mask_base.pt"), load_model(CHECKPOINTS / "toy_mask_upsample.pt")
    small, large = heldout_toy("mask", 32), heldout_toy("mask", 64)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        use = condition_use_at_500(base, small)
        diffusion, t = model_diffusion(base.config["noise_schedule"]), torch.full((16,), 900)
        x_t = diffusion.q_sample(small["image"], t, torch.randn(small["image"].shape, generator=g))
        shift = torch.tensor([0.1, 0.0, 0.0]).view(1, 3, 1, 1)
        eps = [base(x, diffusion.model_timesteps(t), cond=small["cond"])[:, :3] for x in (x_t, x_t + shift)]
        gain = float((eps[1] - eps[0])[:, 0].mean() / 0.1)
        diffusion = model_diffusion(up.config["noise_schedule"])
        kw = dict(cond=large["cond"], low_res=large["low_res"])
        x_t = diffusion.q_sample(large["image"], torch.full((16,), 900), torch.randn(large["image"].shape, generator=g))
        eps = [up(x, diffusion.model_timesteps(torch.full((16,), 900)), **kw)[:, :3] for x in (x_t, x_t + shift)]
        up_gain = float((eps[1] - eps[0])[:, 0].mean() / 0.1)
        error = low_res_errors(up, large, torch.randn(large["image"].shape, generator=g))
    assert use["ratio"] > 2.5 and use["layout"] > 2.0, use
    assert gain > 0.25, gain  # the 32-group models: 0.018
    assert up_gain > 0.6, up_gain  # the upsampler with 8 groups: 0.26
    assert error[1] / error[0] > 10, error


@pytest.mark.parametrize("task", ["depth", "sketch"])
def test_shipped_toy_depth_and_sketch_models_follow_their_conditions(task):
    """checkpoints/toy_<task>_base.pt, on 16 held-out scenes at t = 500: its noise error with another scene's
    condition, and with its own mirrored, over the error with its own; toy_<task>_upsample.pt: its noise error
    with another scene's low-res picture over the error with its own. Measured: depth 1.362 and 1.233, upsampler
    15.3; sketch 1.988 and 1.764, upsampler 17.0."""
    base, up = load_model(CHECKPOINTS / f"toy_{task}_base.pt"), load_model(CHECKPOINTS / f"toy_{task}_upsample.pt")
    small, large = heldout_toy(task, 32), heldout_toy(task, 64)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        use = condition_use_at_500(base, small)
        error = low_res_errors(up, large, torch.randn(large["image"].shape, generator=g))
    assert use["ratio"] > 1.25 and use["layout"] > 1.15, use
    assert error[1] / error[0] > 10, error


def test_shipped_toy_text_prior_follows_its_captions():
    """checkpoints/toy_prior_base.pt, on 64 held-out scenes: its noise error at t = 500 with another scene's
    caption over the error with the scene's own (issue 12's target: 1.05), and the null caption in between.
    Measured 1.083 (1.064 and 1.067 at 128 scenes, two noise draws); the prior shipped before it (1,500 steps,
    32 norm groups): 1.020."""
    prior = load_model(CHECKPOINTS / "toy_prior_base.pt")
    with torch.no_grad():
        use = condition_use_at_500(prior, heldout_toy("mask", 32, n=64))
    assert use["ratio"] > 1.05 and use["right"] < use["null"] < use["wrong"], use
