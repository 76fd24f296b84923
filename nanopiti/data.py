"""Training pairs for PITI: an image and its condition, both ready for the model (docs/data.md). Each sample is a dict:

    image    3 x R x R float in [-1, 1]     R = 64 for the base model, 256 for the upsampler
    cond     C x 256 x 256 float in [-1, 1] C = 3 (mask), 1 (sketch), 6 (depth + normal)
    low_res  3 x 64 x 64 float in [-1, 1]   upsampler only: the degraded input (nanopiti.degrade)
    caption  str                            when the list file (or the toy world) has one
    path     str                            the image file, for logging and evaluation

Conditions are encoded as in the PITI release (nanopiti.conditions) and always resized with nearest neighbour.
Image and condition are resized (shorter side 256), cropped to 256 x 256 and flipped together, with randomness
seeded by (seed, epoch, index); unreadable pairs are skipped.
"""

import os
import warnings
from collections import defaultdict

import numpy as np
import torch
from PIL import Image

from .colormap import in_palette, labels_to_color
from .conditions import TASK_CHANNELS, binarize_sketch, distance_field, sketch_to_condition

class DataError(Exception):
    """A data file that cannot be used; `reason` is its category in the skip report ("size mismatch", ...)."""

    def __init__(self, message, reason="unreadable"):
        super().__init__(message)
        self.reason = reason

def open_image(path):
    """Open and fully decode an image, turning every PIL/OS failure into a one-line DataError."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file", reason="missing file") from None
    except Exception as e:  # truncated, corrupt, not an image, decompression bomb, ...
        raise DataError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None

def open_rgb(path):
    """A depth or normal picture, which PITI encodes as RGB; any other mode is a DataError."""
    img = open_image(path)
    if img.mode not in ("RGB", "RGBA"):
        raise DataError(f"{path}: depth and normal pictures must be RGB, got mode {img.mode}", reason="wrong channels")
    return img.convert("RGB")

def label_image_to_color(img, palette="coco", name="label map"):
    """A label map -> HxWx3 uint8 color-coded map: RGB(A) as is; class indices (L, I, I;16) colored with `palette`;
    a palette PNG by its colors, unless each pixel is the gray of its index (class indices saved as "P")."""
    if img.mode == "P":
        rgb = np.asarray(img.convert("RGB"))
        if not (rgb == np.asarray(img)[..., None]).all():
            return rgb
    if img.mode in ("RGB", "RGBA"):
        return np.asarray(img.convert("RGB"))
    if img.mode in ("L", "I", "I;16", "P"):
        try:
            return labels_to_color(np.asarray(img), palette)
        except ValueError as e:
            raise DataError(f"{name}: {e}", reason="bad labels") from None
    raise DataError(f"{name} has mode {img.mode}; expected an RGB color-coded map or "
                    "single-channel class indices", reason="wrong channels")

def shorter_side_size(w, h, size):
    """(w, h) -> the size whose shorter side is `size` (longer side truncated, as PITI does)."""
    return (size, int(size * h / w)) if w <= h else (int(size * w / h), size)

def _resize(arr, size, resample):
    if (arr.shape[1], arr.shape[0]) == size:
        return arr
    return np.asarray(Image.fromarray(arr).resize(size, resample))

def _to_unit(arr):
    """HxWxC (or HxW) uint8 -> CxHxW float32 in [-1, 1], in numpy (torch's threads cost more on arrays this small)."""
    x = np.asarray(arr, dtype=np.float32) / 127.5 - 1.0
    return np.ascontiguousarray(x[None] if x.ndim == 2 else x.transpose(2, 0, 1))

class PairTransform:
    """Resize / crop / flip an image and its condition arrays together, then encode them."""

    def __init__(self, task, resolution, cond_size, random_flip, random_crop, upsampler, low_res):
        if task not in TASK_CHANNELS:
            raise DataError(f"unknown task {task!r}; expected one of {sorted(TASK_CHANNELS)}")
        self.task, self.resolution, self.cond_size = task, resolution, cond_size
        self.random_flip, self.random_crop = random_flip, random_crop
        self.upsampler, self.low_res = upsampler, low_res

    def __call__(self, image, conds, rng):
        """image HxWx3 uint8, conds: list of HxW or HxWx3 uint8 arrays of the same H, W."""
        s = self.cond_size
        size = shorter_side_size(image.shape[1], image.shape[0], s)
        image = _resize(image, size, Image.BICUBIC)
        conds = [_resize(c, size, Image.NEAREST) for c in conds]
        w, h = size
        if self.random_crop:
            x0, y0 = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
        else:
            x0, y0 = (w - s) // 2, (h - s) // 2
        flip = self.random_flip and rng.random() < 0.5
        def window(a):
            a = a[y0:y0 + s, x0:x0 + s]
            return a[:, ::-1] if flip else a
        image, conds = window(image), [window(c) for c in conds]
        if self.task == "sketch":
            cond = distance_field(binarize_sketch(conds[0]))
        else:
            cond = np.concatenate([_to_unit(c) for c in conds], axis=0)

        r = self.resolution
        image_r = _resize(np.ascontiguousarray(image), (r, r), Image.BICUBIC)
        sample = {"image": torch.from_numpy(_to_unit(image_r)), "cond": torch.from_numpy(cond)}
        if self.upsampler:
            from .degrade import degrade_for_upsampler
            low = degrade_for_upsampler(image_r, r // self.low_res, rng)  # float in [0, 1]
            low = np.ascontiguousarray(low.transpose(2, 0, 1) * 2.0 - 1.0, dtype=np.float32)
            sample["low_res"] = torch.from_numpy(low)
        return sample

def sample_rng(seed, epoch, index):
    return np.random.default_rng([seed, epoch, index])

class PairedDataset(torch.utils.data.Dataset):
    """Pairs from a list file of prepare_data.py: one pair a line, "image<TAB>condition[<TAB>caption]", paths
    relative to the list file, a condition of several files comma-separated (depth: "normal.png,depth.png").
    `upsampler` adds `low_res`, the image degraded (nanopiti.degrade) by resolution // low_res; `palette` colors
    class-index label maps ('coco' or 'ade20k'). Malformed lines and missing files are dropped at once, unusable
    files when first read: all are counted in `skipped` and `report()` (a DataLoader worker's copy reports by its
    warnings only)."""

    def __init__(self, list_file, task, resolution=64, cond_size=256, random_flip=True, random_crop=True,
                 upsampler=False, low_res=64, seed=0, palette="coco", max_substitutions=16):
        self.transform = PairTransform(task, resolution, cond_size, random_flip, random_crop, upsampler, low_res)
        self.list_file, self.task, self.palette = list_file, task, palette
        self.seed, self.epoch, self.max_substitutions = seed, 0, max_substitutions
        self.skipped = defaultdict(list)  # reason -> [path, ...]
        self._bad = set()
        if not os.path.isfile(list_file):
            raise DataError(f"list file {list_file} not found; create it with prepare_data.py")
        base = os.path.dirname(os.path.abspath(list_file))
        n_conds = 2 if task == "depth" else 1
        self.entries = []
        with open(list_file, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                line = line.rstrip("\r\n")
                if not line.strip():
                    continue
                cols = line.split("\t")
                image = os.path.join(base, cols[0])
                conds = [os.path.join(base, c) for c in cols[1].split(",")] if len(cols) > 1 and cols[1] else []
                if len(conds) != n_conds:
                    self.skipped["malformed line"].append(f"{list_file}:{number}")
                elif missing := [p for p in [image] + conds if not os.path.isfile(p)]:
                    self.skipped["missing file"].append(missing[0])
                else:
                    self.entries.append((image, conds, cols[2] if len(cols) > 2 else None))
        if not self.entries:
            raise DataError(f"{list_file}: no usable pairs ({self.report()})")
        if self.skipped:
            warnings.warn(self.report())

    def __len__(self):
        return len(self.entries)

    def set_epoch(self, epoch):
        """Select the augmentation of this epoch (call it where you call sampler.set_epoch)."""
        self.epoch = epoch

    def load_pair(self, index):
        """Read entry `index` as uint8 arrays (image, [conditions]); DataError when unusable."""
        image_path, cond_paths, _ = self.entries[index]
        image = np.asarray(open_image(image_path).convert("RGB"))
        conds = []
        for p in cond_paths:
            if self.task == "mask":
                conds.append(label_image_to_color(open_image(p), self.palette, name=p))
            elif self.task == "sketch":
                conds.append(np.asarray(open_image(p).convert("L")))
            else:
                conds.append(np.asarray(open_rgb(p)))
            if conds[-1].shape[:2] != image.shape[:2]:
                raise DataError(f"{p}: size {conds[-1].shape[1]}x{conds[-1].shape[0]} differs from "
                                f"its image {image_path} ({image.shape[1]}x{image.shape[0]})", reason="size mismatch")
        return image, conds

    def __getitem__(self, index):
        for k in range(self.max_substitutions):
            j = (index + k) % len(self.entries)
            if j in self._bad:
                continue
            try:
                image, conds = self.load_pair(j)
            except DataError as e:
                self._bad.add(j)
                self.skipped[e.reason].append(self.entries[j][0])
                warnings.warn(f"skipping pair {j}: {e}")
                continue
            sample = self.transform(image, conds, sample_rng(self.seed, self.epoch, j))
            sample["path"] = self.entries[j][0]
            if self.entries[j][2] is not None:
                sample["caption"] = self.entries[j][2]
            return sample
        return None  # only if max_substitutions bad pairs in a row; collate_skip_none drops it

    def report(self):
        """One line: how many pairs are used and which were skipped, and why."""
        n_skipped = sum(len(v) for v in self.skipped.values())
        if not n_skipped:
            return f"{self.list_file}: {len(self.entries)} pairs, none skipped"
        reasons = ", ".join(f"{k}: {len(v)} (e.g. {v[0]})" for k, v in sorted(self.skipped.items()))
        return f"{self.list_file}: {len(self.entries) - len(self._bad)} usable pairs, {n_skipped} skipped ({reasons})"

def collate_skip_none(batch):
    """DataLoader collate that drops the (rare) None samples instead of crashing the epoch."""
    batch = [b for b in batch if b is not None]
    return torch.utils.data.default_collate(batch) if batch else None

class EpochIndexed(torch.utils.data.Dataset):
    """Reads keys (epoch, index): the augmentation of a sample depends on its epoch (set_epoch),
    and a global batch may straddle two epochs, so the epoch travels with every index."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        self.dataset.set_epoch(epoch)
        return self.dataset[index]

class StepBatches(torch.utils.data.Sampler):
    """This process's share of every step's global batch, from `start` on: batch k is the slice [k B, (k + 1) B)
    of one permutation per epoch (seeded by (seed, epoch)), process r takes the r-th of `world` equal parts. The
    order depends only on seed and step: a resumed run reads what the uninterrupted one would, on any world size."""

    def __init__(self, n, global_batch, rank, world, seed, start, stop):
        self.n, self.batch, self.rank, self.world = n, global_batch, rank, world
        self.seed, self.start, self.stop = seed, start, stop
        self._perms = {}

    def __len__(self):
        return self.stop - self.start

    def _item(self, position):
        epoch, i = divmod(position, self.n)
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return epoch, int(self._perms[epoch][i])

    def __iter__(self):
        share = self.batch // self.world
        for step in range(self.start, self.stop):
            first = step * self.batch + self.rank * share
            yield [self._item(p) for p in range(first, first + share)]

class SyntheticPairs(torch.utils.data.Dataset):
    """Random tensors of the right shapes (and random caption tokens): benchmarks without data."""

    def __init__(self, config, low_res, size=100_000):
        self.config, self.low_res, self.size = config, low_res, size

    def __len__(self):
        return self.size

    def set_epoch(self, epoch):
        pass

    def __getitem__(self, index):
        g, c, r = torch.Generator().manual_seed(index), self.config, self.config["image_size"]
        sample = {"image": torch.rand(3, r, r, generator=g) * 2 - 1}
        if c["kind"] == "glide":
            sample["text"] = torch.randint(0, c["n_vocab"], (c["text_ctx"],), generator=g)
            sample["text_mask"] = torch.ones(c["text_ctx"], dtype=torch.bool)
        else:
            size = c["cond_size"]
            sample["cond"] = torch.rand(c["cond_channels"], size, size, generator=g) * 2 - 1
        if c["super_res"]:
            sample["low_res"] = torch.rand(3, self.low_res, self.low_res, generator=g) * 2 - 1
        return sample

# --- One condition from a user's file (sample.py) ---

def load_condition_image(path, task, palette=None, size=256):
    """A condition picture of any size -> C x size x size float tensor in [-1, 1], squashed with nearest neighbour
    as PITI's inference does. mask: as label_image_to_color (`palette` 'coco' by default; COCO and ADE20K agree on
    0..150); sketch: lines of either polarity -> distance field; depth: "normal.png,depth.png" or a "*_depth.png"
    next to its "*_normal.png". Raises DataError with a one-line message."""
    if task not in TASK_CHANNELS:
        raise DataError(f"unknown task {task!r}; expected one of {sorted(TASK_CHANNELS)}")
    if task == "depth":
        paths = path.split(",")
        if len(paths) == 1:
            if not path.endswith("_depth.png"):
                raise DataError(f"{path}: a depth condition is 'normal.png,depth.png' or a *_depth.png "
                                "file next to its *_normal.png")
            paths = [path[: -len("_depth.png")] + "_normal.png", path]
        arrays = [_to_unit(np.asarray(open_rgb(p).resize((size, size), Image.NEAREST))) for p in paths]
        return torch.from_numpy(np.concatenate(arrays, axis=0))
    img = open_image(path)
    if task == "sketch":
        if img.mode not in ("1", "L", "P", "RGB", "RGBA", "LA"):
            raise DataError(f"{path}: cannot read a sketch from mode {img.mode}")
        gray = img.convert("L").resize((size, size), Image.NEAREST)
        return sketch_to_condition(binarize_sketch(gray))
    if img.mode not in ("RGB", "RGBA", "P", "L", "I", "I;16"):
        raise DataError(f"{path}: a label map must be RGB (color-coded) or single-channel class "
                        f"indices, got mode {img.mode} ({len(img.getbands())} channels)")
    palette = palette or "coco"
    color = label_image_to_color(img.resize((size, size), Image.NEAREST), palette, name=path)
    off = ~in_palette(color, palette)  # an antialiased or foreign map: usable, but say so
    if off.any():
        warnings.warn(f"{path}: {off.mean():.1%} of pixels have colors outside the {palette} "
                      "label palette; the model only knows the palette colors")
    return torch.from_numpy(_to_unit(color))
