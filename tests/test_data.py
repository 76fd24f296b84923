"""nanopiti.data, .conditions, .colormap and .hed: encodings, loaders, bad files."""

import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from nanopiti.colormap import color_to_labels, label_colormap, labels_to_color
from nanopiti.conditions import (binarize_sketch, encode_depth, encode_normal, jet_lut,
                                 l1_distance_transform, normals_from_depth, sketch_to_condition)
from nanopiti.data import DataError, PairedDataset, collate_skip_none, label_image_to_color, load_condition_image
from nanopiti.hed import HED, HEDError, hysteresis, canny_edges, convert_hed_state_dict, load_hed
from toyworld.data import ToyDataset
from toyworld.world import render_scene

def test_coco_colormap_equals_reference_and_round_trips(golden):
    reference = np.array(golden.json("label_colormap_182.json")["colors"], dtype=np.uint8)
    np.testing.assert_array_equal(label_colormap(182), reference)
    np.testing.assert_array_equal(label_colormap(151), reference[:151])  # ADE20K: the same colors
    labels = np.random.default_rng(0).integers(0, 182, (13, 17))
    labels[0, :5] = 255
    color = labels_to_color(labels)
    np.testing.assert_array_equal(color[0, :5], 0)  # unlabeled -> black
    np.testing.assert_array_equal(color_to_labels(color), labels)
    with pytest.raises(ValueError, match="outside"):
        labels_to_color(np.full((2, 2), 160), "ade20k")
    with pytest.raises(ValueError, match="not in the palette"):
        color_to_labels(np.full((2, 2, 3), 7, np.uint8))


def test_l1_distance_transform_is_exact():
    rng = np.random.default_rng(1)
    edges = rng.random((23, 31)) < 0.03
    edges[5, 7] = True
    ys, xs = np.nonzero(edges)
    yy, xx = np.mgrid[0:23, 0:31]
    brute = np.min(np.abs(yy[..., None] - ys) + np.abs(xx[..., None] - xs), axis=-1)
    np.testing.assert_array_equal(l1_distance_transform(edges), brute)
    cond = sketch_to_condition(edges)
    assert cond.shape == (1, 23, 31)
    np.testing.assert_allclose(cond[0].numpy(), np.minimum(brute, 255) / 127.5 - 1, atol=1e-6)
    assert (cond[0][torch.from_numpy(edges)] == -1).all()
    # no line at all: every pixel is "far": the condition equals the null condition (all ones)
    assert (sketch_to_condition(np.zeros((300, 300), bool)) == 1).all()


def test_sketch_polarity_is_normalized():
    lines = np.zeros((40, 40), np.uint8)
    lines[10, 5:35] = 255
    lines[5:35, 20] = 255
    np.testing.assert_array_equal(binarize_sketch(lines), binarize_sketch(255 - lines))
    assert binarize_sketch(lines).sum() == (lines > 0).sum()


def test_canny_fallback_gives_thin_edges_on_the_boundary():
    img = np.zeros((64, 64, 3), np.uint8)
    img[20:44, 16:48] = 200
    edges = canny_edges(img)
    boundary = np.zeros((64, 64), bool)
    boundary[20:44, 16:48] = True
    boundary[21:43, 17:47] = False
    dist = l1_distance_transform(boundary)
    assert edges.any() and dist[edges].max() <= 2  # every edge pixel lies on the square's outline
    found = l1_distance_transform(edges)
    assert (found[boundary] <= 2).mean() > 0.9  # and the outline is (almost) all found
    assert edges.sum() < 3 * boundary.sum()  # thin lines, not thick bands


def testhysteresis_keeps_exactly_the_components_with_a_strong_pixel():
    rng = np.random.default_rng(7)
    for density in (0.3, 0.5, 0.65):
        weak = rng.random((30, 40)) < density
        strong = weak & (rng.random((30, 40)) < 0.02)
        expected = np.zeros_like(weak)  # flood fill from the strong pixels, one pixel at a time
        stack = list(zip(*np.nonzero(strong)))
        while stack:
            y, x = stack.pop()
            if 0 <= y < 30 and 0 <= x < 40 and weak[y, x] and not expected[y, x]:
                expected[y, x] = True
                stack += [(y + dy, x + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        np.testing.assert_array_equal(hysteresis(strong, weak), expected)


def test_hed_published_keys_load_and_reproduce():
    torch.manual_seed(0)
    model = HED().eval()
    names = ("One", "Two", "Thr", "Fou", "Fiv")
    published = {}
    for key, value in model.state_dict().items():
        part, *rest = key.split(".")
        if part == "combine":
            published["moduleCombine.0." + rest[0]] = value
        else:
            prefix = "moduleVgg" if part == "stages" else "moduleScore"
            published[prefix + names[int(rest[0])] + "." + ".".join(rest[1:])] = value
    # the layer indices of the published file: conv layers at 0, 2 (stage 1) and 1, 3, 5 (later)
    assert {"moduleVggOne.2.weight", "moduleVggTwo.3.bias", "moduleVggFiv.5.weight"} <= published.keys()
    assert convert_hed_state_dict(published).keys() == model.state_dict().keys()
    # newer copies of the file say "net" instead of "module"
    renamed = {k.replace("module", "net"): v for k, v in published.items()}
    assert convert_hed_state_dict(renamed).keys() == model.state_dict().keys()
    loaded = HED().eval()
    loaded.load_state_dict(convert_hed_state_dict(published))
    x = torch.rand(1, 3, 24, 20)
    out = loaded(x)
    assert out.shape == (1, 1, 24, 20) and 0 <= out.min() and out.max() <= 1
    assert torch.equal(out, model(x))


def test_hed_load_errors_are_one_line(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(HEDError, match="cannot read"):
        load_hed(str(tmp_path / "junk.pt"))
    state = HED().state_dict()
    state["stages.0.0.weight"] = torch.zeros(64, 1, 3, 3)  # a network for one-channel input
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(HEDError, match="shape"):
        load_hed(str(tmp_path / "bad.pt"))


def test_label_maps_of_every_mode_become_the_same_colors():
    labels = np.random.default_rng(2).integers(0, 150, (9, 11)).astype(np.uint8)
    expected = labels_to_color(labels, "ade20k")
    as_l = Image.fromarray(labels, mode="L")
    np.testing.assert_array_equal(label_image_to_color(as_l, "ade20k"), expected)
    as_i16 = Image.fromarray(labels.astype(np.uint16)).convert("I;16")
    np.testing.assert_array_equal(label_image_to_color(as_i16, "ade20k"), expected)
    rgba = Image.fromarray(np.concatenate([expected, np.full((9, 11, 1), 255, np.uint8)], -1), mode="RGBA")
    np.testing.assert_array_equal(label_image_to_color(rgba), expected)
    # palette PNG whose palette is someone else's (here: gray ramp): its indices are the classes
    foreign = as_l.convert("P")
    foreign.putpalette([v for i in range(256) for v in (i, i, i)])
    np.testing.assert_array_equal(label_image_to_color(foreign, "ade20k"), expected)
    # palette PNG that stores PITI colors under arbitrary indices: its colors are used
    piti = Image.fromarray(expected).quantize(colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    assert piti.mode == "P"
    np.testing.assert_array_equal(label_image_to_color(piti), np.asarray(piti.convert("RGB")))
    np.testing.assert_array_equal(np.asarray(piti.convert("RGB")), expected)
    with pytest.raises(DataError, match="mode LA"):
        label_image_to_color(as_l.convert("LA"))


def _write_pairs(folder, rng, n=4):
    """n photo/label pairs of 48 x 64 (photo = label colors) and the lines of a list file."""
    lines = []
    for i in range(n):
        labels = np.kron(rng.integers(0, 182, (4, 3)), np.ones((16, 16), np.int64))
        color = labels_to_color(labels)
        Image.fromarray(color).save(folder / f"img{i}.png")
        Image.fromarray(color).save(folder / f"lbl{i}.png")
        lines.append(f"img{i}.png\tlbl{i}.png")
    return lines


def test_bad_files_are_skipped_counted_and_substituted(tmp_path):
    rng = np.random.default_rng(3)
    lines = _write_pairs(tmp_path, rng, n=3)
    # kinds of trouble: corrupt label, truncated photo, size mismatch, missing file, malformed line
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    full = open(tmp_path / "img0.png", "rb").read()
    (tmp_path / "truncated.png").write_bytes(full[: len(full) // 2])
    Image.new("RGB", (40, 40)).save(tmp_path / "small.png")
    # and what must work: a grayscale photo, an RGBA photo, a palette label map
    Image.open(tmp_path / "img1.png").convert("L").save(tmp_path / "gray.png")
    Image.open(tmp_path / "img1.png").convert("RGBA").save(tmp_path / "rgba.png")
    pal_classes = np.kron(np.array([[0, 1], [2, 3]], np.uint8), np.ones((32, 24), np.uint8))
    Image.fromarray(pal_classes).convert("P").save(tmp_path / "pal.png")  # gray-ramp palette
    lines = [lines[0], "img1.png\tcorrupt.png", "truncated.png\tlbl0.png", "img2.png\tsmall.png",
             "img1.png\tnowhere.png", "just_one_column.png", lines[1], "gray.png\tlbl1.png",
             "rgba.png\tlbl1.png", "img2.png\tpal.png", lines[2]]
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")

    with pytest.warns(UserWarning, match="missing file"):
        ds = PairedDataset(str(tmp_path / "list.txt"), "mask", resolution=32, cond_size=64)
    assert len(ds) == 9  # the missing file and the malformed line never enter
    paths = [os.path.basename(e[0]) for e in ds.entries]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate_skip_none)
        batches = list(loader)  # a whole epoch, no exception
    assert sum(b["image"].shape[0] for b in batches) == len(ds)
    assert len(caught) == 3 and all("skipping pair" in str(w.message) for w in caught)
    # a bad pair is replaced by the next good one, deterministically
    assert os.path.basename(ds[1]["path"]) == paths[4] == "img1.png"  # 1, 2, 3 are bad -> 4
    report = ds.report()
    for reason in ("unreadable: 2", "size mismatch: 1", "missing file: 1", "malformed line: 1"):
        assert reason in report
    assert "6 usable pairs, 5 skipped" in report
    # the grayscale and RGBA photos give 3 channels, the palette map's indices are its classes
    gray = ds[paths.index("gray.png")]["image"]
    assert gray.shape == (3, 32, 32) and torch.equal(gray[0], gray[1])
    assert ds[paths.index("rgba.png")]["image"].shape == (3, 32, 32)
    pal = ds[paths.index("img2.png", 5)]["cond"]
    colors = {tuple(c) for c in np.rint((pal.permute(1, 2, 0).numpy() + 1) * 127.5).reshape(-1, 3).astype(int)}
    assert colors == {tuple(int(v) for v in c) for c in label_colormap(4)}


def test_augmentation_is_deterministic_and_worker_independent(tmp_path):
    rng = np.random.default_rng(4)
    (tmp_path / "list.txt").write_text("\n".join(_write_pairs(tmp_path, rng, n=4)) + "\n")
    kwargs = dict(list_file=str(tmp_path / "list.txt"), task="mask", resolution=256, upsampler=True, low_res=64, seed=7)
    a, b = PairedDataset(**kwargs), PairedDataset(**kwargs)
    s = a[2]
    assert s["image"].shape == (3, 256, 256) and s["low_res"].shape == (3, 64, 64)
    assert s["low_res"].min() >= -1 and s["low_res"].max() <= 1
    for key in ("image", "cond", "low_res"):
        assert torch.equal(s[key], b[2][key])
    b.set_epoch(1)
    assert any(not torch.equal(a[i]["low_res"], b[i]["low_res"]) for i in range(4))
    # two worker processes, or two DistributedSampler ranks, produce exactly the same samples
    single = next(iter(torch.utils.data.DataLoader(a, batch_size=4)))
    multi = next(iter(torch.utils.data.DataLoader(a, batch_size=4, num_workers=2)))
    assert torch.equal(single["image"], multi["image"]) and torch.equal(single["low_res"], multi["low_res"])
    seen = {}
    for rank in range(2):
        sampler = torch.utils.data.distributed.DistributedSampler(a, num_replicas=2, rank=rank, seed=0)
        for i in sampler:
            seen[i] = a[i]["cond"]
    assert sorted(seen) == [0, 1, 2, 3]
    assert all(torch.equal(seen[i], single["cond"][i]) for i in range(4))


def test_toy_dataset_conditions_match_the_scene():
    ds = ToyDataset(3, "mask", resolution=32, cond_size=64, random_flip=False, first_scene=10)
    s = ds[1]
    assert s["image"].shape == (3, 32, 32) and s["cond"].shape == (3, 64, 64)
    scene = render_scene(11, 64)
    cond = np.rint((s["cond"].permute(1, 2, 0).numpy() + 1) * 127.5)
    np.testing.assert_array_equal(cond, labels_to_color(scene.label))
    assert isinstance(s["caption"], str) and s["caption"]
    ds.set_epoch(1)  # same layout (same condition), another appearance
    t = ds[1]
    assert torch.equal(s["cond"], t["cond"]) and not torch.equal(s["image"], t["image"])
    assert ToyDataset(2, "sketch", cond_size=64)[0]["cond"].shape == (1, 64, 64)
    depth = ToyDataset(2, "depth", cond_size=64)[0]["cond"]
    assert depth.shape == (6, 64, 64) and depth.min() >= -1 and depth.max() <= 1



def test_toy_copy_task_image_is_its_mask():
    """The copy task: the image is the condition's label colors at the image size, every epoch."""
    ds = ToyDataset(2, "mask", resolution=64, cond_size=64, random_flip=True, first_scene=10, copy=True)
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        s = ds[1]
        assert torch.equal(s["image"], s["cond"])  # same size here: the same picture, flipped together
    small = ToyDataset(2, "mask", resolution=16, cond_size=64, random_flip=False, first_scene=10, copy=True)[0]
    colors = torch.from_numpy(labels_to_color(render_scene(10, 64).label)).permute(2, 0, 1).float() / 127.5 - 1
    assert small["image"].shape == (3, 16, 16)
    assert (small["image"] - torch.nn.functional.avg_pool2d(colors[None], 4)[0]).abs().mean() < 0.1

def test_depth_and_normal_encodings():
    lut = jet_lut()
    np.testing.assert_allclose(lut[0], [0, 0, 0.5])
    np.testing.assert_allclose(lut[255], [0.5, 0, 0])
    np.testing.assert_allclose(lut[128], [0.490196, 1.0, 0.477546], atol=1e-5)  # matplotlib's jet(128)
    depth = np.array([[0.3, 2.0, 300.0, 5.0]], np.float32)
    enc = encode_depth(depth, np.array([[1, 1, 1, 0]]))
    np.testing.assert_array_equal(enc[0, 0], [0, 0, 127])  # under 1 m
    np.testing.assert_array_equal(enc[0, 3], [0, 0, 0])  # invalid
    normal = np.array([[[0, 0, 1], [0, -1, 0], [0, 0, 0]]], np.float32)
    np.testing.assert_array_equal(encode_normal(normal)[0], [[127, 127, 255], [127, 0, 127], [0, 0, 0]])
    # geometry: a camera 1.5 m above flat ground (y down) sees row v at z = f * 1.5 / (v - cy)
    f, h, w = 64.0, 64, 64
    v = np.arange(h, dtype=np.float32)[:, None].repeat(w, 1)
    ground = np.where(v > h / 2 + 2, f * 1.5 / np.maximum(v - h / 2, 1e-3), 100.0)
    n = normals_from_depth(ground, focal=f)
    np.testing.assert_allclose(n[45:60, 5:60], np.broadcast_to([0, -1, 0], (15, 55, 3)), atol=1e-4)
    wall = normals_from_depth(np.full((8, 8), 3.0, np.float32), focal=8.0)
    np.testing.assert_allclose(wall[2:6, 2:6], np.broadcast_to([0, 0, -1], (4, 4, 3)), atol=1e-5)


def test_load_condition_image(tmp_path):
    labels = np.kron(np.arange(12).reshape(3, 4), np.ones((20, 25), np.int64)).astype(np.uint8)  # 60 x 100
    Image.fromarray(labels_to_color(labels)).save(tmp_path / "mask.png")
    cond = load_condition_image(str(tmp_path / "mask.png"), "mask")
    assert cond.shape == (3, 256, 256)
    got = np.rint((cond.permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.uint8)
    np.testing.assert_array_equal(np.unique(color_to_labels(got)), np.arange(12))  # no new colors
    Image.fromarray(labels).save(tmp_path / "index.png")
    assert torch.equal(load_condition_image(str(tmp_path / "index.png"), "mask", palette="ade20k"), cond)
    Image.fromarray(np.full((8, 8), 200, np.uint8)).save(tmp_path / "big.png")
    with pytest.raises(DataError, match="outside"):
        load_condition_image(str(tmp_path / "big.png"), "mask", palette="ade20k")
    Image.new("LA", (8, 8)).save(tmp_path / "la.png")
    with pytest.raises(DataError, match="2 channels"):
        load_condition_image(str(tmp_path / "la.png"), "mask")
    (tmp_path / "junk.png").write_bytes(b"junk")
    with pytest.raises(DataError, match="unreadable") as err:
        load_condition_image(str(tmp_path / "junk.png"), "mask")
    assert "\n" not in str(err.value)
    Image.fromarray((np.random.default_rng(6).random((16, 16, 3)) * 255).astype(np.uint8)).save(tmp_path / "photo.png")
    with pytest.warns(UserWarning, match="outside the coco label palette"):
        load_condition_image(str(tmp_path / "photo.png"), "mask")

    lines = np.zeros((100, 80), np.uint8)
    lines[50, :] = 255
    Image.fromarray(lines).save(tmp_path / "white_on_black.png")
    Image.fromarray(255 - lines).convert("RGB").save(tmp_path / "black_on_white.png")
    a = load_condition_image(str(tmp_path / "white_on_black.png"), "sketch")
    assert a.shape == (1, 256, 256) and (a[0, 128] == -1).all()
    assert torch.equal(a, load_condition_image(str(tmp_path / "black_on_white.png"), "sketch"))

    Image.new("RGB", (30, 20), (10, 20, 30)).save(tmp_path / "x_normal.png")
    Image.new("RGB", (30, 20), (40, 50, 60)).save(tmp_path / "x_depth.png")
    d = load_condition_image(str(tmp_path / "x_depth.png"), "depth")
    assert d.shape == (6, 256, 256)
    assert torch.equal(d, load_condition_image(f"{tmp_path}/x_normal.png,{tmp_path}/x_depth.png", "depth"))
    assert round(float(d[0, 0, 0]) * 127.5 + 127.5) == 10 and round(float(d[3, 0, 0]) * 127.5 + 127.5) == 40
    Image.new("L", (30, 20)).save(tmp_path / "g_depth.png")
    Image.new("RGB", (30, 20)).save(tmp_path / "g_normal.png")
    with pytest.raises(DataError, match="must be RGB"):
        load_condition_image(str(tmp_path / "g_depth.png"), "depth")
    with pytest.raises(DataError, match="unknown task"):
        load_condition_image(str(tmp_path / "mask.png"), "edges")
