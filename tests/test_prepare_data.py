"""prepare_data.py on tiny fixtures in the real dataset layouts, then batches from its output.

The fixture images encode their labels: the photo of a label map is the label map's own colors
(before JPEG and resizing), so a correctly paired, identically cropped and flipped sample has an
image that matches its condition away from region borders.
"""

import hashlib
import io
import os
import subprocess
import sys
import zipfile

import numpy as np
import torch
from PIL import Image

import prepare_data
from nanopiti.colormap import label_colormap, labels_to_color
from nanopiti.data import PairedDataset, collate_skip_none
from nanopiti.hed import HED

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def blocky_labels(rng, h, w, n_classes, cell=16):
    """A label map of cell x cell blocks with random classes (so borders are few and known)."""
    small = rng.integers(0, n_classes, size=(h // cell + 1, w // cell + 1))
    return np.kron(small, np.ones((cell, cell), dtype=np.int64))[:h, :w]


def save_pair(image_path, label_path, labels, palette):
    os.makedirs(os.path.dirname(image_path), exist_ok=True)
    os.makedirs(os.path.dirname(label_path), exist_ok=True)
    Image.fromarray(labels_to_color(labels, palette)).save(image_path, quality=98, subsampling=0)
    Image.fromarray(labels.astype(np.uint8), mode="L").save(label_path)


def make_ade20k(root, rng, bad_files=False):
    base = os.path.join(root, "ADEChallengeData2016")
    sizes = [(48, 64), (64, 40), (56, 56)]
    for split, folder in (("train", "training"), ("val", "validation")):
        for i, (h, w) in enumerate(sizes):
            stem = f"ADE_{split}_{i:08d}"
            labels = blocky_labels(rng, h, w, 151)
            save_pair(f"{base}/images/{folder}/{stem}.jpg", f"{base}/annotations/{folder}/{stem}.png", labels, "ade20k")
    if bad_files:
        img_dir, ann_dir = f"{base}/images/training", f"{base}/annotations/training"
        with open(f"{img_dir}/ADE_bad_corrupt.jpg", "wb") as f:  # not a JPEG at all
            f.write(b"\xff\xd8\xff garbage" * 10)
        Image.fromarray(np.zeros((8, 8), np.uint8), mode="L").save(f"{ann_dir}/ADE_bad_corrupt.png")
        Image.new("RGB", (32, 32)).save(f"{img_dir}/ADE_bad_nolabel.jpg")  # no annotation
        Image.new("RGB", (32, 32)).save(f"{img_dir}/ADE_bad_size.jpg")
        Image.new("L", (30, 32)).save(f"{ann_dir}/ADE_bad_size.png")  # 30 wide instead of 32
        Image.new("RGB", (32, 32)).save(f"{img_dir}/ADE_bad_rgb.jpg")
        Image.new("RGB", (32, 32)).save(f"{ann_dir}/ADE_bad_rgb.png")  # 3 channels: not indices
    return base


def make_coco(root, rng, sizes=((40, 56), (64, 48))):
    for split in ("train", "val"):
        for i, (h, w) in enumerate(sizes):
            labels = blocky_labels(rng, h, w, 182)
            labels[h // 2 - 6:h // 2 + 6, : w // 2] = 255  # an unlabeled band
            labels[h // 2 - 6:h // 2 + 6, w // 2:] = 181  # the last class
            stem = f"{i:012d}"
            save_pair(f"{root}/{split}2017/{stem}.jpg",
                      f"{root}/stuffthingmaps_trainval2017/{split}2017/{stem}.png", labels, "coco")


def run(argv, capsys):
    """main() in-process; returns (exit code, stdout, stderr)."""
    code = 0
    try:
        prepare_data.main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        if not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    out, err = capsys.readouterr()
    return code, out, err


def center_crop_expected(labels, palette, size=256):
    """The condition the loader must give with center crop and no flip, built independently."""
    h, w = labels.shape
    nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    resized = np.asarray(Image.fromarray(labels.astype(np.uint8)).resize((nw, nh), Image.NEAREST))
    y0, x0 = (nh - size) // 2, (nw - size) // 2
    return labels_to_color(resized[y0:y0 + size, x0:x0 + size], palette)


def to_uint8(t):
    return np.rint((t.permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.int64)


def uniform_interior(color, radius=12):
    """Pixels farther than `radius` from any region border: there the photo (bicubic-resized,
    JPEG-compressed) must have the label's color."""
    packed = torch.from_numpy((color[..., 0] << 16) | (color[..., 1] << 8) | color[..., 2])
    border = torch.zeros(packed.shape, dtype=torch.bool)
    border[:, 1:] |= packed[:, 1:] != packed[:, :-1]
    border[1:, :] |= packed[1:, :] != packed[:-1, :]
    near = torch.nn.functional.max_pool2d(border[None, None].float(), 2 * radius + 1, 1, radius)[0, 0]
    return (near == 0).numpy()


def test_ade20k_prepare_and_load(tmp_path, capsys):
    rng = np.random.default_rng(0)
    base = make_ade20k(str(tmp_path / "raw"), rng, bad_files=True)
    out = str(tmp_path / "out")
    code, _, stderr = run(["--data", "ade20k", "--root", str(tmp_path / "raw"), "--out", out, "--workers", "2"],
                          capsys)
    assert code == 0, stderr
    # 4 bad inputs of 4 kinds, counted and reported in one line and in skipped.txt
    assert "skipped 4 of 10 inputs" in stderr
    for reason in ("missing file", "size mismatch", "unreadable", "wrong channels"):
        assert reason in stderr
    skipped = open(f"{out}/skipped.txt").read()
    assert all(name in skipped for name in ("ADE_bad_corrupt", "ADE_bad_nolabel", "ADE_bad_size", "ADE_bad_rgb"))
    lines = open(f"{out}/train_mask.txt").read().splitlines()
    assert len(lines) == 3 and len(open(f"{out}/val_mask.txt").read().splitlines()) == 3
    # pre-resized copies: shorter side 256
    img = Image.open(os.path.join(out, lines[0].split("\t")[0]))
    assert min(img.size) == 256

    # pairing, exact: center crop, no flip -> condition equals the independently colored labels
    ds = PairedDataset(f"{out}/train_mask.txt", "mask", resolution=256, random_crop=False, random_flip=False)
    for i in range(len(ds)):
        sample = ds[i]
        stem = os.path.basename(sample["path"])[:-4]
        labels = np.asarray(Image.open(f"{base}/annotations/training/{stem}.png"))
        assert sample["cond"].shape == (3, 256, 256) and sample["image"].shape == (3, 256, 256)
        np.testing.assert_array_equal(to_uint8(sample["cond"]), center_crop_expected(labels, "ade20k"))

    # random crop + flip: the photo still matches its condition inside regions, in every epoch
    ds = PairedDataset(f"{out}/train_mask.txt", "mask", resolution=256, seed=3)
    seen = set()
    for epoch in range(4):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            s = ds[i]
            cond, image = to_uint8(s["cond"]), to_uint8(s["image"])
            inside = uniform_interior(cond)
            assert inside.mean() > 0.3
            assert np.abs(image - cond)[inside].max() <= 24
            # the check has teeth: against the mirrored photo it fails
            assert np.abs(image[:, ::-1] - cond)[inside].mean() > 20
            seen.add((i, s["cond"].sum().item()))
    assert len(seen) > len(ds)  # crops/flips really varied across epochs

    # batches at the base model's resolution
    loader = torch.utils.data.DataLoader(PairedDataset(f"{out}/train_mask.txt", "mask", seed=1),
                                         batch_size=3, collate_fn=collate_skip_none)
    batch = next(iter(loader))
    assert batch["image"].shape == (3, 3, 64, 64) and batch["cond"].shape == (3, 3, 256, 256)
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    assert batch["cond"].min() >= -1 and batch["cond"].max() <= 1


def test_coco_prepare_unlabeled_is_black_and_colors_match(tmp_path, capsys):
    rng = np.random.default_rng(1)
    make_coco(str(tmp_path / "coco"), rng)
    out = str(tmp_path / "out")
    code, _, stderr = run(["--data", "coco", "--root", str(tmp_path / "coco"), "--out", out, "--workers", "1"], capsys)
    assert code == 0, stderr
    ds = PairedDataset(f"{out}/val_mask.txt", "mask", resolution=256, random_crop=False, random_flip=False)
    table = label_colormap(182)
    for i in range(len(ds)):
        stem = os.path.basename(ds[i]["path"])[:-4]
        labels = np.asarray(Image.open(f"{tmp_path}/coco/stuffthingmaps_trainval2017/val2017/{stem}.png"))
        expected = center_crop_expected(labels, "coco")
        np.testing.assert_array_equal(to_uint8(ds[i]["cond"]), expected)
    cond = to_uint8(ds[0]["cond"])
    colors = {tuple(c) for c in cond.reshape(-1, 3)}
    assert (0, 0, 0) in colors and tuple(table[181]) in colors  # 255 -> black, 181 -> its color


def test_missing_and_half_present_datasets(tmp_path, capsys):
    code, _, err = run(["--data", "ade20k", "--root", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")], capsys)
    assert code != 0
    assert len(err.strip().splitlines()) == 1
    assert "ADE20K not found" in err and "--download" in err and "ADEChallengeData2016.zip" in err
    # images without annotations: "incomplete", naming what is missing
    Image.new("RGB", (8, 8)).save(tmp_path / "x.jpg")
    for d in ("training", "validation"):
        os.makedirs(tmp_path / f"half/ADEChallengeData2016/images/{d}")
        Image.new("RGB", (8, 8)).save(tmp_path / f"half/ADEChallengeData2016/images/{d}/a.jpg")
    code, _, err = run(["--data", "ade20k", "--root", str(tmp_path / "half"), "--out", str(tmp_path / "o")], capsys)
    assert code != 0 and len(err.strip().splitlines()) == 1
    expected = err.split("expected ")[1].split("; fetch")[0]
    assert "incomplete" in err and "images/" not in expected
    assert "annotations/training/*.png" in expected and "annotations/validation/*.png" in expected
    code, _, err = run(["--data", "coco", "--root", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")], capsys)
    assert code != 0 and "stuffthingmaps_trainval2017.zip" in err and "train2017.zip" in err


def test_cli_one_line_error_and_exit_code(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "prepare_data.py"), "--data", "diode",
                             "--root", str(tmp_path / "none"), "--out", str(tmp_path / "o")],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: DIODE not found")
    assert "val_normals.tar.gz" in result.stderr


def test_diode_prepare_and_load(tmp_path, capsys):
    rng = np.random.default_rng(2)
    h, w = 64, 48  # portrait: the shorter side (x) is kept whole by the 256 center crop
    for split in ("train", "val"):
        scan = tmp_path / f"diode/{split}/indoors/scene_00001/scan_00002"
        os.makedirs(scan)
        for i in range(2):
            stem = scan / f"00001_00002_indoors_000_{i:03d}"
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(f"{stem}.png")
            depth = np.tile(np.linspace(0.2, 50.0, w, dtype=np.float32), (h, 1))  # near left, far right
            mask = np.ones((h, w), np.float32)
            mask[28:36, 20:28] = 0  # a hole without depth
            normal = np.zeros((h, w, 3), np.float32)
            normal[: h // 2] = (0.0, -1.0, 0.0)  # floor facing up (y down): min component -1
            normal[h // 2:] = (0.0, 0.0, 1.0)
            normal[:, -4:] = 0.0  # unknown normals
            np.save(f"{stem}_depth.npy", depth[..., None])
            np.save(f"{stem}_depth_mask.npy", mask)
            np.save(f"{stem}_normal.npy", normal)
    os.remove(tmp_path / "diode/val/indoors/scene_00001/scan_00002/00001_00002_indoors_000_001_normal.npy")
    out = str(tmp_path / "out")
    code, _, stderr = run(["--data", "diode", "--root", str(tmp_path / "diode"), "--out", out, "--workers", "1"],
                          capsys)
    assert code == 0, stderr
    assert "skipped 1 of 4 inputs (1 missing file)" in stderr
    ds = PairedDataset(f"{out}/train_depth.txt", "depth", resolution=256, random_crop=False, random_flip=False)
    assert ds[0]["cond"].shape == (6, 256, 256)
    cond = to_uint8(ds[0]["cond"])
    normal, depth = cond[..., :3], cond[..., 3:]  # PITI's order: normals first
    # normals: (n - min) / 2 with min = -1: up-facing floor (0, -1, 0) -> (127, 0, 127)
    np.testing.assert_array_equal(normal[10, 100], [127, 0, 127])
    np.testing.assert_array_equal(normal[200, 100], [127, 127, 255])
    np.testing.assert_array_equal(normal[10, 250], [0, 0, 0])  # unknown normal -> black
    # depth: 0.2 m (under 1 m) -> first jet color (0, 0, 0.5); 50 m (the 99th percentile D) ->
    # entry int(256 log 50 / log(50 + 1.01)) = 254 of jet, whose red falls from 1 to 0.5 over
    # [0.89, 1]; 10 m -> 0.59 of the way: green-yellow; the hole -> black
    np.testing.assert_array_equal(depth[100, 0], [0, 0, 127])
    assert int(256 * np.log(50) / np.log(51.01)) == 254
    np.testing.assert_array_equal(depth[100, 255], [int(255 * (1 - 0.5 * (254 / 255 - 0.89) / 0.11)), 0, 0])
    np.testing.assert_array_equal(depth[128, 128], [0, 0, 0])
    col_10m = int(round((10.0 - 0.2) / (49.8 / 47) * 256 / 48))
    r, g, b = depth[60, col_10m]
    assert r > 150 and g == 255 and b < 100


def _fake_published_hed(path):
    """A random HED saved under the published key names (moduleVggOne.0.weight, ...)."""
    names = ("One", "Two", "Thr", "Fou", "Fiv")
    published = {}
    for key, value in HED().state_dict().items():
        part, *rest = key.split(".")
        if part == "stages":
            key = f"moduleVgg{names[int(rest[0])]}." + ".".join(rest[1:])
        elif part == "scores":
            key = f"moduleScore{names[int(rest[0])]}." + ".".join(rest[1:])
        else:
            key = "moduleCombine.0." + rest[0]
        published[key] = value
    torch.save(published, path)
    return published


def test_coco_sketch_fallback_warns_and_hed_weights_load(tmp_path, capsys):
    rng = np.random.default_rng(4)
    make_coco(str(tmp_path / "coco"), rng)
    out = str(tmp_path / "out")
    code, _, err = run(["--data", "coco-sketch", "--root", str(tmp_path / "coco"), "--out", out, "--size", "64"],
                       capsys)
    assert code == 0
    assert "WARNING" in err and "HED" in err and "PITI's sketch checkpoints expect HED sketches" in err
    sketch = np.asarray(Image.open(f"{out}/train/sketches/000000000000.png"))
    assert set(np.unique(sketch)) == {0, 255}
    ds = PairedDataset(f"{out}/train_sketch.txt", "sketch", resolution=64, cond_size=64)
    s = ds[0]
    assert s["cond"].shape == (1, 64, 64) and s["cond"].min() == -1.0 and s["cond"].max() > -1.0

    published = _fake_published_hed(tmp_path / "hed.pytorch")
    assert "moduleVggOne.0.weight" in published and "moduleScoreFiv.bias" in published
    assert "moduleCombine.0.weight" in published and "moduleVggFiv.5.weight" in published
    make_coco(str(tmp_path / "small"), rng, sizes=[(32, 32)])
    code, _, err = run(["--data", "coco-sketch", "--root", str(tmp_path / "small"), "--out", str(tmp_path / "out2"),
                        "--size", "32", "--hed-weights", str(tmp_path / "hed.pytorch"), "--device", "cpu"], capsys)
    assert code == 0 and "WARNING" not in err
    torch.save({"foo": torch.zeros(1)}, tmp_path / "wrong.pt")
    code, _, err = run(["--data", "coco-sketch", "--root", str(tmp_path / "small"), "--out", str(tmp_path / "out3"),
                        "--hed-weights", str(tmp_path / "wrong.pt"), "--device", "cpu"], capsys)
    assert code != 0 and "not a HED checkpoint" in err and len(err.strip().splitlines()) == 1


def test_toy_prepare_and_load(tmp_path, capsys):
    root = str(tmp_path / "toy")
    code, _, err = run(["--data", "toy", "--root", root, "--num", "6", "--size", "64", "--workers", "1"], capsys)
    assert code == 0, err
    for task, channels in (("mask", 3), ("sketch", 1), ("depth", 6)):
        ds = PairedDataset(f"{root}/train_{task}.txt", task, resolution=32, cond_size=64)
        assert len(ds) == 5
        s = ds[0]
        assert s["cond"].shape == (channels, 64, 64) and s["image"].shape == (3, 32, 32)
        assert isinstance(s["caption"], str) and len(s["caption"].split()) > 2
    assert len(open(f"{root}/val_mask.txt").read().splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# The downloader, against a local HTTP server (127.0.0.1 only)
# ---------------------------------------------------------------------------------------------

def test_download_flag_fetches_unpacks_and_prepares(tmp_path, capsys, monkeypatch, file_server):
    """--download end to end: a fixture ADE20K zip served locally in place of the official one."""
    rng = np.random.default_rng(6)
    src = tmp_path / "src"
    make_ade20k(str(src), rng)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for dirpath, _, files in os.walk(src):
            for name in files:
                full = os.path.join(dirpath, name)
                z.write(full, os.path.relpath(full, src))
    server = file_server(buf.getvalue())
    url, md5, into, provides = prepare_data.ARCHIVES["ade20k"][0]
    monkeypatch.setitem(prepare_data.ARCHIVES, "ade20k",
                        [(server.url, hashlib.md5(buf.getvalue()).hexdigest(), into, provides)])
    root, out = str(tmp_path / "root"), str(tmp_path / "out")
    code, stdout, err = run(["--data", "ade20k", "--root", root, "--out", out, "--download"], capsys)
    assert code == 0, err
    assert len(open(f"{out}/train_mask.txt").read().splitlines()) == 3
    assert not os.path.exists(f"{root}/data.zip")  # unpacked, archive removed
    code, stdout, err = run(["--data", "ade20k", "--root", root, "--out", out, "--download"], capsys)
    assert code == 0 and "already unpacked" in stdout and len(server.ranges) == 1
