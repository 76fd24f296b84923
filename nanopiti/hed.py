"""Edge maps for sketch-to-image: the HED network, and a weight-free fallback.

PITI's sketch task (paper Sec. 4.1) "extract[s] sketches of images via HED and then binarize[s] extracted
sketches". HED (Xie & Tu, 2015) is VGG16 up to conv5_3 with a 1x1 "score" conv on each of its 5 stages, upsampled
bilinearly to the input size and fused by a 1x1 conv into one edge probability. PITI's weights are the Caffe
BSDS500 model converted by sniklaus/pytorch-hed ("network-bsds500.pytorch"): keys `moduleVggOne.0.weight`, ...,
`moduleScoreOne.weight`, ..., `moduleCombine.0.weight` (newer copies: `net`), which `load_hed` maps onto the
modules below (same Sequential order: only the prefixes change). Input: BGR in 0..255 minus the Caffe VGG mean.

Without the weights, `canny_edges` gives thin binary edges with no learned notion of object boundaries: fine for
nanopiti's own experiments, not what PITI's released sketch checkpoints were trained on.
"""

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HED_THRESHOLD = 0.6  # PITI's preprocess_sketch.py: sketch = (hed > 0.6)
# the Caffe VGG training-set mean, in BGR order, as in the converted weights
BGR_MEAN = (104.00698793, 116.66876762, 122.67891434)
_STAGE_NAMES = ("One", "Two", "Thr", "Fou", "Fiv")

class HEDError(Exception):
    """A HED weights file that cannot be read or does not fit the network."""

class HED(nn.Module):
    """VGG16 trunk + 5 side outputs + learned fusion; returns edge probabilities in [0, 1]."""

    def __init__(self):
        super().__init__()
        widths = [(3, 64, 2), (64, 128, 2), (128, 256, 3), (256, 512, 3), (512, 512, 3)]
        self.stages = nn.ModuleList()
        for i, (c_in, c_out, n_convs) in enumerate(widths):
            layers = [nn.MaxPool2d(kernel_size=2, stride=2)] if i > 0 else []
            for j in range(n_convs):
                layers += [nn.Conv2d(c_in if j == 0 else c_out, c_out, 3, padding=1), nn.ReLU()]
            self.stages.append(nn.Sequential(*layers))
        self.scores = nn.ModuleList(nn.Conv2d(c_out, 1, 1) for _, c_out, _ in widths)
        self.combine = nn.Conv2d(5, 1, 1)

    def forward(self, rgb):
        """rgb: B x 3 x H x W in [0, 1] -> B x 1 x H x W edge probability."""
        x = rgb.flip(1) * 255.0 - torch.tensor(BGR_MEAN, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
        sides = []
        for stage, score in zip(self.stages, self.scores):
            x = stage(x)
            sides.append(F.interpolate(score(x), size=rgb.shape[2:], mode="bilinear", align_corners=False))
        return torch.sigmoid(self.combine(torch.cat(sides, dim=1)))

def convert_hed_state_dict(published):
    """Rename the keys of sniklaus/pytorch-hed's file to this module's names."""
    renames = [("Combine.0.", "combine.")]  # Sequential(conv, sigmoid) upstream; sigmoid is in forward
    for i, name in enumerate(_STAGE_NAMES):
        renames += [(f"Vgg{name}.", f"stages.{i}."), (f"Score{name}.", f"scores.{i}.")]
    converted = {}
    for key, value in published.items():
        rest = next((key[len(prefix):] for prefix in ("module", "net") if key.startswith(prefix)), key)
        old, new = next(((old, new) for old, new in renames if rest.startswith(old)), ("", ""))
        converted[new + rest[len(old):]] = value
    return converted

def load_hed(path, device="cpu"):
    """Build HED and load the published weights file (or a state dict saved from this module)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unreadable, truncated, not a torch file
        raise HEDError(f"cannot read HED weights {path}: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict):
        raise HEDError(f"{path} is not a state dict (got {type(state).__name__})")
    model, converted = HED(), convert_hed_state_dict(state)
    missing, unexpected = model.state_dict().keys() - converted.keys(), converted.keys() - model.state_dict().keys()
    if missing or unexpected:
        raise HEDError(f"{path} is not a HED checkpoint: {len(missing)} missing keys (e.g. {sorted(missing)[:2]}), "
                       f"{len(unexpected)} unexpected (e.g. {sorted(unexpected)[:2]}); expected "
                       "sniklaus/pytorch-hed's network-bsds500.pytorch")
    for key, value in model.state_dict().items():
        if converted[key].shape != value.shape:
            raise HEDError(f"{path}: {key} has shape {tuple(converted[key].shape)}, expected {tuple(value.shape)}")
    model.load_state_dict(converted)
    return model.to(device).eval()

@torch.no_grad()
def hed_sketch(model, rgb, threshold=HED_THRESHOLD):
    """HxWx3 uint8 numpy image -> HxW bool sketch (True = edge), as PITI binarizes HED."""
    device = next(model.parameters()).device
    x = torch.from_numpy(np.array(rgb, dtype=np.float32)).to(device).permute(2, 0, 1)[None] / 255.0
    return (model(x)[0, 0] > threshold).cpu().numpy()

def _gaussian_blur(x, sigma):
    radius = max(1, int(round(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))

@torch.no_grad()
def canny_edges(rgb, sigma=1.4, low=0.1, high=0.2):
    """HxWx3 uint8 numpy image -> HxW bool edges, Canny in plain torch: gray, Gaussian blur, Sobel gradients
    (magnitude over its maximum: thresholds are image-relative), non-maximum suppression along the gradient
    (quantized to 45 degrees), hysteresis (above `high`, or above `low` and 8-connected to such a pixel)."""
    x = torch.from_numpy(np.array(rgb, dtype=np.float32)).permute(2, 0, 1)[None] / 255.0
    gray = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    g = _gaussian_blur(gray, sigma)
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    padded = F.pad(g, (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(padded, sobel.view(1, 1, 3, 3))[0, 0]
    gy = F.conv2d(padded, sobel.t().reshape(1, 1, 3, 3))[0, 0]
    mag = torch.hypot(gx, gy)
    mag = mag / mag.max().clamp_min(1e-8)

    # direction in [0, 180) quantized to 4 bins; a pixel must beat its two neighbours at +-(dy, dx) of its bin
    angle = torch.rad2deg(torch.atan2(gy, gx)) % 180.0
    bins = (((angle + 22.5) // 45) % 4).long()
    m = F.pad(mag, (1, 1, 1, 1))
    h, w = mag.shape
    keep = torch.zeros_like(mag, dtype=torch.bool)
    for b, (dy, dx) in enumerate([(0, 1), (1, 1), (1, 0), (1, -1)]):
        ahead, behind = (m[1 + s * dy:1 + s * dy + h, 1 + s * dx:1 + s * dx + w] for s in (1, -1))
        keep |= (bins == b) & (mag >= ahead) & (mag >= behind)
    thin = mag * keep

    return hysteresis((thin >= high).numpy(), (thin >= low).numpy())

def hysteresis(strong, weak):
    """Keep the 8-connected components of `weak` that contain a `strong` pixel: label propagation with pointer
    jumping. Each round every pixel hangs its tree's root under the smallest label of its 3x3 neighbourhood, then
    labels are replaced by their label's label until flat: about log(size) rounds, not a component's length."""
    h, w = weak.shape
    none = h * w  # the label of non-weak pixels, larger than every index
    label = np.append(np.where(weak.ravel(), np.arange(h * w), none), none)  # label[none] = none
    inside = np.flatnonzero(weak)
    while True:
        padded = np.pad(label[:-1].reshape(h, w), 1, constant_values=none)
        smallest = np.min([padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)], axis=0)
        hooked = label.copy()
        np.minimum.at(hooked, label[inside], smallest.ravel()[inside])
        while not np.array_equal(jumped := hooked[hooked], hooked):  # pointer jumping until every label is a root
            hooked = jumped
        if np.array_equal(hooked, label):
            break
        label = hooked
    roots = label[:-1]  # a pixel is kept if its root is a strong pixel's root (and it is weak)
    return (np.isin(roots, label[np.flatnonzero(strong)]) & (roots != none)).reshape(h, w)
