"""The toy world as training pairs: `ToyDataset` renders scenes on the fly, in the sample format of
nanopiti.data.PairedDataset, and `scene_condition_arrays` encodes a scene as each task's condition."""

import numpy as np
import torch

from nanopiti.colormap import labels_to_color
from nanopiti.conditions import encode_depth, encode_normal, normals_from_depth
from nanopiti.data import PairTransform, sample_rng

from .world import render_scene

class ToyDataset(torch.utils.data.Dataset):
    """Samples as PairedDataset's, plus the caption. Scene i has the fixed layout seed `first_scene + i`; with
    `vary_appearance`, its colors and textures are re-drawn every epoch from (seed, epoch, i): one layout, many
    images, as in the real task. With `copy`, the image is the mask itself (the copy task): the condition decides the
    image exactly, so a model that learns anything from its condition must learn this."""

    def __init__(self, num_scenes, task, resolution=64, cond_size=256, random_flip=True, upsampler=False, low_res=64,
                 seed=0, first_scene=0, vary_appearance=True, copy=False):
        self.transform = PairTransform(task, resolution, cond_size, random_flip, False, upsampler, low_res)
        self.num_scenes, self.task, self.cond_size, self.seed, self.epoch = num_scenes, task, cond_size, seed, 0
        self.first_scene, self.vary_appearance, self.copy = first_scene, vary_appearance, copy

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
        return {**sample, "caption": scene.caption, "path": f"toy:{self.first_scene + index}"}

def scene_condition_arrays(scene, task):
    """A ToyScene -> (image, [condition arrays]) as prepare_data.py stores them: color label map; sketch 255/0;
    normals and depth as PITI's RGB pictures (the toy camera's focal length is the image height, every pixel valid)."""
    if task == "mask":
        return scene.image, [labels_to_color(scene.label)]
    if task == "sketch":
        return scene.image, [np.where(scene.sketch > 0, 255, 0).astype(np.uint8)]
    depth = scene.depth
    return scene.image, [encode_normal(normals_from_depth(depth, focal=depth.shape[0])),
                         encode_depth(depth, np.ones_like(depth))]
