"""Model tensors as pictures: the uint8 conversion and the grids that training and sampling save.

The model sees pictures as x / 127.5 - 1 in [-1, 1] (`nanopiti/data.py`); `to_uint8` is the inverse, rounded as
PIL stores it, so a picture read from a file comes back byte for byte.
"""

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

def _levels(x):
    """[-1, 1] -> the 8-bit levels 0..255 (rounded, clamped), still a float tensor."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255)

def to_uint8(x):
    """B x C x H x W in [-1, 1] -> B x H x W x C uint8."""
    return _levels(x).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

def quantize(x):
    """[-1, 1] -> the nearest of the 256 values of an 8-bit picture, still in [-1, 1]: what the upsampler was
    trained on (pictures read from files)."""
    return _levels(x) / 127.5 - 1

def as_rgb(x):
    """B x C x H x W -> B x 3 x H x W: the first three channels (depth + normal: the normal), or the one in gray."""
    return x[:, :3] if x.shape[1] >= 3 else x[:, :1].expand(-1, 3, -1, -1)

def condition_picture(cond, size):
    """One C x H x W condition as a size x size RGB picture (nearest neighbour: labels stay labels)."""
    picture = Image.fromarray(to_uint8(as_rgb(cond[None]))[0])
    return np.asarray(picture.resize((size, size), Image.NEAREST))

def grid_row(pictures, gap=2):
    """H x W x 3 pictures of one height side by side, separated by white columns."""
    space = np.full((pictures[0].shape[0], gap, 3), 255, np.uint8)
    return np.concatenate([p for picture in pictures for p in (picture, space)][:-1], axis=1)

def save_grid(columns, path, size=None):
    """One row per example, a cell per column (N x C x H x W in [-1, 1]), at size x size (default: the largest)."""
    size = size or max(col.shape[-1] for col in columns)
    cells = [to_uint8(as_rgb(F.interpolate(col.float().cpu(), size=(size, size), mode="nearest"))) for col in columns]
    rows = [grid_row([cell[i] for cell in cells]) for i in range(len(cells[0]))]
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)
