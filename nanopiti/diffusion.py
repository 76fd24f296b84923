"""Gaussian diffusion with a learned-range variance, as used by GLIDE and PITI. The paper, section 3.1:

    q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)          (eq. 1)
    q(x_t | x_0)     = N(sqrt(abar_t) x_0, (1 - abar_t) I)             (eq. 2)

(the paper's alpha_t is abar_t = prod_i (1 - beta_i)). eps_theta(x_t, t) is trained with ||eps_theta - eps||^2
(eq. 3). As in GLIDE (and improved DDPM) the network has 6 output channels: epsilon and "variance values" v in
[-1, 1] that set log sigma_t^2 = (v + 1) / 2 * log beta_t + (1 - v) / 2 * log beta~_t, beta~_t being the
variance of q(x_{t-1} | x_t, x_0); the variance is trained by the variational bound ("hybrid" loss = MSE + VB).

Sampling "respaces": it keeps a subset of the 1000 steps, with betas recomputed to keep their abar; the network
still gets the ORIGINAL timestep (`model_timesteps`), which every method taking `model_fn(x_t, t_model) ->
B x 2C x H x W` applies itself. Numerics follow the original: float64 schedules, cast to x's dtype after gathering.
"""

import functools
import math

import numpy as np
import torch
from tqdm.auto import tqdm

class DiffusionError(ValueError):
    """A diffusion schedule, respacing or model output that cannot be used."""

def get_named_beta_schedule(name, num_steps):
    """Betas (float64 numpy array) of a named schedule: "linear", DDPM's (the upsamplers'), scaled to span 1000
    steps' noise levels; "squaredcos_cap_v2", improved DDPM's cosine (base models), each beta capped at 0.999."""
    if name == "linear":
        scale = 1000 / num_steps
        return np.linspace(scale * 0.0001, scale * 0.02, num_steps, dtype=np.float64)
    if name == "squaredcos_cap_v2":
        def alpha_bar(s):
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.array([min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), 0.999)
                         for i in range(num_steps)], dtype=np.float64)
    raise DiffusionError(f"unknown beta schedule {name!r}: use 'linear' or 'squaredcos_cap_v2'")

def model_diffusion(noise_schedule, respacing=""):
    """The process every GLIDE and PITI model was trained with (1000 steps), respaced to `respacing` for sampling."""
    return GaussianDiffusion(get_named_beta_schedule(noise_schedule, 1000), respacing)

def space_timesteps(num_timesteps, spec):
    """Sorted original timesteps kept by a respacing spec: "" all; "a,b,c" [0, T) cut into as many equal parts as
    numbers, a, b, c evenly spaced steps from each ("250": 250 steps); "ddimN" the integer stride giving N steps
    (DDIM); "fast27" GLIDE's upsampler schedule, "10,10,3,2,2" with step T-1 swapped for T-3 (fewer artifacts)."""
    spec = spec.strip()
    if spec == "":
        return list(range(num_timesteps))
    if spec.startswith("ddim"):
        count = _parse_int(spec[len("ddim"):], spec)
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == count:
                return list(range(0, num_timesteps, stride))
        raise DiffusionError(f"respacing {spec!r}: no integer stride gives {count} of {num_timesteps} steps")
    if spec == "fast27":
        return sorted(set(space_timesteps(num_timesteps, "10,10,3,2,2")) - {num_timesteps - 1} | {num_timesteps - 3})
    sections = [_parse_int(part, spec) for part in spec.split(",")]
    size_per, extra = divmod(num_timesteps, len(sections))
    steps, start = [], 0
    for i, count in enumerate(sections):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise DiffusionError(f"respacing {spec!r}: cannot take {count} steps from a section of {size}")
        stride = (size - 1) / (count - 1) if count > 1 else 1
        # The float position accumulates as in the original, so that round() breaks ties alike.
        pos = 0.0
        for _ in range(count):
            steps.append(start + round(pos))
            pos += stride
        start += size
    return sorted(set(steps))

def _parse_int(text, spec):
    try:
        return int(text)
    except ValueError:
        raise DiffusionError(f"bad respacing {spec!r}: use '' (all steps), counts like '250' or '10,10,3,2,2', "
                             "'ddimN' or 'fast27'") from None

def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats (the variational bound's terms)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))

def _approx_standard_normal_cdf(x):
    # The tanh approximation of Phi used by the original code (kept for exactness).
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))

def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log P(x) of 8-bit images x in [-1, 1] under N(means, e^(2 log_scales)): each pixel value owns a bin of
    width 2/255, and the two extreme values own the whole tails."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))

def _randn(shape, device, generator):
    """Standard normal noise; drawn on the generator's device when one is given."""
    if generator is None:
        return torch.randn(shape, device=device)
    return torch.randn(shape, generator=generator, device=generator.device).to(device)

class GaussianDiffusion:
    """Training and sampling for the ORIGINAL schedule's `betas`, respaced by `respacing` (space_timesteps): q_* is
    the forward process, p_* and ddim_* the reverse one; `t` indexes the respaced schedule, `model_timesteps(t)` is
    what the network receives."""

    def __init__(self, betas, respacing=""):
        base_betas = torch.as_tensor(np.asarray(betas, dtype=np.float64))
        if base_betas.ndim != 1 or not bool(((base_betas > 0) & (base_betas <= 1)).all()):
            raise DiffusionError("betas must be a 1-D array of values in (0, 1]")
        self.original_num_steps = len(base_betas)
        kept = space_timesteps(self.original_num_steps, respacing)
        if len(kept) < 2:
            raise DiffusionError(f"respacing {respacing!r} keeps {len(kept)} step(s); at least 2 are needed")
        self.timestep_map = torch.tensor(kept, dtype=torch.long)

        # New betas that keep the original abar: 1 - beta'_k = abar(t_k) / abar(t_{k-1}).
        base_abar = torch.cumprod(1.0 - base_betas, dim=0)[self.timestep_map]
        betas = 1.0 - base_abar / torch.cat([torch.ones(1, dtype=torch.float64), base_abar[:-1]])
        self.betas, self.num_timesteps = betas, len(betas)

        alphas = 1.0 - betas
        abar = torch.cumprod(alphas, dim=0)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        self.alphas_cumprod, self.alphas_cumprod_prev = abar, abar_prev
        self.sqrt_alphas_cumprod = abar.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - abar).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / abar).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / abar - 1.0).sqrt()
        self.log_betas = betas.log()

        # Posterior q(x_{t-1} | x_t, x_0) = N(c1 x_0 + c2 x_t, beta~_t); beta~_0 = 0: the "clipped" log takes beta~_1.
        posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
        self.posterior_log_variance_clipped = torch.cat([posterior_variance[1:2], posterior_variance[1:]]).log()
        self.posterior_mean_coef1 = betas * abar_prev.sqrt() / (1.0 - abar)
        self.posterior_mean_coef2 = (1.0 - abar_prev) * alphas.sqrt() / (1.0 - abar)

    @staticmethod
    def _extract(arr, t, x):
        """arr[t] as x's dtype, shaped [B, 1, 1, ...] to broadcast against x."""
        return arr.to(t.device)[t].to(x.dtype).view(-1, *([1] * (x.ndim - 1)))

    def model_timesteps(self, t):
        """The timestep the network sees: the original step, on a 0..1000 scale."""
        return self.timestep_map.to(t.device)[t].float() * (1000.0 / self.original_num_steps)

    def _split_output(self, model_output, x):
        B, C = x.shape[:2]
        if model_output.shape != (B, 2 * C, *x.shape[2:]):
            raise DiffusionError(f"model output has shape {tuple(model_output.shape)}, expected "
                                 f"{(B, 2 * C, *x.shape[2:])} (epsilon and learned-range variance values)")
        return model_output.split(C, dim=1)

    def q_sample(self, x_start, t, noise):
        """Sample x_t ~ q(x_t | x_0) (eq. 2): sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, eps = `noise`."""
        return (self._extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
                + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean and clipped log variance of q(x_{t-1} | x_t, x_0)."""
        mean = (self._extract(self.posterior_mean_coef1, t, x_t) * x_start
                + self._extract(self.posterior_mean_coef2, t, x_t) * x_t)
        return mean, self._extract(self.posterior_log_variance_clipped, t, x_t)

    def predict_xstart_from_eps(self, x_t, t, eps):
        """Invert eq. 2: x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
        return (self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
                - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps)

    def predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return ((self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_xstart)
                / self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t))

    def p_mean_variance(self, model, x_t, t, clip_denoised=True):
        """p(x_{t-1} | x_t) from `model` (a model_fn(x_t, t_model) or its B x 2C x H x W output): mean, variance,
        log_variance and pred_xstart (clipped to [-1, 1] when clip_denoised)."""
        model_output = model(x_t, self.model_timesteps(t)) if callable(model) else model
        eps, var_values = self._split_output(model_output, x_t)
        # Learned range: v in [-1, 1] interpolates between the two log variances.
        min_log = self._extract(self.posterior_log_variance_clipped, t, x_t)
        max_log = self._extract(self.log_betas, t, x_t)
        frac = (var_values + 1) / 2
        log_variance = frac * max_log + (1 - frac) * min_log

        pred_xstart = self.predict_xstart_from_eps(x_t, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return {"mean": mean, "variance": torch.exp(log_variance), "log_variance": log_variance,
                "pred_xstart": pred_xstart}

    def p_sample(self, model_fn, x_t, t, generator=None):
        """One ancestral (DDPM) step: x_{t-1} ~ N(mean, sigma_t^2), no noise at t = 0."""
        out = self.p_mean_variance(model_fn, x_t, t)
        nonzero = (t != 0).to(x_t.dtype).view(-1, *([1] * (x_t.ndim - 1)))
        sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * _randn(x_t.shape, x_t.device, generator)
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample(self, model_fn, x_t, t, eta=0.0, generator=None):
        """One DDIM step (Song et al., eq. 12); eta = 0 is deterministic."""
        out = self.p_mean_variance(model_fn, x_t, t)
        # Re-derive epsilon from the (clipped) x_0 so that both stay consistent.
        eps = self.predict_eps_from_xstart(x_t, t, out["pred_xstart"])
        abar = self._extract(self.alphas_cumprod, t, x_t)
        abar_prev = self._extract(self.alphas_cumprod_prev, t, x_t)
        sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
        mean = out["pred_xstart"] * torch.sqrt(abar_prev) + torch.sqrt(1 - abar_prev - sigma ** 2) * eps
        nonzero = (t != 0).to(x_t.dtype).view(-1, *([1] * (x_t.ndim - 1)))
        if eta > 0:
            mean = mean + nonzero * sigma * _randn(x_t.shape, x_t.device, generator)
        return {"sample": mean, "pred_xstart": out["pred_xstart"]}

    @torch.no_grad()
    def p_sample_loop(self, model_fn, shape, noise=None, temperature=1.0, device=None, generator=None, progress=True,
                      callback=None):
        """Ancestral sampling from x_T = temperature * noise (fresh N(0, I) by default; the upsamplers: 0.997) to
        x_0. `callback(done, total)` is called after every step (demo.py's progress bar)."""
        step = functools.partial(self.p_sample, model_fn, generator=generator)
        return self._loop(step, "ddpm", shape, noise, temperature, device, generator, progress, callback)

    @torch.no_grad()
    def ddim_sample_loop(self, model_fn, shape, noise=None, temperature=1.0, eta=0.0, device=None, generator=None,
                         progress=True, callback=None):
        """DDIM sampling from x_T to x_0; with eta = 0 the result is a function of x_T."""
        step = functools.partial(self.ddim_sample, model_fn, eta=eta, generator=generator)
        return self._loop(step, "ddim", shape, noise, temperature, device, generator, progress, callback)

    def _loop(self, step, desc, shape, noise, temperature, device, generator, progress, callback):
        if noise is None:
            noise = _randn(tuple(shape), device or "cpu", generator)
        elif tuple(noise.shape) != tuple(shape):
            raise DiffusionError(f"noise has shape {tuple(noise.shape)} but shape {tuple(shape)} was asked for")
        x = noise.to(device or noise.device) * temperature
        for i in tqdm(range(self.num_timesteps - 1, -1, -1), desc=desc, disable=not progress):
            x = step(x, torch.full((shape[0],), i, device=x.device, dtype=torch.long))["sample"]
            if callback is not None:
                callback(self.num_timesteps - i, self.num_timesteps)
        return x

    def sample_timesteps(self, batch, device, generator=None):
        """Uniform random timesteps in [0, num_timesteps)."""
        gen_device = generator.device if generator is not None else device
        return torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=gen_device).to(device)

    def _vb_terms_bpd(self, model_output, x_start, x_t, t):
        """The variational bound's term per sample in bits per dimension: KL(q(x_{t-1} | x_t, x_0) ||
        p(x_{t-1} | x_t)) for t > 0, the decoder NLL -log p(x_0 | x_1) for t = 0."""
        true_mean, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t, clip_denoised=False)
        kl = normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"]).mean(dim=(1, 2, 3)) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])
        nll = nll.mean(dim=(1, 2, 3)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(self, model_fn, x_start, t, noise=None, generator=None):
        """The hybrid loss of improved DDPM / GLIDE / PITI, per sample: "mse" (eq. 3), "vb" (epsilon detached, so it
        trains only the variance; scaled by num_timesteps / 1000, RESCALED_MSE), "loss" = mse + vb, "x_t", and
        "pred_xstart": x_0 from the live epsilon, clipped, with gradients (for the losses of eqs. 4-5)."""
        if noise is None:
            noise = _randn(x_start.shape, x_start.device, generator)
        x_t = self.q_sample(x_start, t, noise)
        eps, var_values = self._split_output(model_fn(x_t, self.model_timesteps(t)), x_t)

        frozen = torch.cat([eps.detach(), var_values], dim=1)
        vb = self._vb_terms_bpd(frozen, x_start, x_t, t) * (self.num_timesteps / 1000.0)
        mse = ((noise - eps) ** 2).mean(dim=(1, 2, 3))
        pred_xstart = self.predict_xstart_from_eps(x_t, t, eps).clamp(-1, 1)
        return {"mse": mse, "vb": vb, "loss": mse + vb, "pred_xstart": pred_xstart, "x_t": x_t}
