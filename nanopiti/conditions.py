"""How each task's condition is encoded, following the PITI release (its checkpoints expect it).

* mask: a color-coded label map (nanopiti.colormap), 3 channels.
* sketch: a binary edge map (white lines on black) fed as PITI's loader does, as its L1 distance transform
  clipped to 255 and mapped to [-1, 1]: lines -1, empty space rising to +1, a signal everywhere for the
  encoder's convolutions (an empty sketch is all +1: the null condition). 1 channel.
* depth: the two RGB pictures of PITI's `preprocess_depth.py`, surface normals (`encode_normal`) then the
  log depth in matplotlib's jet colormap (`encode_depth`). 6 channels.

All pictures are uint8 on disk and x / 127.5 - 1 in the model.
"""

import numpy as np
import torch

TASK_CHANNELS = {"mask": 3, "sketch": 1, "depth": 6}  # the condition channels of each task

def l1_distance_transform(edges):
    """HxW bool -> HxW int city-block distance to the nearest True pixel (h + w without any): |dx| + |dy|
    separates, so two running-minimum sweeps along x, then two along y, each vectorized over the other axis."""
    h, w = edges.shape
    d = np.where(edges, 0, h + w).astype(np.int32)
    for view in (d.T, d.T[::-1], d, d[::-1]):  # columns left to right, right to left, then rows down, up
        for i in range(1, len(view)):
            np.minimum(view[i], view[i - 1] + 1, out=view[i])
    return d

def binarize_sketch(gray):
    """HxW uint8 sketch -> HxW bool, True on the lines (PITI's are white on black; lines being a minority, a
    majority of "on" pixels means black on white, and is flipped)."""
    on = np.asarray(gray) >= 128
    return ~on if on.mean() > 0.5 else on

def distance_field(edges):
    """HxW bool sketch -> 1xHxW float32 numpy array: the clipped L1 distance field in [-1, 1]."""
    dist = np.minimum(l1_distance_transform(edges), 255).astype(np.float32)
    return (dist / 127.5 - 1.0)[None]

def sketch_to_condition(edges):
    """HxW bool sketch -> 1xHxW tensor: `distance_field` for the model."""
    return torch.from_numpy(distance_field(edges))

# matplotlib's "jet" colormap as breakpoints (x, value) per channel; PITI colors depth with it.
_JET = {
    "red": [(0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)],
    "green": [(0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)],
    "blue": [(0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)],
}

def jet_lut(n=256):
    """(n, 3) float table of the jet colormap, sampled like matplotlib at n points."""
    t = np.linspace(0.0, 1.0, n)
    return np.stack([np.interp(t, *zip(*_JET[c])) for c in ("red", "green", "blue")], axis=-1)

def encode_depth(depth, valid):
    """Depth in meters (HxW) and validity mask -> HxWx3 uint8 jet picture, as PITI's `plot_depth_map`: log depth
    clipped to [0.5 m, D], D = min(300 m, 99th percentile), over log(D + 1.01); invalid pixels black."""
    depth = np.asarray(depth, dtype=np.float32)
    valid = np.asarray(valid) > 0
    max_depth = min(300.0, float(np.percentile(depth, 99)))
    x = np.log(np.clip(depth, 0.5, max(max_depth, 0.5))) / np.log(max_depth + 1.01) * 256
    index = np.clip(x, 0, 255).astype(np.int64)  # under -> 0, over (and 256) -> 255, as matplotlib
    rgb = jet_lut()[index]
    rgb[~valid] = 0.0
    return (rgb * 255).astype(np.uint8)

def encode_normal(normal):
    """Surface normals (HxWx3 in [-1, 1], all-zero = unknown) -> HxWx3 uint8, as PITI's `plot_normal_map`:
    unknown pixels take the map's minimum, then (n - min) / 2 (with min = -1: (n + 1) / 2, unknown black)."""
    n = np.asarray(normal, dtype=np.float32)
    n = n + (n.sum(axis=2, keepdims=True) == 0) * n.min()
    n = (n - n.min()) / 2.0
    return (np.clip(n, 0.0, 1.0) * 255).astype(np.uint8)

def normals_from_depth(depth, focal):
    """HxW depth (meters; pinhole camera, `focal` pixels, centered) -> HxWx3 unit normals in camera coordinates
    (x right, y down, z forward) facing the camera: the cross product of the 3-D points' differences along u, v."""
    depth = np.asarray(depth, dtype=np.float32)
    h, w = depth.shape
    v, u = np.mgrid[0:h, 0:w].astype(np.float32)
    points = np.stack([(u - w / 2) / focal * depth, (v - h / 2) / focal * depth, depth], axis=-1)
    n = np.cross(np.gradient(points, axis=1), np.gradient(points, axis=0))
    n /= np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-12)
    return np.where((n * points).sum(-1, keepdims=True) > 0, -n, n)  # turn toward the camera
