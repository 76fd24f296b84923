"""Degradations of the upsampler's low-resolution input (paper Sec. 3.3).

At sampling time the upsampler sees the base model's 64x64 samples, blurrier, noisier and smoother than a clean
downsampled photo. So, following GLIDE and PITI, it is trained on low-resolution inputs made from the 256x256
training image by a random degradation chain: the "light" variant of BSRGAN (Zhang et al. 2021) that PITI's data
loader runs, with an L0 gradient-minimization smoothing step (Xu et al. 2011) "to mimic the oversmoothed effect".

The chain, with PITI's parameters (glide_text2im/degradation/bsrgan_light.py):
  - with p=0.25 (only when sf == 4) first halve the image, then run the rest with sf = 2;
  - then, in random order (the second downsampling always before the third):
    blur (p=0.8): isotropic or anisotropic Gaussian kernel;
    downsampling 2: by a random factor in [1, 2 sf], random interpolation (p=0.8), else blur + stride sf;
    downsampling 3: to the target size H/sf x W/sf, random interpolation;
    Gaussian noise of level 1 or 2 / 255 (color, gray, or correlated across channels);
    JPEG compression (p=0.5) at quality 80..95;
    L0 smoothing (p=p_l0, 0.2 in PITI) with lambda in [1.2e-3, 4e-3] and kappa = 2;
  - the result is quantized to 8 bits.
Full BSRGAN uses stronger noise (2..25) and JPEG (30..95); PITI's light chain keeps both mild.
"""

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

SCALE2_P, BLUR_P, JPEG_P, L0_P = 0.25, 0.8, 0.5, 0.2
NOISE_LEVELS, JPEG_QUALITY, L0_LAMBDA = (1, 2), (80, 95), (1.2e-3, 4e-3)  # noise: Gaussian sigma in 1/255 units
INTERPOLATIONS = ("bilinear", "bicubic", "area")  # cv2's INTER_LINEAR, INTER_CUBIC, INTER_AREA

class DegradeError(ValueError):
    """An image the degradations cannot take (wrong shape, channel count or value range)."""

def as_float_image(img):
    """H x W x 3 uint8 (0..255) or float (0..1) -> float32 in [0, 1]."""
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] != 3:
        raise DegradeError(f"expected an H x W x 3 RGB image, got shape {img.shape}")
    if img.dtype == np.uint8:
        return img.astype(np.float32) / 255.0
    if not np.issubdtype(img.dtype, np.floating) or img.min() < -1e-3 or img.max() > 1 + 1e-3:
        raise DegradeError("float images must hold values in [0, 1] (or pass uint8 in 0..255)")
    return np.clip(img, 0, 1).astype(np.float32)

def _gaussian(size, inv_cov, center=0.0):
    """exp(-x^T C^-1 x / 2) on a size x size grid centered at (size - 1) / 2 + center, sum 1."""
    r = np.arange(size) - (size - 1) / 2 - center
    y, x = np.meshgrid(r, r, indexing="ij")
    p = np.stack([x, y], -1)
    e = -0.5 * np.einsum("...i,ij,...j->...", p, inv_cov, p)
    k = np.exp(e - e.max())  # shifted so that a tiny sigma still leaves a nonzero peak
    return k / k.sum()

def isotropic_gaussian_kernel(size, sigma):
    return _gaussian(size, np.eye(2) / max(sigma, 1e-3) ** 2)

def anisotropic_gaussian_kernel(size, theta, l1, l2):
    """Covariance with eigenvalues l1, l2 (variances), the first axis rotated by theta."""
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    cov = rot @ np.diag([max(l1, 1e-3), max(l2, 1e-3)]) @ rot.T
    return _gaussian(size, np.linalg.inv(cov))

def _to_torch(img):
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))[None]

def _to_numpy(x):
    return x[0].permute(1, 2, 0).numpy()

def filter2d(img, kernel):
    """Correlate each channel with `kernel`, mirror padding (scipy's 'mirror' = torch 'reflect')."""
    kh, kw = kernel.shape
    x = _to_torch(img)
    pad = (kw // 2, (kw - 1) // 2, kh // 2, (kh - 1) // 2)
    mode = "reflect" if max(pad) < min(img.shape[:2]) else "replicate"  # reflect needs pad < size
    w = torch.from_numpy(kernel.astype(np.float32))[None, None].repeat(3, 1, 1, 1)
    return _to_numpy(F.conv2d(F.pad(x, pad, mode=mode), w, groups=3))

def resize(img, height, width, mode, antialias=False):
    """Resize with torch's interpolation; bicubic with antialias is MATLAB's imresize."""
    options = {} if mode == "area" else {"align_corners": False, "antialias": antialias}
    x = F.interpolate(_to_torch(img), size=(max(height, 1), max(width, 1)), mode=mode, **options)
    return np.clip(_to_numpy(x), 0, 1)

def jpeg(img, quality):
    """JPEG round trip through Pillow at the given quality."""
    buf = io.BytesIO()
    Image.fromarray(np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)).save(buf, "JPEG", quality=int(quality))
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), dtype=np.float32) / 255.0

def l0_smooth(img, lam, kappa=2.0, beta_max=1e5):
    """L0 gradient minimization (Xu et al. 2011): min_S |S - I|^2 + lam * #{p : grad S(p) != 0}.

    Half-quadratic splitting: auxiliary gradients (h, v) and a weight beta that grows from 2 lam by a factor kappa
    up to beta_max. Each round (a) keeps (h, v) = grad S only where |grad S|^2 > lam / beta (elsewhere 0), then
    (b) solves the quadratic problem for S exactly in the Fourier domain (circular boundaries, forward differences):
        S = F^-1[(F(I) + beta (F(dx)* F(h) + F(dy)* F(v))) / (1 + beta (|F(dx)|^2 + |F(dy)|^2))].
    `img` is in [0, 1] (uint8 is accepted); lam is relative to that scale."""
    image = np.ascontiguousarray(as_float_image(img).transpose(2, 0, 1))  # C x H x W: fast FFTs
    h, w = image.shape[1:]
    f_img = np.fft.rfft2(image)
    # |F(dx)|^2 of the circular difference S(x+1) - S(x) is 2 - 2 cos(2 pi k / W), same for y
    mtf = (2 - 2 * np.cos(2 * np.pi * np.arange(w // 2 + 1) / w))[None, :] + \
          (2 - 2 * np.cos(2 * np.pi * np.arange(h) / h))[:, None]
    mtf = mtf.astype(np.float32)  # keeps every FFT in single precision
    s, beta = image, 2 * lam
    while beta < beta_max:
        dx, dy = np.roll(s, -1, axis=2) - s, np.roll(s, -1, axis=1) - s
        keep = (dx ** 2 + dy ** 2).sum(0) >= lam / beta  # elsewhere the gradient is set to 0
        dx, dy = dx * keep, dy * keep
        # the adjoint of the forward difference: h(x - 1) - h(x)
        div = np.roll(dx, 1, axis=2) - dx + np.roll(dy, 1, axis=1) - dy
        s = np.fft.irfft2((f_img + beta * np.fft.rfft2(div)) / (1 + beta * mtf), s=(h, w))
        beta *= kappa
    return np.clip(s, 0, 1).transpose(1, 2, 0).astype(np.float32)

def _random_resize(img, height, width, rng):
    return resize(img, height, width, INTERPOLATIONS[rng.integers(len(INTERPOLATIONS))])

def _add_blur(img, sf, rng):
    """PITI's add_blur: variances up to (4 + sf) / 4, sigma up to (2 + 0.2 sf) / 4."""
    if rng.random() < 0.5:
        l1, l2 = (4.0 + sf) / 4 * rng.random(2)
        k = anisotropic_gaussian_kernel(int(rng.integers(2, 12)) + 3, rng.random() * np.pi, l1, l2)
    else:
        k = isotropic_gaussian_kernel(int(rng.integers(2, 5)) + 3, (2.0 + 0.2 * sf) / 4 * rng.random())
    return filter2d(img, k)

def _add_noise(img, rng):
    level = rng.integers(NOISE_LEVELS[0], NOISE_LEVELS[1] + 1) / 255.0
    u = rng.random()
    if u > 0.6:  # independent per channel
        noise = rng.normal(0, level, img.shape)
    elif u < 0.4:  # the same on all channels
        noise = rng.normal(0, level, img.shape[:2] + (1,))
    else:  # correlated across channels: covariance L^2 Q^T D Q, Q a random orthonormal basis
        q = np.linalg.qr(rng.random((3, 3)))[0]
        d = np.sqrt(rng.random(3))
        noise = NOISE_LEVELS[1] / 255.0 * (rng.standard_normal(img.shape) * d) @ q
    return np.clip(img + noise.astype(np.float32), 0, 1)

def downsample_nearest(img, sf, sigma):
    """Gaussian blur centered (sf - 1) / 2 pixels down-right, then keep every sf-th pixel:
    each kept pixel is a blurred sample of the center of its sf x sf block."""
    k = _gaussian(25, np.eye(2) / sigma ** 2, center=(sf - 1) / 2)
    return np.clip(filter2d(img, k)[::sf, ::sf], 0, 1)

def degrade_bsr(img, sf, rng, p_l0=0.0):
    """PITI's BSR-light chain: H x W x 3 image -> float32 (H // sf) x (W // sf) x 3 in [0, 1], multiples of 1/255,
    the same for the same numpy Generator `rng`; `p_l0`: the chance of the L0 smoothing step."""
    image = as_float_image(img)
    h, w = image.shape[0] // sf * sf, image.shape[1] // sf * sf
    if h == 0 or w == 0:
        raise DegradeError(f"image of size {image.shape[:2]} is smaller than the scale factor {sf}")
    image, out_h, out_w = image[:h, :w], h // sf, w // sf
    if sf == 4 and rng.random() < SCALE2_P:  # a first halving, then the chain works at sf = 2
        image = (_random_resize(image, h // 2, w // 2, rng) if rng.random() < 0.5
                 else resize(image, h // 2, w // 2, "bicubic", antialias=True))
        sf = 2
    order = list(rng.permutation(["blur", "down2", "down3", "noise", "jpeg", "l0"]))
    i2, i3 = order.index("down2"), order.index("down3")
    if i2 > i3:  # the free downsampling comes before the one to the final size
        order[i2], order[i3] = order[i3], order[i2]
    for step in order:
        if step == "blur" and rng.random() < BLUR_P:
            image = np.clip(_add_blur(image, sf, rng), 0, 1)
        elif step == "down2":
            if rng.random() < 0.8:
                f = rng.uniform(1, 2 * sf)
                image = _random_resize(image, int(image.shape[0] / f), int(image.shape[1] / f), rng)
            else:
                image = downsample_nearest(image, sf, rng.uniform(0.1, 0.6 * sf))
        elif step == "down3":
            image = _random_resize(image, out_h, out_w, rng)
        elif step == "noise":
            image = _add_noise(image, rng)
        elif step == "jpeg" and rng.random() < JPEG_P:
            image = jpeg(image, rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1))
        elif step == "l0" and rng.random() < p_l0:
            image = l0_smooth(image, rng.uniform(*L0_LAMBDA))
    return (np.round(image * 255) / 255).astype(np.float32)

def degrade_for_upsampler(img, sf, rng, p_l0=L0_P):
    """An upsampler pair's low-res input as PITI's loader makes it: the chain with L0 smoothing as one more randomly
    ordered step, taken with probability p_l0. (PITI's L0 step treats the [0, 1] image as 8-bit and blackens it;
    here it runs on [0, 1], with PITI's lambda range.) Float32 in [0, 1]; map it to [-1, 1] for the model."""
    return degrade_bsr(img, sf, rng, p_l0=p_l0)
