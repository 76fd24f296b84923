"""The toy judge (docs/toy_world.md). The paper measures mask-to-image results with FID (realism) and, as SPADE and
OASIS do, by segmenting the samples and comparing with the input mask (faithfulness, mIoU). Here a small UNet segmenter
trained on toy renders judges: its held-out mIoU says how well (state it beside its numbers), its pooled features stand
in for Inception's in FID ("toy FID"). For the guidance comparison (paper Fig. 6: CF at large w over-saturates and
washes out detail, NCF does not): mean HSV saturation and the share of spectral energy at high frequencies."""

import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from .world import HELDOUT_SEED0, TOY_CLASSES, TOY_COLORS, render_scene

class EvaluateError(ValueError):
    """Bad input to the evaluator (wrong image layout, unreadable segmenter checkpoint)."""

def to_model_input(images, size=None):
    """uint8 N x H x W x 3 or float N x 3 x H x W in [-1, 1] -> float32 N x 3 x size x size."""
    if isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4 and images.shape[-1] == 3:
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    elif torch.is_tensor(images) and images.is_floating_point() and images.ndim == 4 and images.shape[1] == 3:
        x = images.detach().float().cpu()
    else:
        raise EvaluateError("images must be uint8 numpy N x H x W x 3 or a float tensor N x 3 x H x W in "
                            f"[-1, 1], got {type(images).__name__} of shape {tuple(np.shape(images))}")
    if size is not None and x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x

def labels_from_colors(color_maps):
    """Color-coded label maps (images, as to_model_input takes) -> class ids N x H x W: the nearest TOY_COLORS."""
    x = (to_model_input(color_maps) + 1) * 127.5
    palette = torch.from_numpy(TOY_COLORS.astype(np.float32))
    dist = ((x[:, None] - palette[None, :, :, None, None]) ** 2).sum(2)  # N x classes x H x W
    return dist.argmin(1)

# --- the segmenter ---

def _block(c_in, c_out, stride=1):
    # BatchNorm rather than a per-image norm (GroupNorm): at evaluation it uses fixed statistics, so
    # the features keep each image's brightness, contrast and color, which the toy FID must see.
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out),
                         nn.SiLU())

class ToySegmenter(nn.Module):
    """A small UNet, cheap on a CPU: stride-2 stem -> w (1/2) -> 2w (1/4) -> 4w (1/8), back up with skips to 1/2,
    class logits upsampled bilinearly to the input size."""

    def __init__(self, num_classes=len(TOY_CLASSES), width=16, size=64):
        super().__init__()
        self.config = {"num_classes": num_classes, "width": width, "size": size}
        self.size = size
        self.stem, self.enc1 = _block(3, width, stride=2), _block(width, width)
        self.enc2, self.enc3 = _block(width, 2 * width, stride=2), _block(2 * width, 4 * width, stride=2)
        self.dec2, self.dec1 = _block(6 * width, 2 * width), _block(3 * width, width)
        self.head = nn.Conv2d(width, num_classes, 1)

    def trunk(self, x):
        """The deepest features (1/8 resolution) and the last hidden layer (1/2 resolution)."""
        e1 = self.enc1(self.stem(x))
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        d2 = self.dec2(torch.cat([F.interpolate(e3, size=e2.shape[-2:]), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, size=e1.shape[-2:]), e1], 1))
        return e3, d1

    def forward(self, x):
        logits = self.head(self.trunk(x)[1])
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

def toy_batch(seeds, size):
    """Render scenes: uint8 images N x size x size x 3 and class ids N x size x size."""
    scenes = [render_scene(int(s), size) for s in seeds]
    return np.stack([s.image for s in scenes]), np.stack([s.label for s in scenes])

def _augment(x, gen):
    """Flips, and blur and noise on some images, so that blurry or grainy samples are judged fairly."""
    n = x.shape[0]
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    blurred = F.interpolate(F.avg_pool2d(x, 2), scale_factor=2.0, mode="bilinear", align_corners=False)
    blur = torch.rand(n, generator=gen) < 0.3
    x = torch.where(blur[:, None, None, None], blurred, x)
    sigma = 0.05 * torch.rand(n, 1, 1, 1, generator=gen)
    return x + sigma * torch.randn(x.shape, generator=gen), flip

def train_segmenter(num_images=1000, size=64, steps=1000, seed=0, batch_size=16, width=16, lr=1e-2):
    """Train a ToySegmenter on `num_images` toy renders at size x size (CPU, deterministic)."""
    gen = torch.Generator().manual_seed(seed)  # batches, augmentation; the global RNG is left alone
    seeds = 1_000_000 * (seed + 1) + np.arange(num_images)  # disjoint from HELDOUT_SEED0 + i
    images, labels = toy_batch(tqdm(seeds, desc="rendering toy scenes", leave=False), size)
    x_all, y_all = to_model_input(images), torch.from_numpy(labels).long()
    # Small classes (sun, clouds, houses) would be ignored by a plain loss: weight each class by
    # the inverse square root of its pixel frequency.
    freq = torch.bincount(y_all.flatten(), minlength=len(TOY_CLASSES)).double() + 1
    class_weight = (freq.sum() / freq).sqrt().float()
    class_weight /= class_weight.mean()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ToySegmenter(width=width, size=size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    for _ in tqdm(range(steps), desc="training the segmenter", leave=False):
        idx = torch.randint(0, num_images, (batch_size,), generator=gen)
        x, flip = _augment(x_all[idx], gen)
        y = torch.where(flip[:, None, None], y_all[idx].flip(-1), y_all[idx])
        loss = F.cross_entropy(model(x), y, weight=class_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()

@torch.no_grad()
def segment(model, images, batch_size=64):
    """Class ids N x size x size predicted at the segmenter's resolution."""
    x = to_model_input(images, model.size)
    return torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])

@torch.no_grad()
def features(model, images, batch_size=64):
    """Per image, the pixel means of the segmenter's deepest (4w) and last hidden (w) layers: float64 N x 5w."""
    x = to_model_input(images, model.size)
    batches = (model.trunk(x[i:i + batch_size]) for i in range(0, len(x), batch_size))
    return torch.cat([torch.cat([deep.mean((2, 3)), last.mean((2, 3))], 1) for deep, last in batches]).double().numpy()

def save_segmenter(model, path, **info):
    """Save weights, config and any extra info (e.g. the held-out mIoU) in one file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save({"kind": "nanopiti-toy-segmenter", "config": model.config,
                "state_dict": model.state_dict(), "info": info}, path)

def load_segmenter(path):
    """Load a segmenter saved by save_segmenter (its extra info in `model.info`)."""
    if not os.path.isfile(path):
        raise EvaluateError(f"no segmenter checkpoint at {path}; get_segmenter(path) trains and saves one")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, or not a torch file at all
        raise EvaluateError(f"cannot read segmenter checkpoint {path} ({type(e).__name__}); "
                            "delete it and retrain") from None
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "nanopiti-toy-segmenter":
        raise EvaluateError(f"{path} is not a nanopiti toy segmenter checkpoint")
    model = ToySegmenter(**ckpt["config"])
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError:
        raise EvaluateError(f"{path}: the weights do not fit their config; delete it and retrain") from None
    model.info = ckpt.get("info", {})
    return model.eval()

def get_segmenter(path, **train_kwargs):
    """Load the segmenter at `path`, or train one (train_segmenter's arguments), measure it and save it there."""
    if os.path.isfile(path):
        return load_segmenter(path)
    model = train_segmenter(**train_kwargs)
    model.info = {"heldout_miou": heldout_miou(model)}
    save_segmenter(model, path, **model.info)
    return model

# --- metrics ---

def _as_long_tensor(a):
    return a.long() if torch.is_tensor(a) else torch.from_numpy(np.ascontiguousarray(a)).long()

def miou(pred, target, num_classes=len(TOY_CLASSES), ignore_index=255):
    """Mean intersection over union over all pixels of all images; classes absent from both prediction and target
    are left out of the mean, target pixels equal to ignore_index ignored."""
    pred, target = _as_long_tensor(pred).flatten(), _as_long_tensor(target).flatten()
    if pred.shape != target.shape:
        raise EvaluateError(f"prediction and target differ in size: {pred.numel()} vs {target.numel()} pixels")
    keep = target != ignore_index
    pred, target = pred[keep], target[keep]
    confusion = torch.bincount(target * num_classes + pred, minlength=num_classes ** 2)
    confusion = confusion.view(num_classes, num_classes)  # rows: target class, columns: predicted
    inter = confusion.diag().double()
    union = confusion.sum(0).double() + confusion.sum(1).double() - inter
    return float((inter[union > 0] / union[union > 0]).mean())

def heldout_miou(model, n=200):
    """The segmenter's mIoU on n held-out toy renders: how well it can judge."""
    images, labels = toy_batch(HELDOUT_SEED0 + np.arange(n), model.size)
    return miou(segment(model, images), labels)

def frechet_distance_from_stats(mu1, sigma1, mu2, sigma2):
    """d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)) (FID's formula), the trace from the eigenvalues
    of M = S1^(1/2) S2 S1^(1/2): similar to S1 S2 but symmetric PSD, so eigh gives them real and stable."""
    mu1, mu2, s1, s2 = (torch.as_tensor(np.asarray(a), dtype=torch.float64) for a in (mu1, mu2, sigma1, sigma2))
    w, v = torch.linalg.eigh(s1)
    r = (v * w.clamp(min=0).sqrt()) @ v.T  # S1^(1/2)
    m = r @ s2 @ r
    tr_covmean = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    return float(((mu1 - mu2) ** 2).sum() + s1.trace() + s2.trace() - 2 * tr_covmean)

def frechet_distance(feats_a, feats_b):
    """Frechet distance between Gaussians fitted to two feature sets (N x D each)."""
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise EvaluateError(f"need two N x D feature sets with N >= 2, got {a.shape} and {b.shape}")
    return frechet_distance_from_stats(a.mean(0), np.cov(a, rowvar=False).reshape(a.shape[1], -1),
                                       b.mean(0), np.cov(b, rowvar=False).reshape(b.shape[1], -1))

def saturation(images):
    """Mean HSV saturation (max - min) / max over all pixels, in [0, 1]."""
    x = (to_model_input(images) + 1) / 2
    hi, lo = x.max(1).values, x.min(1).values
    return float(torch.where(hi > 0, (hi - lo) / hi.clamp(min=1e-8), torch.zeros_like(hi)).mean())

def high_frequency_energy(images, cutoff=0.25):
    """Share of the (mean-removed) luminance spectrum's energy above `cutoff` cycles per pixel
    (Nyquist is 0.5), averaged over images: low when detail is washed out."""
    x = (to_model_input(images) + 1) / 2
    gray = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    gray = gray - gray.mean((1, 2), keepdim=True)
    power = torch.fft.fft2(gray).abs() ** 2
    fy, fx = torch.fft.fftfreq(gray.shape[1]), torch.fft.fftfreq(gray.shape[2])
    high = (fy[:, None] ** 2 + fx[None, :] ** 2).sqrt() > cutoff
    return float((power[:, high].sum(1) / power.sum((1, 2)).clamp(min=1e-12)).mean())

def evaluate_samples(model, samples, labels, reference=None):
    """All toy metrics of `samples` for the label maps `labels` (class ids N x H x W): mIoU against the labels
    (nearest, at the segmenter's resolution), and with `reference` images (real renders) the toy FID."""
    labels = _as_long_tensor(labels)[:, None].float()
    target = F.interpolate(labels, size=(model.size, model.size), mode="nearest-exact")[:, 0].long()
    out = {"miou": miou(segment(model, samples), target), "saturation": saturation(samples),
           "hf_energy": high_frequency_energy(samples)}
    if reference is not None:
        out["fid"] = frechet_distance(features(model, samples), features(model, reference))
    return out
