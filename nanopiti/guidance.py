"""Classifier-free guidance (CF) and PITI's normalized classifier-free guidance (NCF), paper section 3.4.

The network runs with the condition y and with a null one (PITI: an all-ones condition picture; GLIDE: empty
text): eps_cond - eps_uncond estimates the gradient of log p(y | x_t) (eq. 6). CF pushes away from eps_uncond:

    eps_hat = eps_cond + w * (eps_cond - eps_uncond),      w >= 0          (eq. 7)

which shifts the mean and inflates the variance of the noise, a shift that accumulates over the steps
(washed-out, over-saturated images). NCF renormalizes eps_hat to eps_cond's per-sample mean and std:

    eps_tilde = sigma / sigma_hat * (eps_hat - mu_hat) + mu                (eq. 8)

(biased or unbiased std does not matter: only the ratio enters). w is the paper's (0: the plain conditional
model); the PITI release's s = `sample_c` / `guidance_scale` is 1 + w.
"""

import torch

from .diffusion import model_diffusion

GUIDANCES = ("ncf", "cf", "none")

class GuidanceError(ValueError):
    """Guidance settings or conditions that cannot be used."""

def _check(guidance):
    if guidance not in GUIDANCES:
        raise GuidanceError(f"unknown guidance {guidance!r}: use one of {', '.join(GUIDANCES)}")

def guided_eps(eps_cond, eps_uncond, w, guidance="ncf"):
    """Combine conditional and unconditional noise predictions (B x C x H x W each) with strength w
    (paper convention, w = 0: no guidance): "cf" (eq. 7), "ncf" (eq. 7 then eq. 8) or "none"."""
    _check(guidance)
    if guidance == "none":
        return eps_cond
    eps_hat = eps_cond + w * (eps_cond - eps_uncond)
    if guidance == "cf":
        return eps_hat
    dims = tuple(range(1, eps_cond.ndim))  # per sample: over C, H, W
    mu, sigma = eps_cond.mean(dims, keepdim=True), eps_cond.std(dims, keepdim=True)
    mu_hat, sigma_hat = eps_hat.mean(dims, keepdim=True), eps_hat.std(dims, keepdim=True)
    return sigma / sigma_hat * (eps_hat - mu_hat) + mu

def batch_condition_kwargs(cond_kwargs, null_kwargs):
    """Keyword arguments for one forward pass over [cond batch; null batch]: each tensor concatenated with its
    namesake in null_kwargs, or with itself when it has none (the upsampler's `low_res`); non-tensors as they are."""
    if unknown := set(null_kwargs) - set(cond_kwargs):
        raise GuidanceError(f"null condition has keys {sorted(unknown)} that the condition lacks")
    batched = dict(cond_kwargs)
    for name, value in cond_kwargs.items():
        if torch.is_tensor(value):
            null = null_kwargs.get(name, value)
            if not torch.is_tensor(null) or null.shape != value.shape:
                raise GuidanceError(f"null condition {name!r} must be a tensor of shape {tuple(value.shape)}")
            batched[name] = torch.cat([value, null.to(value.device, value.dtype)], dim=0)
    return batched

def make_guided_model_fn(model_call, cond_kwargs, null_kwargs, w, guidance="ncf"):
    """Wrap model_call(x_t, t, **kwargs) (a PITI or GLIDE model) as model_fn(x_t, t) -> B x 2C x H x W: both
    branches in ONE forward of size 2B (batch_condition_kwargs), guidance on the epsilon channels only, the
    variance channels the conditional branch's. With "none" only that branch runs."""
    _check(guidance)
    if guidance == "none":
        return lambda x_t, t: model_call(x_t, t, **cond_kwargs)
    batched = batch_condition_kwargs(cond_kwargs, null_kwargs)
    def model_fn(x_t, t):
        out_cond, out_null = model_call(torch.cat([x_t, x_t]), torch.cat([t, t]), **batched).split(len(x_t))
        c = x_t.shape[1]
        return torch.cat([guided_eps(out_cond[:, :c], out_null[:, :c], w, guidance), out_cond[:, c:]], dim=1)
    return model_fn

@torch.no_grad()
def condition_use(model, x0, cond_kwargs, null_kwargs, timesteps=(300, 500, 700), seed=0):
    """Does the model listen to its condition? Its noise-prediction error (eq. 3) on the same x_t at a few steps
    with the right condition, a wrong one (rolled by one in the batch), the null one and, for a picture `cond`,
    the picture mirrored (same classes elsewhere). kwargs as train.py's `model_kwargs` (`low_res` stays right).
    Returns {t: {"right", "wrong", "null", "ratio"[, "mirrored", "layout"]}}: ratio = wrong / right is about 1
    for a model that ignores its condition; layout = mirrored / right > 1 only if it uses *where* things are."""
    if x0.shape[0] < 2:
        raise GuidanceError("condition_use needs at least two samples (it swaps their conditions)")
    diffusion = model_diffusion(model.config["noise_schedule"])  # the training schedule of the model
    wrong = {k: v if k == "low_res" else v.roll(1, 0) for k, v in cond_kwargs.items()}
    null_kwargs = {**cond_kwargs, **null_kwargs}  # names with no null (low_res) are shared, as when batched
    gen = torch.Generator(device=x0.device).manual_seed(seed)
    out = {}
    for step in timesteps:
        t = torch.full((x0.shape[0],), step, device=x0.device, dtype=torch.long)
        noise = torch.randn(x0.shape, generator=gen, device=x0.device)
        x_t = diffusion.q_sample(x0, t, noise)
        def error(kwargs):
            eps = model(x_t, diffusion.model_timesteps(t), **kwargs)[:, :3]
            return float(((eps.float() - noise) ** 2).mean())
        right = max(error(cond_kwargs), 1e-12)
        out[step] = {"right": right, "wrong": error(wrong), "null": error(null_kwargs)}
        out[step]["ratio"] = out[step]["wrong"] / right
        if "cond" in cond_kwargs:
            out[step]["mirrored"] = error({**cond_kwargs, "cond": cond_kwargs["cond"].flip(-1)})
            out[step]["layout"] = out[step]["mirrored"] / right
    return out
