"""The training data of a run: which dataset, in which order, and what the model is given.

The order of samples depends only on the seed and the step (`StepBatches`), so a resumed run
reads exactly what the uninterrupted one would have, with any number of processes.
"""

import os

import numpy as np
import torch

from .data import PairedDataset
from .finetune import TrainError
from toyworld.data import ToyDataset
from toyworld.world import ToyTokenizer

PROBE_PAIRS = 16  # held-out pairs of train.py's condition measure (its previews: the first --num-samples)


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
            sample["tokens"] = torch.randint(0, c["n_vocab"], (c["text_ctx"],), generator=g)
            sample["text_mask"] = torch.ones(c["text_ctx"], dtype=torch.bool)
        else:
            size = c["cond_size"]
            sample["cond"] = torch.rand(c["cond_channels"], size, size, generator=g) * 2 - 1
        if c["super_res"]:
            sample["low_res"] = torch.rand(3, self.low_res, self.low_res, generator=g) * 2 - 1
        return sample


def low_res_size(config):
    """The upsampler's input size: GLIDE's is 64 -> 256 (4x), the toy one 32 -> 64 (2x)."""
    return 64 if config["image_size"] == 256 else config["image_size"] // 2


def list_file(args, split):
    """The list file of a split ("train" or "val"), or None for data made on the fly."""
    explicit = args.train_list if split == "train" else args.val_list
    if args.data == "synthetic" or (args.data == "toy" and not explicit):
        return None
    return explicit or os.path.join(args.data_root or os.path.join("data", args.data), f"{split}_{args.task}.txt")


def check_data(args):
    """Fail early, before loading any weights, when the training pairs are not there."""
    path = list_file(args, "train")
    if path is not None and not os.path.isfile(path):
        root = os.path.dirname(path) or "."
        where = " --root" if args.data == "toy" else " --root <where the dataset is> --out"
        raise TrainError(f"no {args.data} training list at {path}; prepare it with: "
                         f"python prepare_data.py --data {args.data}{where} {root}")


def make_dataset(args, config, split):
    """The training ("train") or preview ("val") dataset for this run."""
    super_res, task = config["super_res"], args.task
    kw = dict(resolution=config["image_size"], upsampler=super_res, low_res=low_res_size(config), seed=args.seed)
    cond_size = config.get("cond_size", 128 if args.model_size == "toy" else 256)
    path = list_file(args, split)
    if args.data == "synthetic":
        return SyntheticPairs(config, low_res_size(config))
    if path is None:  # the toy world, rendered on the fly; previews come from held-out scenes
        first, count = (0, args.toy_scenes) if split == "train" else (args.toy_scenes, max(args.num_samples, PROBE_PAIRS))
        return ToyDataset(count, task, cond_size=cond_size, first_scene=first, **kw)
    if not os.path.isfile(path):  # only "val" gets here (see check_data): preview the first training pairs
        return make_dataset(args, config, "train")
    return PairedDataset(path, task, cond_size=cond_size, random_crop=split == "train",
                         random_flip=split == "train", **kw)


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
    """This process's share of the global batch of every step, from `start` on.

    The sample stream is the concatenation of one random permutation per epoch (seeded by
    (seed, epoch)); global batch k is its slice [k B, (k + 1) B) and process r takes the r-th of
    `world` equal parts. So the data order depends only on the seed and the step: a resumed run
    reads exactly what the uninterrupted run would have read, with any number of processes.
    """

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


def model_condition(model, batch, device, drop=None):
    """(condition kwargs, null-condition kwargs) of a batch for the model's forward.

    PITI: ref = the condition image; its null is all ones (as the released models).
    GLIDE: tokens and mask of the caption; its null is the empty caption (all padding).
    `drop` (B,) bool replaces the condition by the null one (classifier-free dropout)."""
    config = model.config
    if config["kind"] == "piti":
        cond = {"ref": batch["cond"].to(device)}
        null = {"ref": torch.ones_like(cond["ref"])}
    else:
        if "tokens" in batch:
            tokens, mask = batch["tokens"], batch["text_mask"]
        else:
            tokenizer = ToyTokenizer()
            pairs = [tokenizer.encode(c, config["text_ctx"]) for c in batch["caption"]]
            tokens, mask = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        cond = {"tokens": tokens.to(device), "mask": mask.to(device)}
        null = {"tokens": torch.zeros_like(cond["tokens"]), "mask": torch.zeros_like(cond["mask"])}
    if drop is not None:
        for k in cond:
            shape = (-1,) + (1,) * (cond[k].dim() - 1)
            cond[k] = torch.where(drop.view(shape), null[k], cond[k])
    if config["super_res"]:
        cond["low_res"] = batch["low_res"].to(device)
    return cond, null
