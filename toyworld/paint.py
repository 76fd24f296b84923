"""Painting toy scenes: rasterization, noise textures and the appearance of every class. `Painter` draws a
layout back to front on a `Canvas` of label, part-id (its edges are the sketch), depth and color maps. Colors come
from the appearance generator `rng` only, geometry from the layout only, so the label, sketch and depth maps do
not depend on the appearance."""

from functools import lru_cache

import numpy as np

from .world import (CAMERA_HEIGHT, CLOUD, CLOUD_DEPTH, GRASS, GROUND_MAX_DEPTH, HOUSE, MOUNTAIN, MOUNTAIN_DEPTHS,
                  ROAD, SAND, SKY_DEPTH, SUN, TIMES_OF_DAY, TOY_CLASSES, TREE, WATER, ground_class, road_center)

@lru_cache(maxsize=64)
def _lerp_weights(n_out, n_cells):
    """Indices and smoothstep weights that upsample n_cells + 1 grid values to n_out pixels."""
    pos = (np.arange(n_out) + 0.5) / n_out * n_cells
    i0 = np.minimum(pos.astype(np.int64), n_cells - 1)
    f = (pos - i0).astype(np.float32)
    return i0, (f * f * (3 - 2 * f))[:, None]

def _value_noise(rng, size, cells_y, cells_x):
    """Smooth random field in [-1, 1]: random values on a grid, interpolated (value noise)."""
    cy, cx = min(cells_y, size), min(cells_x, size)
    grid = rng.uniform(-1, 1, (cy + 1, cx + 1)).astype(np.float32)
    iy, fy = _lerp_weights(size, cy)
    ix, fx = _lerp_weights(size, cx)
    rows = grid[iy] * (1 - fy) + grid[iy + 1] * fy  # size x (cx + 1)
    return rows[:, ix] * (1 - fx.T) + rows[:, ix + 1] * fx.T

def _fractal_noise(rng, size, cells=(4, 8, 16, 32)):
    total = sum(0.6 ** k * _value_noise(rng, size, c, c) for k, c in enumerate(cells))
    return total / sum(0.6 ** k for k in range(len(cells)))

def _box(size, x0, y0, x1, y1):
    """Pixel slices covering a normalized box, clipped to the image (maybe empty), with pixel-center coordinates."""
    c0, r0 = np.clip(np.floor([x0 * size, y0 * size]), 0, size).astype(int)
    c1, r1 = np.clip(np.ceil([x1 * size, y1 * size]), 0, size).astype(int)
    xs = ((np.arange(c0, c1) + 0.5) / size)[None, :]
    ys = ((np.arange(r0, r1) + 0.5) / size)[:, None]
    return (slice(r0, r1), slice(c0, c1)), xs, ys

def _ellipse(size, cx, cy, rx, ry):
    sl, xs, ys = _box(size, cx - rx, cy - ry, cx + rx, cy + ry)
    return sl, ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 < 1

def _polygon(size, points):
    """Mask of a convex polygon: inside all edges' half planes (either winding)."""
    p = np.asarray(points, dtype=np.float64)
    sl, xs, ys = _box(size, *p.min(0), *p.max(0))
    d = np.roll(p, -1, 0) - p
    sign = np.sign(np.sum(p[:, 0] * np.roll(p[:, 1], -1) - np.roll(p[:, 0], -1) * p[:, 1]))
    inside = np.ones((ys.shape[0], xs.shape[1]), dtype=bool)
    for (px, py), (dx, dy) in zip(p, d):
        inside &= sign * (dx * (ys - py) - dy * (xs - px)) >= 0
    return sl, inside

def _rect(size, x0, y0, x1, y1):
    sl, xs, ys = _box(size, x0, y0, x1, y1)
    return sl, np.ones((ys.shape[0], xs.shape[1]), bool)

class Canvas:
    """Label, part-id, depth and color buffers painted back to front (painter's algorithm)."""

    def __init__(self, size):
        self.label = np.zeros((size, size), np.uint8)
        self.part = np.zeros((size, size), np.int32)  # one id per object part: the sketch's edges
        self.depth = np.full((size, size), SKY_DEPTH, np.float32)
        self.color = np.zeros((size, size, 3), np.float32)
        self.emits = np.ones((size, size), bool)  # sky, sun, stars, lit windows ignore the light
        self.parts = 1

    def new_part(self):
        self.parts += 1
        return self.parts - 1

    def paint(self, shape, cls, part, depth, color, emits=False):
        """Paint `shape` = (slices, mask); color is RGB or an RGB field over the slices' box."""
        sl, m = shape
        self.label[sl][m] = cls
        self.part[sl][m] = part
        self.depth[sl][m] = depth
        color = np.broadcast_to(np.asarray(color, np.float32), m.shape + (3,))
        self.color[sl][m] = color[m]
        self.emits[sl][m] = emits

# --- appearance ---

SKY_TOP = {"day": ((30, 100, 200), (80, 150, 250)), "dusk": ((40, 40, 100), (90, 80, 150)),
           "night": ((2, 4, 15), (10, 14, 35))}
SKY_LOW = {"day": ((160, 195, 235), (210, 225, 255)), "dusk": ((240, 120, 50), (255, 170, 90)),
           "night": ((20, 25, 55), (40, 45, 85))}
LIGHT = {"day": (1.0, 1.0, 1.0), "dusk": (1.0, 0.8, 0.64), "night": (0.2, 0.25, 0.4)}
WALL_COLORS = {"red": (170, 62, 52), "white": (232, 228, 218), "yellow": (228, 200, 110),
               "blue": (92, 122, 172), "brown": (140, 100, 70), "gray": (150, 150, 152)}
ROOF_COLORS = ((150, 52, 42), (72, 72, 82), (110, 76, 52), (62, 82, 112))
MOUNTAIN_COLORS = ((110, 118, 138), (120, 100, 82), (92, 110, 92), (112, 100, 128))

def _pick(rng, low, high):
    return rng.uniform(low, high).astype(np.float32)

def _jitter(rng, rgb, amount=12.0):
    return np.clip(np.asarray(rgb, np.float32) + rng.uniform(-amount, amount, 3), 0, 255).astype(np.float32)

def _shaded(color, shade):
    """An RGB field: `color` scaled by a per-pixel brightness `shade`."""
    return np.asarray(color, np.float32) * shade[..., None]

class Painter:
    """Draws a layout on a canvas with colors and textures from the appearance generator."""

    def __init__(self, layout, size, rng):
        self.layout, self.size, self.rng = layout, size, rng
        self.cv = Canvas(size)
        self.xs = (np.arange(size, dtype=np.float32) + 0.5) / size  # pixel centers
        self.ys = self.xs
        self.r0 = int(np.searchsorted(self.ys, layout.horizon))  # first row below the horizon
        self.tod = TIMES_OF_DAY[rng.choice(3, p=[0.55, 0.25, 0.2])]
        self.grain = _fractal_noise(rng, size, (32, 64, 128))  # fine texture: leaves, grass, stone
        self.blotch = _fractal_noise(rng, size, (3, 6, 12, 24))  # large-scale color variation
        # light comes from the sun's side of the picture (either side when there is no sun)
        self.light_x = rng.choice([-1.0, 1.0]) if layout.sun is None else (1.0 if layout.sun[0] > 0.5 else -1.0)
        self.objects = []  # ("house" or "tree", detail, part ids) per object, for the caption
        self.snow = np.zeros((size, size), bool)  # snow-covered mountain pixels, for the caption

    def textured(self, shape, color, amount=0.05):
        return _shaded(color, 1 + amount * self.grain[shape[0]])

    def tiled(self, shape, color, scale):
        """Roof tiles: darker horizontal stripes whose spacing shrinks with distance."""
        rows = self.ys[shape[0][0]][:, None] / (0.012 * scale)
        return _shaded(color, 1 - 0.15 * (rows % 1 < 0.3) + 0.04 * self.grain[shape[0]])

    def ground_depth(self, y):
        return np.minimum(CAMERA_HEIGHT / np.maximum(y - self.layout.horizon, 1e-4), GROUND_MAX_DEPTH)

    def sky(self):
        rng, r0 = self.rng, self.r0
        self.sky_top, self.sky_low = _pick(rng, *SKY_TOP[self.tod]), _pick(rng, *SKY_LOW[self.tod])
        t = (self.ys[:r0] / self.layout.horizon) ** rng.uniform(0.6, 1.4)
        self.cv.color[:r0] = (self.sky_top + (self.sky_low - self.sky_top) * t[:, None])[:, None, :]
        if self.tod == "night":
            stars = rng.random((r0, self.size)) < 0.003
            self.cv.color[:r0][stars] = rng.uniform(120, 255, (stars.sum(), 1))

    def sun(self):
        if self.layout.sun is None:
            return
        rng, (sx, sy, r), r0 = self.rng, self.layout.sun, self.r0
        color = np.float32({"day": (255, 248, 225), "dusk": (255, rng.uniform(120, 170), rng.uniform(40, 80)),
                            "night": (236, 234, 214)}[self.tod])
        dist = np.hypot(self.xs[None, :] - sx, self.ys[:r0, None] - sy)  # the glow lights the sky only
        glow = {"day": 0.35, "dusk": 0.6, "night": 0.15}[self.tod] * np.exp(-dist / (3 * r))
        self.cv.color[:r0] += glow[..., None] * (color - self.cv.color[:r0])
        shape = _ellipse(self.size, sx, sy, r, r)
        (rows, cols), _ = shape  # a disk, a little darker at the limb
        shade = 1 - 0.12 * (np.hypot(self.xs[None, cols] - sx, self.ys[rows, None] - sy) / r) ** 2
        if self.tod == "night":  # the moon's maria
            shade = shade - 0.12 * (self.blotch[shape[0]] > 0.15)
        self.cv.paint(shape, SUN, self.cv.new_part(), SKY_DEPTH, _shaded(color, shade), emits=True)

    def clouds(self):
        base = _jitter(self.rng, {"day": (246, 246, 250), "dusk": (255, 215, 200),
                                  "night": (170, 175, 200)}[self.tod], 6)
        for cloud in self.layout.clouds:
            part = self.cv.new_part()
            top, bottom = (cloud[:, 1] - cloud[:, 3]).min(), (cloud[:, 1] + cloud[:, 3]).max()
            for cx, cy, rx, ry in cloud:  # lit from above, a little darker underneath
                shape = _ellipse(self.size, cx, cy, rx, ry)
                shade = 1 - 0.3 * (self.ys[shape[0][0]][:, None] - top) / (bottom - top)
                self.cv.paint(shape, CLOUD, part, CLOUD_DEPTH, _shaded(base, shade + 0.08 * self.blotch[shape[0]]))

    def mountains(self):
        rng, h, size, ridges = self.rng, self.layout.horizon, self.size, self.layout.ridges
        if not ridges:
            return
        base = _jitter(rng, MOUNTAIN_COLORS[rng.integers(len(MOUNTAIN_COLORS))], 10)
        snow_y = h - max(r.max() for r in ridges) * rng.uniform(0.5, 0.8) if rng.random() < 0.4 else -1.0
        depths = np.linspace(*MOUNTAIN_DEPTHS, len(ridges)) if len(ridges) > 1 else [500.0]
        for heights, depth in zip(ridges, depths):
            ridge = h - np.interp(self.xs, np.linspace(0, 1, len(heights)), heights)
            r0, r1 = int(ridge.min() * size), int(np.ceil(h * size))
            ys = self.ys[r0:r1, None]
            mask = (ys >= ridge[None, :]) & (ys < h)
            # faces turned toward the light are brighter; the effect fades below the ridge
            slope = np.convolve(np.gradient(ridge, self.xs), np.full(size // 32 + 1, 1 / (size // 32 + 1)), "same")
            facing = np.tanh(-self.light_x * slope * 2)[None, :] * np.exp(-(ys - ridge[None, :]) / 0.1)
            shade = 1 + 0.25 * facing + 0.15 * self.blotch[r0:r1] + 0.06 * self.grain[r0:r1]
            snow = ys < snow_y + 0.03 * self.blotch[r0:r1]
            color = np.where(snow[..., None], np.float32([240, 242, 250]), base) * shade[..., None]
            self.cv.paint(((slice(r0, r1), slice(0, size)), mask), MOUNTAIN, self.cv.new_part(), depth, color)
            self.snow[r0:r1][mask & snow] = True

    def ground(self):
        rng, lay, size, cv, r0 = self.rng, self.layout, self.size, self.cv, self.r0
        X, Y = np.broadcast_arrays(self.xs[None, :], self.ys[r0:, None])
        cls = ground_class(lay, X, Y)
        depth = self.ground_depth(Y)
        grain, blotch = self.grain[r0:], self.blotch[r0:]
        green, dry = _pick(rng, (50, 125, 35), (90, 165, 70)), _pick(rng, (110, 145, 50), (140, 170, 80))
        sand = _pick(rng, (205, 185, 135), (235, 212, 165))
        deep = _pick(rng, (20, 70, 140), (50, 110, 190)) * 0.7 + self.sky_low * 0.3
        ripple = _value_noise(rng, size, 48, 6)[r0:]  # long horizontal streaks
        asphalt = rng.random() < 0.5
        road = _jitter(rng, (85, 85, 90), 15) if asphalt else _pick(rng, (135, 105, 70), (165, 125, 90))
        # Each class is colored on its own pixels only (1-D gathers keep this fast).
        color = np.empty(cls.shape + (3,), np.float32)
        m = cls == GRASS
        mix = (0.5 + 0.5 * blotch[m])[:, None]  # patches of lush and dry grass
        color[m] = (green + (dry - green) * mix) * (1 + 0.15 * grain[m])[:, None]
        m = cls == SAND
        color[m] = _shaded(sand, 1 + 0.05 * blotch[m] + 0.08 * grain[m])
        m = cls == WATER
        water = _shaded(deep, 1 + 0.15 * ripple[m])
        if lay.sun is not None:  # the sun's glitter path, wider toward the viewer
            width = 0.02 + 0.1 * (Y[m] - lay.horizon)
            glint = np.exp(-((X[m] - lay.sun[0]) / width) ** 2) * (ripple[m] > 0.1)
            water += 0.5 * glint[:, None] * (255 - water)
        color[m] = water
        m = cls == ROAD
        color[m] = _shaded(road, 1 + 0.1 * grain[m] + 0.05 * blotch[m])
        if asphalt and lay.road is not None:  # dashed center line, dashes 3 m long
            center, half = road_center(lay, Y)
            color[m & (np.abs(X - center) < 0.05 * half) & ((depth / 3.0) % 1 < 0.5)] = (235, 228, 200)
        parts = np.zeros(len(TOY_CLASSES), np.int32)
        parts[[GRASS, SAND, WATER, ROAD]] = [cv.new_part() for _ in range(4)]
        cv.label[r0:], cv.part[r0:], cv.depth[r0:], cv.color[r0:], cv.emits[r0:] = cls, parts[cls], depth, color, False

    def house(self, o):
        rng, size, cv, s = self.rng, self.size, self.cv, o.scale
        w, hw, hr, over = o.width * s, o.wall * s, o.roof * s, 0.08 * o.width * s
        left, right, top, depth = o.x - w / 2, o.x + w / 2, o.y - hw, self.ground_depth(o.y)
        name = list(WALL_COLORS)[rng.integers(len(WALL_COLORS))]
        wall = _jitter(rng, WALL_COLORS[name], 8)
        roof = _jitter(rng, ROOF_COLORS[rng.integers(len(ROOF_COLORS))], 8)
        parts = [cv.new_part() for _ in range(4)]
        if o.side:
            edge = right if o.side > 0 else left
            far = edge + o.side * o.wing * s  # the wing's outer edge
            wing = _rect(size, min(edge, far), top, max(edge, far), o.y)
            cv.paint(wing, HOUSE, parts[0], depth, wall * 0.78)
            quad = _polygon(size, [(o.x, top - hr), (o.x + o.side * o.wing * s, top - hr),
                                   (far + o.side * over, top), (edge + o.side * over, top)])
            cv.paint(quad, HOUSE, parts[1], depth, self.tiled(quad, roof, s))
            front = _polygon(size, [(left, o.y), (right, o.y), (right, top), (o.x, top - hr), (left, top)])
            cv.paint(front, HOUSE, parts[2], depth, self.textured(front, wall))
            step = o.wing * s / (o.windows + 1)  # windows: center x, half width, top and bottom in wall heights
            windows = [(edge + o.side * k * step, 0.12 * hw, 0.65, 0.35) for k in range(1, o.windows + 1)]
        else:
            front = _rect(size, left, top, right, o.y)
            cv.paint(front, HOUSE, parts[2], depth, self.textured(front, wall))
            gable = _polygon(size, [(left - over, top), (right + over, top), (o.x, top - hr)])
            cv.paint(gable, HOUSE, parts[1], depth, self.tiled(gable, roof, s))
            windows = [(wx, 0.1 * w, 0.75, 0.45) for wx in (left + 0.2 * w, right - 0.2 * w)]
        for wx, half, y0, y1 in windows:  # each its own part (a line in the sketch), lit at night most of the time
            parts.append(cv.new_part())
            lit = self.tod == "night" and rng.random() < 0.7
            color = _jitter(rng, (255, 215, 140), 10) if lit else _jitter(rng, (165, 195, 220), 12)
            cv.paint(_rect(size, wx - half, o.y - y0 * hw, wx + half, o.y - y1 * hw), HOUSE, parts[-1], depth, color,
                     emits=lit)
        door_x = o.x + o.door * w
        cv.paint(_rect(size, door_x - 0.09 * w, o.y - 0.55 * hw, door_x + 0.09 * w, o.y), HOUSE, parts[3],
                 depth, _jitter(rng, (95, 60, 40), 15))
        self.objects.append(("house", name, parts))

    def tree(self, o):
        rng, size, cv, s = self.rng, self.size, self.cv, o.scale
        r, trunk_h, depth = o.crown * s, o.trunk * s, self.ground_depth(o.y)
        trunk, crown = cv.new_part(), cv.new_part()
        bark = _jitter(rng, (95, 62, 38), 12)
        shape = _rect(size, o.x - 0.12 * r, o.y - trunk_h - 0.5 * r, o.x + 0.12 * r, o.y)
        cv.paint(shape, TREE, trunk, depth, self.textured(shape, bark, 0.15))
        if o.pine:
            leaves, shapes = _jitter(rng, (30, 75, 45), 10), []
            for k in range(3):  # three stacked tiers, narrower toward the top
                bottom, half = o.y - trunk_h - 0.8 * k * r, r * (1 - 0.25 * k)
                shapes.append(_polygon(size, [(o.x - half, bottom), (o.x + half, bottom), (o.x, bottom - 1.4 * r)]))
        else:
            leaves = _jitter(rng, (200, 115, 35) if rng.random() < 0.2 else (55, 115, 45), 15)  # autumn or summer
            cy = o.y - trunk_h - r
            shapes = [_ellipse(size, o.x + dx * s, cy + dy * s, rb * s, rb * s) for dx, dy, rb in o.blobs]
        top = o.y - trunk_h - 2.4 * r
        for shape in shapes:  # lit from the sun's side and from above, leafy grain
            ys, xs = self.ys[shape[0][0]][:, None], self.xs[shape[0][1]][None, :]
            shade = 1.1 - 0.25 * (ys - top) / (2.4 * r) + 0.12 * self.light_x * (xs - o.x) / r
            cv.paint(shape, TREE, crown, depth, _shaded(leaves, shade + 0.25 * self.grain[shape[0]]))
        self.objects.append(("tree", o.pine, [trunk, crown]))

    def finish(self):
        """Light the non-emitting surfaces, add distance fog and sensor noise."""
        cv, rng = self.cv, self.rng
        gain = np.empty_like(cv.color)
        gain[:] = np.float32(LIGHT[self.tod]) * rng.uniform(0.9, 1.05)
        gain[cv.emits] = 1.0
        fog = rng.uniform(0.45, 0.65) * (1 - np.exp(-cv.depth / 300.0))  # aerial perspective
        fog[cv.emits | (cv.label == CLOUD)] = 0
        gain *= (1 - fog)[..., None]
        image = cv.color * gain + fog[..., None] * self.sky_low
        image += 7.0 * (rng.random(image.shape, dtype=np.float32) - 0.5)  # uniform, std 2
        return np.clip(image, 0, 255).astype(np.uint8)
