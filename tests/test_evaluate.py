import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from toyworld.judge import (EvaluateError, evaluate_samples, features, frechet_distance,
                               frechet_distance_from_stats, get_segmenter, heldout_miou, high_frequency_energy,
                               labels_from_colors, load_segmenter, miou, saturation, save_segmenter, segment,
                               to_model_input, toy_batch, train_segmenter)
from toyworld.world import HELDOUT_SEED0, TOY_COLORS, label_to_color

# The small segmenter of the test: 32 x 32 renders, width 16 (the full one: see .notes/toy.md).
SMALL = dict(num_images=300, size=32, steps=300, width=16, batch_size=16, lr=1e-2, seed=0)
SMALL_MIOU = 0.6  # measured: 0.705 (CPU, torch 2.13)


@pytest.fixture(scope="module")
def segmenter():
    start = time.time()
    model = train_segmenter(**SMALL)
    return model, time.time() - start


def test_miou_hand_made():
    pred = np.array([[0, 0], [1, 1]])
    target = np.array([[0, 1], [1, 1]])
    # class 0: 1 / 2, class 1: 2 / 3; classes 2..4 appear nowhere and are left out
    assert miou(pred, target, num_classes=5) == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert miou(target, target, num_classes=5) == 1.0
    assert miou(np.zeros((3, 3)), np.ones((3, 3)), num_classes=2) == 0.0
    # ignored target pixels do not count
    assert miou(np.array([0, 1, 1]), np.array([0, 1, 255]), num_classes=2) == 1.0
    # accumulated over a batch (7 / 12), not averaged per image ((1 + 1 / 4) / 2)
    pred, target = torch.tensor([[0, 0], [1, 0]]), torch.tensor([[0, 0], [1, 1]])
    assert miou(pred, target, 2) == pytest.approx((2 / 3 + 1 / 2) / 2)
    with pytest.raises(EvaluateError):
        miou(np.zeros(4), np.zeros(5))


def test_frechet_distance_of_a_set_with_itself_is_zero():
    feats = np.random.default_rng(0).normal(size=(500, 16)) @ np.random.default_rng(1).normal(size=(16, 16))
    assert abs(frechet_distance(feats, feats)) < 1e-6 * np.trace(np.cov(feats, rowvar=False))


def test_frechet_distance_closed_form_diagonal():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    v1, v2 = np.array([1.0, 4.0, 0.25]), np.array([2.0, 1.0, 0.25])
    exact = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert frechet_distance_from_stats(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(exact, abs=1e-9)
    rng = np.random.default_rng(0)
    a = mu1 + np.sqrt(v1) * rng.standard_normal((40000, 3))
    b = mu2 + np.sqrt(v2) * rng.standard_normal((40000, 3))
    assert frechet_distance(a, b) == pytest.approx(exact, rel=0.03)


def test_frechet_distance_matches_the_nonsymmetric_eigenvalues():
    """tr sqrt(S1 S2) from the eigenvalues of S1 S2 itself (real and positive for SPD S1, S2)."""
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = a @ a.T + 0.1 * np.eye(6), b @ b.T + 0.1 * np.eye(6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    tr_covmean = np.sqrt(np.linalg.eigvals(s1 @ s2).real).sum()
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
    assert frechet_distance_from_stats(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance_from_stats(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-8)


def test_saturation():
    gray = np.full((2, 8, 8, 3), 120, np.uint8)
    red = np.zeros((2, 8, 8, 3), np.uint8)
    red[..., 0] = 200
    assert saturation(gray) == pytest.approx(0.0)
    assert saturation(red) == pytest.approx(1.0)
    half = np.stack([np.full((8, 8), 200), np.full((8, 8), 100), np.full((8, 8), 100)], -1)[None].astype(np.uint8)
    assert saturation(half) == pytest.approx(0.5)
    as_tensor = torch.from_numpy(half).permute(0, 3, 1, 2).float() / 127.5 - 1  # the [-1, 1] layout
    assert saturation(as_tensor) == pytest.approx(0.5, abs=1e-6)


def test_high_frequency_energy():
    y, x = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    checker = np.repeat((((x + y) % 2) * 255).astype(np.uint8)[None, ..., None], 3, -1)
    slow = np.repeat((127 + 100 * np.sin(2 * np.pi * x / 32)).astype(np.uint8)[None, ..., None], 3, -1)
    assert high_frequency_energy(checker) == pytest.approx(1.0)
    assert high_frequency_energy(slow) < 0.01
    images = toy_batch(range(4), 64)[0]
    blurred = F.avg_pool2d(to_model_input(images), 3, stride=1, padding=1, count_include_pad=False)
    assert high_frequency_energy(blurred) < 0.5 * high_frequency_energy(images)


def test_labels_from_colors_round_trip():
    labels = toy_batch(range(3), 32)[1]
    colors = label_to_color(labels)
    assert torch.equal(labels_from_colors(colors), torch.from_numpy(labels).long())
    ref = torch.from_numpy(colors).permute(0, 3, 1, 2).float() / 127.5 - 1  # a condition tensor
    assert torch.equal(labels_from_colors(ref), torch.from_numpy(labels).long())
    assert len(TOY_COLORS) == 10


def test_bad_image_layout():
    with pytest.raises(EvaluateError, match="N x H x W x 3"):
        to_model_input(np.zeros((2, 3, 8, 8), np.uint8))
    with pytest.raises(EvaluateError):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))


def test_short_training_reaches_the_stated_miou(segmenter):
    model, seconds = segmenter
    score = heldout_miou(model, n=100)
    print(f"small segmenter: held-out mIoU {score:.3f} after {seconds:.1f} s")
    assert score >= SMALL_MIOU


def test_toy_fid_separates_real_from_degraded(segmenter):
    model, _ = segmenter
    real_a = toy_batch(HELDOUT_SEED0 + np.arange(120), 32)[0]
    real_b = toy_batch(HELDOUT_SEED0 + 120 + np.arange(120), 32)[0]
    fa, fb = features(model, real_a), features(model, real_b)
    assert fa.shape == (120, 5 * 16)
    x = to_model_input(real_b)
    washed = (x.mean((2, 3), keepdim=True) + 0.3 * (x - x.mean((2, 3), keepdim=True))).clamp(-1, 1)
    assert frechet_distance(fa, fb) < 0.5 * frechet_distance(fa, features(model, washed))


def test_evaluate_samples_on_real_renders(segmenter):
    model, _ = segmenter
    images, labels = toy_batch(HELDOUT_SEED0 + np.arange(40), 64)  # other resolution than the model
    out = evaluate_samples(model, images, labels, reference=toy_batch(np.arange(40), 32)[0])
    assert set(out) == {"miou", "fid", "saturation", "hf_energy"}
    assert out["miou"] >= SMALL_MIOU - 0.1
    shuffled = evaluate_samples(model, images, labels[::-1])
    assert shuffled["miou"] < out["miou"] - 0.1


def test_save_load_round_trip(segmenter, tmp_path):
    model, _ = segmenter
    path = tmp_path / "seg" / "segmenter.pt"
    save_segmenter(model, path, heldout_miou=0.5)
    loaded = load_segmenter(path)
    images = toy_batch(range(3), 32)[0]
    assert torch.equal(segment(model, images), segment(loaded, images))
    assert get_segmenter(str(path)).config == model.config  # loads instead of training
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(EvaluateError, match="cannot read"):
        load_segmenter(tmp_path / "bad.pt")
    with pytest.raises(EvaluateError, match="no segmenter checkpoint"):
        load_segmenter(tmp_path / "missing.pt")
