"""From the datasets as published to list files of training pairs that nanopiti.data reads.

    python prepare_data.py --data ade20k      --root ~/datasets [--download]
    python prepare_data.py --data coco        --root ~/datasets/coco [--download]
    python prepare_data.py --data coco-sketch --root ~/datasets/coco [--hed-weights checkpoints/network-bsds500.pytorch]
    python prepare_data.py --data diode       --root ~/datasets/diode [--download]
    python prepare_data.py --data toy         --root data/toy --num 2000

Each run writes the resized photos, their condition pictures, {train,val}_{task}.txt (one pair per
line: image<TAB>condition[<TAB>caption]) and skipped.txt under --out (default data/<name>; toy:
--root itself); docs/data.md shows the layout. Existing outputs are reused unless --overwrite.
"""

import argparse
import functools
import glob
import os
import sys
from collections import Counter
from multiprocessing import Pool

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from nanopiti.checkpoint import folder_problem
from nanopiti.conditions import encode_depth, encode_normal
from nanopiti.data import DataError, label_image_to_color, open_image, shorter_side_size
from nanopiti.download import DownloadError, archive_problem, download, unpack
from nanopiti.hed import HEDError, canny_edges, hed_sketch, load_hed
from toyworld.data import scene_condition_arrays
from toyworld.world import render_scene

class PrepareError(Exception):
    """Something the user must fix (missing dataset, failed download); printed as one line."""

# --- Downloading (nanopiti/download.py: resumable, verified), then unpacking ---

# name -> [(url, md5 or None, folder to unpack into (relative to --root), a glob matching once it is unpacked)]
ARCHIVES = {
    "ade20k": [("http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip",
                "7328b3957e407ddae1d3cbf487f149ef", ".", "ADEChallengeData2016/images/training/*.jpg")],
    "coco": [
        ("http://images.cocodataset.org/zips/train2017.zip", "cced6f7f71b7629ddf16f17bbcfab6b2", ".", "train2017/*.jpg"),
        ("http://images.cocodataset.org/zips/val2017.zip", "442b8da7639aecaf257c1dceb8ba8c80", ".", "val2017/*.jpg"),
        ("http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/stuffthingmaps_trainval2017.zip",
         None, "stuffthingmaps_trainval2017", "stuffthingmaps_trainval2017/val2017/*.png"),
    ],
    "diode": [(f"http://diode-dataset.s3.amazonaws.com/{name}.tar.gz", None, ".", pattern)
              for name, pattern in [("train", "train/*/*/*/*_depth.npy"), ("val", "val/*/*/*/*_depth.npy"),
                                    ("train_normals", "train/*/*/*/*_normal.npy"),
                                    ("val_normals", "val/*/*/*/*_normal.npy")]],
}
ARCHIVES["coco-sketch"] = ARCHIVES["coco"][:2]

def fetch(name, root):
    """Download and unpack the archives of dataset `name` that `root` does not hold yet."""
    for url, md5, into, provides in ARCHIVES[name]:
        archive = os.path.join(root, url.rsplit("/", 1)[-1])
        unpacked = next(glob.iglob(os.path.join(root, provides)), None) is not None
        if unpacked and not os.path.exists(archive):
            print(f"{os.path.basename(archive)}: already unpacked under {root}")
            continue
        os.makedirs(root, exist_ok=True)
        if not os.path.exists(archive):
            download(url, archive, md5, check=lambda path, name=archive: archive_problem(path, name))
        unpack(archive, os.path.join(root, into))
        os.remove(archive)  # unpacked completely; the archive only costs disk space now

# --- Per-pair work (top-level functions so that multiprocessing can send them to workers) ---

def _save(img, path, **kwargs):
    """Write atomically, so an interrupted run never leaves a half-written file behind."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    img.save(tmp, format="JPEG" if path.endswith(".jpg") else "PNG", **kwargs)
    os.replace(tmp, path)

def _nearest(arr, size):
    """Nearest-neighbour resize of any (H, W, ...) array to size = (w, h), sampling centers."""
    h, w = arr.shape[:2]
    rows = np.minimum(((np.arange(size[1]) + 0.5) * h / size[1]).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(size[0]) + 0.5) * w / size[0]).astype(np.int64), w - 1)
    return arr[rows][:, cols]

def _photo_pair(job, folders, conditions):
    """Write a photo resized to --size and its condition PNGs (one per folder) of conditions(photo, resized photo),
    unless they exist and not --overwrite (a DataError writes nothing); return the list line."""
    photo, out, split, size, overwrite = job
    stem = os.path.splitext(os.path.basename(photo))[0]
    rel_img, rels = f"{split}/images/{stem}.jpg", [f"{split}/{folder}/{stem}.png" for folder in folders]
    if overwrite or not all(os.path.exists(os.path.join(out, r)) for r in [rel_img] + rels):
        image = open_image(photo).convert("RGB")
        resized = image.resize(shorter_side_size(*image.size, size), Image.BICUBIC)
        arrays = conditions(image, resized)
        _save(resized, os.path.join(out, rel_img), quality=95)
        for rel, arr in zip(rels, arrays):
            _save(Image.fromarray(arr), os.path.join(out, rel))
    return f"{rel_img}\t{','.join(rels)}"

def _mask_pair(job, palette):
    """((photo, class-index label map), ...) -> resized photo + color-coded label map."""
    (photo, label_path), *rest = job
    def conditions(image, resized):
        label = open_image(label_path)
        if label.mode not in ("L", "P", "I", "I;16"):
            raise DataError(f"{label_path}: expected a single-channel class-index PNG, got mode {label.mode}",
                            reason="wrong channels")
        if label.size != image.size:
            raise DataError(f"{label_path}: size {label.size} differs from its image {image.size}",
                            reason="size mismatch")
        return [label_image_to_color(label.resize(resized.size, Image.NEAREST), palette, name=label_path)]
    return _photo_pair((photo, *rest), ["labels"], conditions)

def _sketch_pair(job, model=None):
    """A photo -> resized photo + binary sketch (HED when `model` is given, else Canny)."""
    def conditions(image, resized):
        rgb = np.asarray(resized)
        edges = hed_sketch(model, rgb) if model is not None else canny_edges(rgb)
        return [np.where(edges, 255, 0).astype(np.uint8)]
    return _photo_pair(job, ["sketches"], conditions)

def _diode_pair(job):
    """DIODE (png, depth, depth mask, normals) -> resized photo + PITI's normal and depth PNGs."""
    def conditions(image, resized):
        arrays = []
        for suffix in ("_depth.npy", "_depth_mask.npy", "_normal.npy"):
            path = job[0][:-4] + suffix
            try:
                arr = np.load(path, allow_pickle=False)
            except FileNotFoundError:
                raise DataError(f"{path}: no such file", reason="missing file") from None
            except (ValueError, OSError, EOFError) as e:
                raise DataError(f"{path}: unreadable ({e})") from None
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                raise DataError(f"{path}: {int((~np.isfinite(arr)).sum())} values are NaN or infinite",
                                reason="non-finite values")
            if arr.shape[:2] != (image.size[1], image.size[0]):
                raise DataError(f"{path}: shape {arr.shape} does not match its image {image.size}",
                                reason="size mismatch")
            arrays.append(_nearest(arr, resized.size))
        depth, valid, normal = arrays
        return [encode_normal(normal), encode_depth(depth.reshape(valid.shape[:2]), valid)]
    return _photo_pair(job, ["normals", "depth"], conditions)

def _toy_scene(job):
    """Render toy scene `index` and store it in all three tasks' encodings."""
    index, out, split, size = job
    scene = render_scene(index, size)
    stem = f"{index:06d}"
    caption = " ".join(scene.caption.split())  # no tabs or newlines inside a list-file line
    _save(Image.fromarray(scene.image), os.path.join(out, f"{split}/images/{stem}.png"))
    lines = {}
    for task, folders in (("mask", ["labels"]), ("sketch", ["sketches"]), ("depth", ["normals", "depth"])):
        _, conds = scene_condition_arrays(scene, task)
        rels = [f"{split}/{folder}/{stem}.png" for folder in folders]
        for rel, arr in zip(rels, conds):
            _save(Image.fromarray(arr), os.path.join(out, rel))
        lines[task] = f"{split}/images/{stem}.png\t{','.join(rels)}\t{caption}"
    return lines

def _guarded(fn_job):
    """Run one job: (its result, None), or a bad input's (None, (reason, message))."""
    fn, job = fn_job
    try:
        return fn(job), None
    except DataError as e:
        return None, (e.reason, str(e))

def run_jobs(fn, jobs, workers, desc):
    """Map `fn` over `jobs` (in order) with a progress bar; returns results and skips."""
    tasks = [(fn, job) for job in jobs]
    if workers > 1 and len(tasks) > 1:
        with Pool(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            results = list(tqdm(pool.imap(_guarded, tasks, chunksize=8), total=len(tasks), desc=desc))
    else:
        results = [_guarded(t) for t in tqdm(tasks, desc=desc)]
    return [r for r, _ in results if r is not None], [s for _, s in results if s is not None]

def finish(out, lists, skipped, n_inputs):
    """Write the list files and skipped.txt, and say what happened."""
    os.makedirs(out, exist_ok=True)
    for name, lines in lists.items():
        with open(os.path.join(out, name), "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in lines)
        print(f"wrote {os.path.join(out, name)} ({len(lines)} pairs)")
    with open(os.path.join(out, "skipped.txt"), "w", encoding="utf-8") as f:
        f.writelines(f"{reason}\t{message}\n" for reason, message in skipped)
    if skipped:
        counts = Counter(reason for reason, _ in skipped)
        detail = ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items()))
        print(f"skipped {len(skipped)} of {n_inputs} inputs ({detail}); see {os.path.join(out, 'skipped.txt')}",
              file=sys.stderr)

def require(args, name, parts):
    """parts: {description: [files]}; raise one line naming every empty part."""
    if missing := [desc for desc, files in parts.items() if not files]:
        state = "not found" if len(missing) == len(parts) else "incomplete"
        raise PrepareError(f"{name} {state} under {args.root}: expected {'; '.join(missing)}; fetch it with: "
                           f"python prepare_data.py --data {args.data} --root {args.root} --download "
                           f"(downloads {' '.join(a[0] for a in ARCHIVES[args.data])})")

def prepare_splits(args, fn, found, task, workers, unpaired=()):
    """Run `fn` on every split's inputs; write {split}_{task}.txt and skipped.txt (`unpaired` inputs first)."""
    lists, skipped = {}, list(unpaired)
    for split, inputs in found.items():
        jobs = [(p, args.out, split, args.size, args.overwrite) for p in inputs]
        lists[f"{split}_{task}.txt"], skips = run_jobs(fn, jobs, workers, f"{task} {split}")
        skipped += skips
    finish(args.out, lists, skipped, sum(len(f) for f in found.values()) + len(unpaired))

def prepare_masks(args):
    """ADE20K / COCO-Stuff, colored with the palette of that name: a photo pairs with the label map of its stem."""
    if args.data == "ade20k":  # --root may hold ADEChallengeData2016 (as unzipped) or be that folder itself
        unzipped = os.path.isdir(os.path.join(args.root, "images"))
        base = args.root if unzipped else os.path.join(args.root, "ADEChallengeData2016")
        name, splits = "ADE20K", {s: (f"{base}/images/{d}/*.jpg", f"{base}/annotations/{d}/*.png")
                                  for s, d in (("train", "training"), ("val", "validation"))}
    else:
        stuff = os.path.join(args.root, "stuffthingmaps_trainval2017")
        name, splits = "COCO-Stuff", {s: (f"{args.root}/{s}2017/*.jpg", f"{stuff}/{s}2017/*.png")
                                      for s in ("train", "val")}
    found = {pattern: sorted(glob.glob(pattern)) for patterns in splits.values() for pattern in patterns}
    require(args, name, found)
    pairs, unpaired = {}, []
    for split, (images, labels) in splits.items():
        by_stem, pairs[split] = {os.path.basename(p)[:-4]: p for p in found[labels]}, []
        for image in found[images]:
            stem = os.path.splitext(os.path.basename(image))[0]
            if stem in by_stem:
                pairs[split].append((image, by_stem[stem]))
            else:
                unpaired.append(("missing file", f"{image}: no label map {stem}.png"))
    prepare_splits(args, functools.partial(_mask_pair, palette=args.data), pairs, "mask", args.workers, unpaired)

def prepare_coco_sketch(args):
    found = {s: sorted(glob.glob(os.path.join(args.root, f"{s}2017", "*.jpg"))) for s in ("train", "val")}
    require(args, "COCO images", {f"{args.root}/{s}2017/*.jpg": f for s, f in found.items()})
    if args.hed_weights:  # one process drives the network (on the GPU when there is one)
        fn, workers = functools.partial(_sketch_pair, model=load_hed(args.hed_weights, args.device)), 1
    else:
        fn, workers = _sketch_pair, args.workers
        print("WARNING: no --hed-weights given: using the weight-free Canny edge detector instead of HED.\n"
              "WARNING: PITI's sketch checkpoints expect HED sketches (sniklaus/pytorch-hed, "
              "network-bsds500.pytorch: python -m nanopiti.download hed); Canny edges are only for training your own models.",
              file=sys.stderr)
    prepare_splits(args, fn, found, "sketch", workers)

def prepare_diode(args):
    found = {}
    for split in ("train", "val"):
        pngs = sorted(glob.glob(os.path.join(args.root, split, "**", "*.png"), recursive=True))
        found[split] = [p for p in pngs if os.path.exists(p[:-4] + "_depth.npy")]
    normals = {s: [p for p in f if os.path.exists(p[:-4] + "_normal.npy")] for s, f in found.items()}
    parts = {f"{args.root}/{s}/<scene>/<scan>/*.png with *_depth.npy, *_depth_mask.npy": found[s] for s in found}
    parts.update({f"*_normal.npy beside the {s} images ({s}_normals.tar.gz)": normals[s] for s in normals})
    require(args, "DIODE", parts)
    prepare_splits(args, _diode_pair, found, "depth", args.workers)

def prepare_toy(args):
    if args.num < 2:
        raise PrepareError(f"--num {args.num}: the toy world needs at least 2 scenes (one for val)")
    n_val = max(1, args.num // 10)
    jobs = [(i, args.out, "val" if i >= args.num - n_val else "train", args.size) for i in range(args.num)]
    results, skipped = run_jobs(_toy_scene, jobs, args.workers, "toy scenes")
    lists = {f"{split}_{task}.txt": [] for split in ("train", "val") for task in ("mask", "sketch", "depth")}
    for (_, _, split, _), lines in zip(jobs, results):
        for task, line in lines.items():
            lists[f"{split}_{task}.txt"].append(line)
    finish(args.out, lists, skipped, args.num)

PREPARE = {"ade20k": prepare_masks, "coco": prepare_masks, "coco-sketch": prepare_coco_sketch,
           "diode": prepare_diode, "toy": prepare_toy}

def check_args(args):
    """Every option, checked before any work starts: one line naming the option and what to do."""
    for name in ("size", "workers", "num"):
        if getattr(args, name) < 1:
            raise PrepareError(f"--{name} {getattr(args, name)}: must be at least 1")
    if os.path.exists(args.root) and not os.path.isdir(args.root):
        raise PrepareError(f"--root {args.root} is a file; give the folder that holds (or will hold) the dataset")
    for flag, folder in (("--out", args.out), ("--root", args.root if args.download else None)):
        if problem := folder and folder_problem(folder):
            raise PrepareError(f"{flag} {folder}: {problem}; give a folder that can be written")

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, choices=sorted(PREPARE))
    parser.add_argument("--root", required=True, help="where the dataset is (or goes, with --download)")
    parser.add_argument("--out", help="output folder (default: data/<name>; toy: --root)")
    parser.add_argument("--download", action="store_true", help="fetch the official archives first")
    parser.add_argument("--size", type=int, default=256, help="shorter side of the stored pictures")
    parser.add_argument("--hed-weights", help="coco-sketch: sniklaus/pytorch-hed network-bsds500.pytorch")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num", type=int, default=2000, help="toy: number of scenes (10%% go to val)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--overwrite", action="store_true", help="redo outputs that already exist")
    args = parser.parse_args(argv)
    args.out = args.out or (args.root if args.data == "toy" else os.path.join("data", args.data))
    try:
        check_args(args)
        if args.download:
            if args.data == "toy":
                raise PrepareError("the toy world is rendered, not downloaded; drop --download")
            fetch(args.data, args.root)
        PREPARE[args.data](args)
    except (PrepareError, DownloadError, DataError, HEDError) as e:
        sys.exit(f"error: {e}")

if __name__ == "__main__":
    main()
