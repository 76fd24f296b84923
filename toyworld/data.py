"""The toy world as training pairs: `ToyDataset` renders scenes on the fly, in the sample format of
nanopiti.data.PairedDataset, and `scene_condition_arrays` encodes a scene as each task's condition."""

import numpy as np
import torch

from nanopiti.colormap import labels_to_color
from nanopiti.conditions import encode_depth, encode_normal, normals_from_depth
from nanopiti.data import PairTransform, sample_rng

from .world import render_scene

class ToyDataset(torch.utils.data.Dataset):
    """Scene i has layout seed `first_scene + i`: the layout (what is where) is fixed, so label maps, sketches and
    depth stay the same across epochs. With `vary_appearance`, the colors and textures are re-drawn every epoch
    from (seed, epoch, i), so one layout maps to many images, as in the real task. With `copy`, the image is the
    mask itself (the copy task): the condition decides the image exactly, so a model that learns anything from
    its condition must learn this. Samples as PairedDataset's, plus the scene's caption."""

    def __init__(self, num_scenes, task, resolution=64, cond_size=256,
                 random_flip=True, upsampler=False, low_res=64, seed=0, first_scene=0,
                 vary_appearance=True, copy=False):
        self.transform = PairTransform(task, resolution, cond_size, random_flip, False, upsampler, low_res)
        self.num_scenes, self.task, self.cond_size = num_scenes, task, cond_size
        self.seed, self.epoch, self.first_scene = seed, 0, first_scene
        self.vary_appearance, self.copy = vary_appearance, copy

    def __len__(self):
        return self.num_scenes

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __getitem__(self, index):
        rng = sample_rng(self.seed, self.epoch, index)
        appearance = int(rng.integers(2**31)) if self.vary_appearance else None
        scene = render_scene(self.first_scene + index, self.cond_size, appearance_seed=appearance)
        image, conds = scene_condition_arrays(scene, self.task)
        if self.copy:
            image = conds[0]  # the color label map, resized to the image size by the transform
        sample = self.transform(image, conds, rng)
        sample["caption"] = scene.caption
        sample["path"] = f"toy:{self.first_scene + index}"
        return sample

def scene_condition_arrays(scene, task):
    """A toy scene (toyworld.world.ToyScene) -> (image, [condition arrays]) in the encodings that
    prepare_data.py stores: color label map; sketch 255/0; normals and depth as PITI's RGB
    pictures, with the toy camera's focal length (the image height) and every pixel valid."""
    if task == "mask":
        conds = [labels_to_color(scene.label)]
    elif task == "sketch":
        conds = [np.where(scene.sketch > 0, 255, 0).astype(np.uint8)]
    else:
        depth = scene.depth
        conds = [encode_normal(normals_from_depth(depth, focal=depth.shape[0])),
                 encode_depth(depth, np.ones_like(depth))]
    return scene.image, conds
