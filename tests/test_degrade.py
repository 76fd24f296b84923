import numpy as np
import pytest

from nanopiti.degrade import (DegradeError, anisotropic_gaussian_kernel, degrade_bsr, degrade_for_upsampler,
                              downsample_nearest, filter2d, isotropic_gaussian_kernel, jpeg, l0_smooth, resize)
from toyworld.world import render_scene


@pytest.fixture(scope="module")
def photo():
    return render_scene(4, 128).image


def nonzero_gradients(img, eps=1.0 / 255):
    img = np.asarray(img, np.float32)
    dx = np.abs(np.diff(img, axis=1)).max(-1) > eps
    dy = np.abs(np.diff(img, axis=0)).max(-1) > eps
    return int(dx.sum() + dy.sum())


@pytest.mark.parametrize("size", [5, 6, 7, 14, 25])
def test_kernels_are_normalized_and_symmetric(size):
    rng = np.random.default_rng(size)
    for k in (isotropic_gaussian_kernel(size, rng.uniform(0.1, 2)), isotropic_gaussian_kernel(size, 0.0),
              anisotropic_gaussian_kernel(size, rng.uniform(0, np.pi), rng.uniform(0, 2), rng.uniform(0, 2))):
        assert k.shape == (size, size) and np.isfinite(k).all() and (k >= 0).all()
        assert abs(k.sum() - 1) < 1e-9
        assert np.allclose(k, k[::-1, ::-1])  # point symmetric about the center


def test_anisotropic_kernel_has_the_requested_covariance():
    theta, l1, l2 = 0.6, 4.0, 1.0
    k = anisotropic_gaussian_kernel(41, theta, l1, l2)
    r = np.arange(41) - 20
    y, x = np.meshgrid(r, r, indexing="ij")
    cov = np.array([[(k * x * x).sum(), (k * x * y).sum()], [(k * x * y).sum(), (k * y * y).sum()]])
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    assert np.allclose(cov, rot @ np.diag([l1, l2]) @ rot.T, atol=1e-3)
    assert np.allclose(anisotropic_gaussian_kernel(9, 1.0, 2.0, 2.0), isotropic_gaussian_kernel(9, np.sqrt(2.0)))


def test_filter_identity_and_constant(photo):
    img = photo.astype(np.float32) / 255
    delta = np.zeros((5, 5))
    delta[2, 2] = 1
    assert np.allclose(filter2d(img, delta), img, atol=1e-6)
    flat = np.full((32, 32, 3), 0.3, np.float32)
    assert np.allclose(filter2d(flat, isotropic_gaussian_kernel(7, 2.0)), 0.3, atol=1e-6)


@pytest.mark.parametrize("sf", [3, 4])
def test_strided_downsampling_samples_block_centers(sf):
    """On an image of constant sf x sf blocks, a narrow blur + stride returns each block's color."""
    blocks = np.random.default_rng(sf).random((8, 8, 3)).astype(np.float32)
    img = np.repeat(np.repeat(blocks, sf, 0), sf, 1)
    # sigma = sf / 8 keeps the blur inside a block only if it is centered on the block's center
    assert np.allclose(downsample_nearest(img, sf, sf / 8), blocks, atol=0.01)


@pytest.mark.parametrize("shape,sf", [((128, 128), 4), ((122, 70), 4), ((64, 48), 2)])
def test_bsr_shapes_and_range(photo, shape, sf):
    img = photo[: shape[0], : shape[1]]
    for seed in range(6):
        out = degrade_bsr(img, sf, np.random.default_rng(seed), p_l0=0.5)
        assert out.shape == (shape[0] // sf, shape[1] // sf, 3) and out.dtype == np.float32
        assert out.min() >= 0 and out.max() <= 1
        assert np.allclose(out * 255, np.round(out * 255), atol=1e-4)  # 8-bit levels


def test_bsr_deterministic_under_a_seed(photo):
    a = degrade_for_upsampler(photo, 4, np.random.default_rng(3))
    b = degrade_for_upsampler(photo, 4, np.random.default_rng(3))
    c = degrade_for_upsampler(photo, 4, np.random.default_rng(4))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # uint8 and float inputs are the same image
    assert np.array_equal(a, degrade_for_upsampler(photo.astype(np.float32) / 255, 4, np.random.default_rng(3)))


def test_bsr_output_resembles_the_image(photo):
    """Degraded, but still the same picture: close to a plain area downsampling."""
    small = resize(photo.astype(np.float32) / 255, 32, 32, "area")
    for seed in range(4):
        out = degrade_bsr(photo, 4, np.random.default_rng(seed))
        assert np.abs(out - small).mean() < 0.06


def test_bad_inputs_are_refused(photo):
    rng = np.random.default_rng(0)
    with pytest.raises(DegradeError):
        degrade_bsr(photo[..., 0], 4, rng)  # grayscale
    with pytest.raises(DegradeError):
        degrade_bsr(np.concatenate([photo, photo[..., :1]], -1), 4, rng)  # RGBA
    with pytest.raises(DegradeError):
        degrade_bsr(photo.astype(np.float32), 4, rng)  # float in 0..255
    with pytest.raises(DegradeError):
        degrade_bsr(photo[:2, :2], 4, rng)  # smaller than the scale factor


def test_l0_smoothing_reduces_nonzero_gradients(photo):
    img = photo.astype(np.float32) / 255
    before = nonzero_gradients(img)
    light, strong = l0_smooth(img, 2e-3), l0_smooth(img, 2e-2)
    assert nonzero_gradients(strong) < nonzero_gradients(light) < 0.5 * before
    assert light.shape == img.shape and light.dtype == np.float32 and 0 <= light.min() and light.max() <= 1
    assert np.allclose(light.mean((0, 1)), img.mean((0, 1)), atol=1e-3)  # the mean color is kept
    assert np.abs(l0_smooth(img, 1e-7) - img).max() < 0.02  # a tiny lambda keeps the image


def test_l0_recovers_piecewise_constant_image():
    rng = np.random.default_rng(0)
    clean = np.zeros((48, 48, 3), np.float32)
    clean[:, 24:] = (0.8, 0.5, 0.2)
    clean[10:30, 5:15] = (0.2, 0.9, 0.4)
    noisy = np.clip(clean + rng.normal(0, 0.03, clean.shape), 0, 1).astype(np.float32)
    smooth = l0_smooth(noisy, 2e-2)
    assert np.abs(smooth - clean).mean() < 0.5 * np.abs(noisy - clean).mean()


def test_l0_step_in_the_upsampler_chain(photo):
    """With p_l0 = 1 every chain smooths: fewer nonzero gradients than the same chains without it."""
    with_l0 = sum(nonzero_gradients(degrade_for_upsampler(photo, 4, np.random.default_rng(s), p_l0=1.0))
                  for s in range(5))
    without = sum(nonzero_gradients(degrade_for_upsampler(photo, 4, np.random.default_rng(s), p_l0=0.0))
                  for s in range(5))
    assert with_l0 < without


def test_jpeg_round_trip(photo):
    img = photo.astype(np.float32) / 255
    low, high = jpeg(img, 30), jpeg(img, 95)
    for out in (low, high):
        assert out.shape == img.shape and out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1
        assert not np.array_equal(out, img)
    assert np.abs(high - img).mean() < np.abs(low - img).mean() < 0.05


@pytest.mark.parametrize("mode", ["bilinear", "bicubic", "area"])
def test_resize_modes(photo, mode):
    out = resize(photo.astype(np.float32) / 255, 40, 24, mode)
    assert out.shape == (40, 24, 3) and 0 <= out.min() and out.max() <= 1
