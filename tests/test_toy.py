import time

import numpy as np
import pytest
import torch

from toyworld import world as toy
from toyworld.world import (CLOUD, GRASS, HOUSE, MOUNTAIN, ROAD, SAND, SKY, SUN, TOY_CLASSES, TOY_COLORS,
                          TREE, WATER, ToyTokenizer, ToyWorldError, caption_classes, render, render_scene,
                          sample_layout)

@pytest.fixture(scope="module")
def scenes():
    return [render_scene(i, 64) for i in range(150)]


def test_deterministic_per_seed():
    a, b, c = render_scene(7, 96), render_scene(7, 96), render_scene(8, 96)
    for name in ("image", "label", "sketch", "depth"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    assert a.caption == b.caption
    assert not np.array_equal(a.label, c.label)


def test_types_and_shapes():
    s = render_scene(3, 80)
    assert s.image.shape == (80, 80, 3) and s.image.dtype == np.uint8
    assert s.label.shape == (80, 80) and s.label.dtype == np.uint8 and s.label.max() < len(TOY_CLASSES)
    assert s.sketch.dtype == np.uint8 and set(np.unique(s.sketch)) <= {0, 255}
    assert s.depth.shape == (80, 80) and s.depth.dtype == np.float32 and (s.depth > 0).all()
    with pytest.raises(ToyWorldError):
        render_scene(0, 8)


def test_one_layout_many_appearances():
    layout = sample_layout(11)
    a, b, c = render(layout, 64, 1), render(layout, 64, 2), render(layout, 64, 3)
    for other in (b, c):
        assert np.array_equal(a.label, other.label)
        assert np.array_equal(a.sketch, other.sketch)
        assert np.array_equal(a.depth, other.depth)
        assert np.abs(a.image.astype(int) - other.image.astype(int)).mean() > 5


def test_layout_is_resolution_independent():
    layout = sample_layout(5)
    small, large = render(layout, 64).label, render(layout, 256).label
    # the 256 pixel nearest to each 64-pixel center
    assert (large[2::4, 2::4] == small).mean() > 0.97


def test_class_colors_match_the_label(scenes):
    """Each class's pixels have its characteristic color, per time of day."""
    stats = {}
    for s in scenes:
        img = s.image.astype(np.float64)
        for c in range(len(TOY_CLASSES)):
            m = s.label == c
            if m.sum() >= 20:
                stats.setdefault((s.time_of_day, c), []).append(img[m].mean(0))
        sky_rows = np.nonzero((s.label == SKY).any(1))[0]
        low = (s.label == SKY) & (np.arange(64)[:, None] > sky_rows.max() / 2)
        if low.sum() >= 20:
            stats.setdefault((s.time_of_day, "low sky"), []).append(img[low].mean(0))
    mean = {k: np.mean(v, 0) for k, v in stats.items()}
    assert {tod for tod, _ in mean} == {"day", "dusk", "night"}
    r, g, b = mean[("day", SKY)]
    assert b > r + 60 and b > g  # blue day sky
    r, g, b = mean[("dusk", "low sky")]
    assert r > b + 50  # orange near the horizon at dusk
    assert mean[("night", SKY)].mean() < 60  # dark night sky
    assert mean[("night", SUN)].mean() > mean[("night", SKY)].mean() + 100  # a bright moon
    for tod in ("day", "dusk", "night"):
        r, g, b = mean[(tod, GRASS)]
        assert g > r and g > b  # green grass
    r, g, b = mean[("day", WATER)]
    assert b > r + 50  # blue water
    r, g, b = mean[("day", SAND)]
    assert r > b + 40 and g > b and mean[("day", SAND)].mean() > 150  # light beige sand
    cloud = mean[("day", CLOUD)]
    assert cloud.min() > 170 and np.ptp(cloud) < 20  # white clouds
    r, g, b = mean[("day", TREE)]
    assert g > b
    assert mean[("day", ROAD)].mean() < mean[("day", SAND)].mean()


def test_captions_name_what_is_drawn(scenes):
    for s in scenes:
        fraction = np.bincount(s.label.ravel(), minlength=len(TOY_CLASSES)) / s.label.size
        named = caption_classes(s.caption)
        for c in range(len(TOY_CLASSES)):
            if c in named:
                assert fraction[c] >= toy.MIN_NAMED_FRACTION, (s.caption, TOY_CLASSES[c])
            if fraction[c] >= 0.01:
                assert c in named, (s.caption, TOY_CLASSES[c])
        assert s.caption.endswith({"day": "blue", "dusk": "dusk", "night": "night"}[s.time_of_day] + " sky")
        assert ("moon" in s.caption) == (SUN in named and s.time_of_day == "night")


def test_caption_counts_objects():
    s = render_scene(1, 256)
    assert s.caption.startswith("a red house and a tree")
    assert "snowy mountains" in s.caption


def test_sketch_contains_label_boundaries(scenes):
    interior = 0
    for s in scenes[:30]:
        edge = np.zeros_like(s.label, bool)
        edge[:, :-1] |= s.label[:, 1:] != s.label[:, :-1]
        edge[:-1] |= s.label[1:] != s.label[:-1]
        assert (s.sketch[edge] == 255).all()
        interior += (s.sketch > 0).sum() - edge.sum()
    assert interior > 100  # and lines inside regions: windows, doors, trunks, mountain ranges


def test_depth_is_plausible(scenes):
    for s in scenes[:30]:
        d, lab = s.depth, s.label
        assert (d[lab == SKY] == d.max()).all()
        assert d[lab == MOUNTAIN].max(initial=0) < d[lab == SKY].min()
        ground = np.isin(lab, (GRASS, SAND, WATER, ROAD))
        for col in range(0, 64, 8):  # the ground comes nearer toward the bottom
            g = d[ground[:, col], col]
            assert (np.diff(g) <= 1e-4).all()
        objects = np.isin(lab, (TREE, HOUSE))
        if objects.any():
            assert d[objects].max() < d[ground].max()


def test_toy_colors_are_the_piti_colormap(golden):
    colors = np.array(golden.json("label_colormap_182.json")["colors"][: len(TOY_CLASSES)], np.uint8)
    assert np.array_equal(TOY_COLORS, colors)
    assert np.array_equal(toy.label_to_color(np.array([[0, 9]])), colors[[[0, 9]]])


def test_speed():
    """Thousands of 256 x 256 scenes a minute on one core (loose bound: >= 600 / min of CPU time)."""
    render_scene(0)
    start = time.process_time()
    for i in range(20):
        render_scene(i)
    per_scene = (time.process_time() - start) / 20
    assert per_scene < 0.1, f"{per_scene * 1000:.0f} ms per scene"


def test_tokenizer_round_trip(scenes):
    tok = ToyTokenizer()
    assert tok.vocab_size == len(ToyTokenizer.VOCAB)
    for s in scenes:
        tokens, mask = tok.encode(s.caption, 40)
        assert tokens.dtype == torch.long and mask.dtype == torch.bool and tokens.shape == mask.shape == (40,)
        assert tok.decode(tokens, mask) == s.caption
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any() and (tokens[n:] == 0).all() and (tokens[:n] > 0).all()


def test_tokenizer_padding_and_errors():
    tok = ToyTokenizer()
    tokens, mask = tok.encode("", 8)  # the unconditional caption: all padding
    assert not mask.any() and (tokens == 0).all()
    tokens, mask = tok.encode("a red house, a tree and clouds under a blue sky", 4)  # cut to the context
    assert mask.all() and tok.decode(tokens) == "a red house,"
    with pytest.raises(ToyWorldError, match="toy vocabulary"):
        tok.encode("a purple dragon", 8)


def test_example_grid(tmp_path):
    path = tmp_path / "grid.png"
    toy.save_example_grid(path, n=2, size=32)
    from PIL import Image
    im = Image.open(path)
    assert im.size == (4 * 32 + 3 * 2, 2 * 32 + 2)
