"""How each task's condition is encoded, following the PITI release (its checkpoints expect it).

* mask: a color-coded label map (nanopiti.colormap), 3 channels.
* sketch: a binary edge map (lines white on black), fed to the model as its L1 distance
  transform, as PITI's loader does: every pixel stores its city-block distance to the nearest
  line pixel, clipped to 255 and mapped to [-1, 1], so lines are -1 and empty space rises to +1
  within 255 pixels. The smooth field gives the encoder's convolutions a signal everywhere, not
  only on 1-pixel lines. (An empty sketch is all +1: the null condition.) 1 channel.
* depth: PITI's geometry condition is two RGB pictures made by its `preprocess_depth.py`: the
  surface normals (`encode_normal`) and the depth colored with matplotlib's jet colormap on a
  log scale (`encode_depth`), concatenated normals first. 6 channels.

All pictures are uint8 on disk and x / 127.5 - 1 in the model.
"""

import numpy as np
import torch

TASK_CHANNELS = {"mask": 3, "sketch": 1, "depth": 6}  # the condition channels of each task

def l1_distance_transform(edges):
    """HxW bool -> HxW int distance (city block) to the nearest True pixel.

    The L1 distance |dx| + |dy| separates: first the distance to the nearest edge within each
    row (a forward and a backward sweep along x), then, along each column, the minimum over
    rows of that row distance plus |dy| (two more sweeps along y). Each sweep is a running
    minimum, vectorized over the other axis. Without any edge, every pixel gets h + w.
    """
    h, w = edges.shape
    d = np.where(edges, 0, h + w).astype(np.int32)
    for x in range(1, w):
        np.minimum(d[:, x], d[:, x - 1] + 1, out=d[:, x])
    for x in range(w - 2, -1, -1):
        np.minimum(d[:, x], d[:, x + 1] + 1, out=d[:, x])
    for y in range(1, h):
        np.minimum(d[y], d[y - 1] + 1, out=d[y])
    for y in range(h - 2, -1, -1):
        np.minimum(d[y], d[y + 1] + 1, out=d[y])
    return d

def binarize_sketch(gray):
    """HxW uint8 sketch -> HxW bool, True on the lines.

    PITI's sketches are white lines (255) on black. A hand-drawn sketch is usually black on
    white; since lines cover a small part of any sketch, a majority of "on" pixels means the
    polarity is inverted, and we flip it.
    """
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
    """Depth in meters (HxW) and validity mask -> HxWx3 uint8 jet picture, as PITI stores it.

    PITI's `plot_depth_map`: clip depth to [0.5 m, D] with D = min(300 m, 99th percentile of the
    map), take the logarithm, normalize by log(D + 1.01), look the value up in the 256-entry jet
    table (values below 0, i.e. depth under 1 m, take the first entry), paint invalid pixels
    black, and store 255 * color truncated to uint8.
    """
    depth = np.asarray(depth, dtype=np.float32)
    valid = np.asarray(valid) > 0
    max_depth = min(300.0, float(np.percentile(depth, 99)))
    logd = np.log(np.clip(depth, 0.5, max(max_depth, 0.5)))
    x = logd / np.log(max_depth + 1.01) * 256
    x[x == 256] = 255
    index = np.clip(x, 0, 255).astype(np.int64)  # under -> 0, over -> 255, as matplotlib
    rgb = jet_lut()[index]
    rgb[~valid] = 0.0
    return (rgb * 255).astype(np.uint8)

def encode_normal(normal):
    """Surface normals (HxWx3, components in [-1, 1], all-zero = unknown) -> HxWx3 uint8.

    PITI's `plot_normal_map`: unknown pixels are set to the map's minimum, then every component
    goes through (n - min) / 2, so with min = -1 this is the usual (n + 1) / 2 and unknown
    pixels become black.
    """
    n = np.asarray(normal, dtype=np.float32)
    n = n + (n.sum(axis=2, keepdims=True) == 0) * n.min()
    n = (n - n.min()) / 2.0
    return (np.clip(n, 0.0, 1.0) * 255).astype(np.uint8)

def normals_from_depth(depth, focal):
    """HxW depth (meters, pinhole camera with `focal` pixels, principal point at the center)
    -> HxWx3 unit normals in camera coordinates (x right, y down, z forward), facing the camera.

    Every pixel is lifted to its 3-D point z * ((u - cx) / f, (v - cy) / f, 1); the normal is the
    cross product of the point's finite differences along u and v.
    """
    depth = np.asarray(depth, dtype=np.float32)
    h, w = depth.shape
    v, u = np.mgrid[0:h, 0:w].astype(np.float32)
    points = np.stack([(u - w / 2) / focal * depth, (v - h / 2) / focal * depth, depth], axis=-1)
    n = np.cross(np.gradient(points, axis=1), np.gradient(points, axis=0))
    n /= np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-12)
    return np.where((n * points).sum(-1, keepdims=True) > 0, -n, n)  # turn toward the camera
