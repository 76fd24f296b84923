"""
Classifier-free guidance (CF) and PITI's normalized classifier-free guidance (NCF).

Paper section 3.4. The network is run with the condition y and with a null
condition (PITI: an all-ones condition picture; GLIDE: empty text), giving
eps_cond = eps(x_t | y) and eps_uncond = eps(x_t | null). Their difference
estimates the gradient of log p(y | x_t) (eq. 6). CF pushes away from the
unconditional prediction (eq. 7):

    eps_hat = eps_cond + w * (eps_cond - eps_uncond),      w >= 0.

This shifts the mean and inflates the variance of the predicted noise, and
the shift accumulates over the sampling steps (washed-out, over-saturated
images). NCF renormalizes eps_hat back to the statistics (mu, sigma) of
eps_cond (eq. 8):

    eps_tilde = sigma / sigma_hat * (eps_hat - mu_hat) + mu,

with mu, sigma (mu_hat, sigma_hat) the mean and standard deviation of eps_cond
(eps_hat) over all of one sample's C x H x W values. Whether the std is
biased or unbiased does not matter: only the ratio sigma / sigma_hat enters,
and both use the same count.

Convention for w: the paper's w (w = 0 is the plain conditional model). The
released PITI code writes uncond + s * (cond - uncond) with s = `sample_c` /
`guidance_scale`, which is the same thing with s = 1 + w (its default s = 1
means no guidance).
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
    """Keyword arguments for one forward pass over [cond batch; null batch].

    Every tensor in cond_kwargs is concatenated along the batch with the tensor of the same name
    in null_kwargs (PITI: cond and ones_like(cond); GLIDE: text/text_mask and the empty text). A
    tensor that has no null counterpart, like the upsampler's `low_res`, is shared by both halves
    and so is concatenated with itself. Non-tensor values are passed through.
    """
    unknown = set(null_kwargs) - set(cond_kwargs)
    if unknown:
        raise GuidanceError(f"null condition has keys {sorted(unknown)} that the condition lacks")
    batched = {}
    for name, value in cond_kwargs.items():
        if not torch.is_tensor(value):
            batched[name] = value
            continue
        null = null_kwargs.get(name, value)
        if not torch.is_tensor(null) or null.shape != value.shape:
            raise GuidanceError(
                f"null condition {name!r} must be a tensor of shape {tuple(value.shape)} like the condition")
        batched[name] = torch.cat([value, null.to(value.device, value.dtype)], dim=0)
    return batched

def make_guided_model_fn(model_call, cond_kwargs, null_kwargs, w, guidance="ncf"):
    """Wrap a conditional network as model_fn(x_t, t) -> B x 2C x H x W for the diffusion.

    model_call(x_t, t, **kwargs) is e.g. a PITI model (kwargs cond, low_res) or a GLIDE one (text,
    text_mask, low_res); cond_kwargs the condition for a batch of B, null_kwargs the null condition
    (same names and shapes; missing names are shared, see batch_condition_kwargs). Both branches
    run in ONE batched forward of size 2B. Guidance is applied to the epsilon channels only; the
    learned variance channels are the conditional branch's. With "none" only that branch runs.
    """
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
    """Does the model listen to its condition? Its noise-prediction error (eq. 3's MSE) on the same
    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, with the right condition, a wrong one (the batch's
    conditions rolled by one: another scene's) and the null condition, at a few of the 1000 steps;
    for a condition picture (`cond`) also with that picture mirrored left to right: the same classes
    in other places, and as likely a condition as the original (the training data is flipped too).

    The kwargs are the model's keyword arguments (train.py's `model_kwargs`); an upsampler's
    `low_res` stays the right one throughout. Returns {t: {"right", "wrong", "null", "ratio"[,
    "mirrored", "layout"]}} with ratio = wrong / right: about 1 for a model that ignores its
    condition, well above 1 for one that uses it (the right condition's error 20 % lower is 1.25);
    layout = mirrored / right: above 1 only if the model uses *where* the condition puts things, not
    just which things it holds (a model that reads only a mask's classes has ratio > 1, layout 1)."""
    if x0.shape[0] < 2:
        raise GuidanceError("condition_use needs at least two samples (it swaps their conditions)")
    diffusion = model_diffusion(model.config["noise_schedule"])  # the training schedule of the model
    wrong = {k: v if k == "low_res" else v.roll(1, 0) for k, v in cond_kwargs.items()}
    null_kwargs = {**cond_kwargs, **null_kwargs}  # names with no null (low_res) are shared, as in batch_condition_kwargs
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
