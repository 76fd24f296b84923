"""The toy world: a procedural generator of small outdoor scenes (docs/toy_world.md). A scene is drawn in two steps:
`sample_layout(seed)` draws the geometry in normalized coordinates (x right, y down, both in [0, 1]); `render(layout,
size, appearance_seed)` rasterizes it at any size and paints it (toyworld/paint.py) with colors and textures drawn
from a second seed. The label map, sketch and depth depend on the layout only, the image and caption also on the
appearance: one label map (the condition) has many plausible images, as in the real mask-to-image task. Class i is
drawn with color i of PITI's COCO label colormap, the convention of the real data."""

from dataclasses import dataclass

import numpy as np
import torch

TOY_SCENES = 1800  # train.py's toy training scenes: layout seeds 0..1799; its previews use the next ones
HELDOUT_SEED0 = 10 ** 9  # held-out scenes (the judge, the ablations) use layout seeds 10^9 + i
TOY_CLASSES = ("sky", "cloud", "sun", "mountain", "water", "sand", "grass", "tree", "house", "road")
SKY, CLOUD, SUN, MOUNTAIN, WATER, SAND, GRASS, TREE, HOUSE, ROAD = range(10)
# colormap[i] of PITI's COCO label colors (tests/golden/label_colormap_182.json holds them all).
TOY_COLORS = np.array([[128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128], [128, 0, 128], [0, 128, 128],
                       [128, 128, 128], [64, 0, 0], [192, 0, 0], [64, 128, 0]], dtype=np.uint8)
TIMES_OF_DAY = ("day", "dusk", "night")

# Depth in meters: a camera 1.6 m above a flat ground sees the row v (image height = focal length)
# at 1.6 / (v - horizon). Mountains, clouds and sky get fixed far distances behind the ground.
CAMERA_HEIGHT, GROUND_MAX_DEPTH = 1.6, 200.0
MOUNTAIN_DEPTHS, CLOUD_DEPTH, SKY_DEPTH = (600.0, 400.0), 800.0, 1000.0
# An object or region is named in the caption when it covers at least this fraction of the image.
MIN_NAMED_FRACTION = 0.001

class ToyWorldError(ValueError):
    """Bad input to the toy world (unknown caption word, bad size)."""

@dataclass
class House:
    x: float  # center of the base, on the ground
    y: float
    scale: float  # perspective: 0 at the horizon, 1 at the bottom of the image
    width: float  # front face width, wall and roof heights (at scale 1)
    wall: float
    roof: float
    side: int  # a side wing to the left (-1), right (+1) or none (0)
    wing: float  # width of the side wing
    door: float  # door offset on the front face, as a fraction of its width
    windows: int  # windows on the side wing

@dataclass
class Tree:
    x: float
    y: float
    scale: float
    pine: bool  # a pine (three stacked triangles) or a leafy tree (a crown of round blobs)
    trunk: float  # trunk height and crown radius (at scale 1)
    crown: float
    blobs: np.ndarray  # (dx, dy, radius) per blob of a leafy crown

@dataclass
class Layout:
    horizon: float
    ridges: list  # per mountain range (back first): heights at 65 control points along x
    sun: tuple | None  # (x, y, radius)
    clouds: list  # per cloud: array of ellipses (cx, cy, rx, ry)
    base: int  # GRASS or SAND: what the land is made of
    shore: np.ndarray | None  # sea: shoreline y at 17 control points
    sand_band: float  # sea: width of the beach between water and grass (0: none)
    lake: tuple | None  # (cx, cy, rx, ry)
    road: tuple | None  # (x at horizon, x at bottom, half width at bottom, curvature)
    objects: list  # Houses and Trees, far to near

@dataclass
class ToyScene:
    image: np.ndarray  # uint8 H x W x 3
    label: np.ndarray  # uint8 H x W, class ids
    caption: str
    sketch: np.ndarray  # uint8 H x W, 255 on edges, 0 elsewhere
    depth: np.ndarray  # float32 H x W, meters
    time_of_day: str

# --- layout ---

def _fractal_curve(rng, n=65, octaves=5):
    """Sum of piecewise-linear random curves at doubling resolutions, scaled to [0, 1]."""
    x = np.linspace(0, 1, n)
    h = sum(0.55 ** k * np.interp(x, np.linspace(0, 1, 2 ** k + 1), rng.random(2 ** k + 1))
            for k in range(1, octaves + 1))
    return (h - h.min()) / (np.ptp(h) + 1e-8)

def road_center(layout, y):
    """Center x and half width of the road at rows y (it narrows to a point at the horizon)."""
    x_far, x_near, half, curve = layout.road
    t = np.clip((y - layout.horizon) / (1 - layout.horizon), 0, 1)
    return x_far + (x_near - x_far) * t + curve * t * (1 - t), half * t

def ground_class(layout, x, y):
    """The class of the ground at normalized points (x, y) below the horizon (arrays broadcast)."""
    x, y = np.broadcast_arrays(x, y)
    cls = np.full(x.shape, layout.base, dtype=np.uint8)
    if layout.shore is not None:
        shore = np.interp(x, np.linspace(0, 1, len(layout.shore)), layout.shore)
        if layout.base == GRASS and layout.sand_band > 0:
            cls[y < shore + layout.sand_band] = SAND
        cls[y < shore] = WATER
    if layout.lake is not None:
        cx, cy, rx, ry = layout.lake
        cls[((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 < 1] = WATER
    if layout.road is not None:
        center, half = road_center(layout, y)
        cls[(np.abs(x - center) < half) & (cls != WATER)] = ROAD
    return cls

def _place(rng, layout, half_width):
    """A base point (x, y) on land, not on the road, or None after a few tries."""
    for _ in range(20):
        y = layout.horizon + (1 - layout.horizon) * rng.uniform(0.15, 0.97)
        x = rng.uniform(0.03, 0.97)
        s = (y - layout.horizon) / (1 - layout.horizon)
        xs = x + np.array([-1.0, 0.0, 1.0]) * half_width * s
        if np.isin(ground_class(layout, xs, np.full(3, y)), (GRASS, SAND)).all():
            return x, y, s
    return None

def sample_layout(seed):
    """The geometry of scene `seed`: everything that decides the label map, nothing about colors."""
    rng = np.random.default_rng([int(seed), 0])
    horizon = rng.uniform(0.35, 0.6)
    heights = sorted(rng.uniform(0.08, horizon - 0.1, size=rng.choice(3, p=[0.3, 0.4, 0.3])))[::-1]  # tall at the back
    ridges = [height * (0.25 + 0.75 * _fractal_curve(rng)) for height in heights]
    sun = None
    if rng.random() < 0.6:
        r = rng.uniform(0.03, 0.065)
        sun = (rng.uniform(0.1, 0.9), rng.uniform(r + 0.02, horizon - 0.08), r)
    clouds = []
    for _ in range(rng.choice(5, p=[0.25, 0.3, 0.25, 0.12, 0.08])):
        cx, cy, w = rng.uniform(0, 1), rng.uniform(0.05, horizon - 0.1), rng.uniform(0.08, 0.22)
        n = rng.integers(3, 7)
        rx = w * rng.uniform(0.25, 0.45, n)
        ry = rx * rng.uniform(0.45, 0.75, n)
        clouds.append(np.stack([cx + w * rng.uniform(-0.5, 0.5, n), cy - 0.4 * ry, rx, ry], 1))
    base = GRASS if rng.random() < 0.8 else SAND
    shore, sand_band, lake, road = None, 0.0, None, None
    if rng.random() < 0.35:
        depth = horizon + (1 - horizon) * rng.uniform(0.08, 0.45)
        shore = depth + 0.03 * (1 - horizon) * (_fractal_curve(rng, 17, 3) - 0.5)
        sand_band = rng.uniform(0.02, 0.06) if rng.random() < 0.7 else 0.0
    elif rng.random() < 0.3:
        cy = horizon + (1 - horizon) * rng.uniform(0.2, 0.6)
        ry = (cy - horizon) * rng.uniform(0.2, 0.5)
        lake = (rng.uniform(0.2, 0.8), cy, ry * rng.uniform(3, 6), ry)
    if rng.random() < 0.35:
        road = (rng.uniform(0.3, 0.7), rng.uniform(0.1, 0.9), rng.uniform(0.08, 0.18), rng.uniform(-0.3, 0.3))
    layout = Layout(horizon, ridges, sun, clouds, base, shore, sand_band, lake, road, [])
    for _ in range(rng.choice(4, p=[0.35, 0.35, 0.2, 0.1])):
        width = rng.uniform(0.18, 0.3)
        if (spot := _place(rng, layout, width)) is not None:
            side = int(rng.choice([-1, 0, 1]))
            layout.objects.append(House(*spot, width, rng.uniform(0.1, 0.16), rng.uniform(0.06, 0.11),
                                        side, width * rng.uniform(0.6, 1.2), rng.uniform(-0.25, 0.25),
                                        int(rng.integers(1, 4))))
    for _ in range(rng.choice(7, p=[0.25, 0.2, 0.15, 0.15, 0.1, 0.08, 0.07])):
        if (spot := _place(rng, layout, 0.02)) is not None:
            pine = bool(rng.random() < 0.4)
            crown = rng.uniform(0.06, 0.1)
            n = rng.integers(3, 6)
            blobs = np.stack([rng.uniform(-0.7, 0.7, n), rng.uniform(-0.5, 0.4, n),
                              rng.uniform(0.55, 0.8, n)], 1) * crown
            layout.objects.append(Tree(*spot, pine, rng.uniform(0.06, 0.14), crown, blobs))
    layout.objects.sort(key=lambda o: o.y)  # painter's order: far objects first
    return layout

# --- caption ---

NUMBERS = ("no", "a", "two", "three", "four", "five", "six")
SKY_WORDS = {"day": "blue", "dusk": "dusk", "night": "night"}
# Which class each caption noun names (the moon is drawn as class "sun").
CAPTION_NOUNS = {"sky": SKY, "cloud": CLOUD, "clouds": CLOUD, "sun": SUN, "moon": SUN,
                 "mountains": MOUNTAIN, "sea": WATER, "lake": WATER, "sand": SAND, "grass": GRASS,
                 "tree": TREE, "trees": TREE, "house": HOUSE, "houses": HOUSE, "road": ROAD}

def _join(items):
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]

def _counted(n, noun, adjective=None):
    return " ".join([NUMBERS[n]] + ([adjective] if adjective else []) + [noun if n == 1 else noun + "s"])

def _caption(painter):
    """Describe what is visible: objects and regions covering at least MIN_NAMED_FRACTION."""
    cv, area = painter.cv, float(painter.size * painter.size)
    named = np.bincount(cv.label.ravel(), minlength=len(TOY_CLASSES)) / area >= MIN_NAMED_FRACTION
    visible = np.bincount(cv.part.ravel(), minlength=cv.parts) / area
    seen = [(what, detail) for what, detail, parts in painter.objects if visible[parts].sum() >= MIN_NAMED_FRACTION]
    houses = [detail for what, detail in seen if what == "house"]
    trees = [detail for what, detail in seen if what == "tree"]
    things = [_counted(len(houses), "house", houses[0] if len(set(houses)) == 1 else None)] if houses else []
    if trees:
        things.append(_counted(len(trees), "tree", "pine" if all(trees) else None))
    ground = [name for c, name in ((GRASS, "grass"), (SAND, "sand")) if named[c]]
    if things:
        text = _join(things) + (" on " + _join(ground) if ground else "")
    else:
        text = "a landscape" + (" of " + _join(ground) if ground else "")
    if named[WATER]:
        text += " by a lake" if painter.layout.lake is not None else " by the sea"
    extras = ["a road"] if named[ROAD] else []
    if named[MOUNTAIN]:
        snowy = (painter.snow & (cv.label == MOUNTAIN)).sum() / area >= MIN_NAMED_FRACTION
        extras.append("snowy mountains" if snowy else "mountains")
    clouds = int((visible[np.unique(cv.part[cv.label == CLOUD])] >= MIN_NAMED_FRACTION).sum())
    if clouds:
        extras.append("a cloud" if clouds == 1 else "clouds")
    if named[SUN]:
        extras.append("the moon" if painter.tod == "night" else "the sun")
    if extras:
        text += " with " + _join(extras)
    return text + f" under a {SKY_WORDS[painter.tod]} sky"

def caption_classes(caption):
    """The set of class ids a toy caption names."""
    return {CAPTION_NOUNS[w] for w in caption.replace(",", " ").split() if w in CAPTION_NOUNS}

# --- scenes ---

def render(layout, size=256, appearance_seed=0):
    """Rasterize `layout` at size x size and paint it with the appearance of `appearance_seed`."""
    if not isinstance(size, (int, np.integer)) or size < 16:
        raise ToyWorldError(f"toy scenes are rendered at an integer size of at least 16 pixels, got {size!r}")
    from .paint import Painter  # imported here: paint builds on this module's definitions

    painter = Painter(layout, int(size), np.random.default_rng([int(appearance_seed), 1]))
    for step in (painter.sky, painter.sun, painter.clouds, painter.mountains, painter.ground):
        step()
    for o in layout.objects:
        (painter.house if isinstance(o, House) else painter.tree)(o)
    image, cv = painter.finish(), painter.cv
    sketch = np.zeros((size, size), bool)  # where the part id changes: region and part outlines
    sketch[:, :-1] |= cv.part[:, 1:] != cv.part[:, :-1]
    sketch[:-1, :] |= cv.part[1:, :] != cv.part[:-1, :]
    return ToyScene(image, cv.label, _caption(painter), sketch.astype(np.uint8) * 255, cv.depth, painter.tod)

def render_scene(seed, size=256, appearance_seed=None):
    """Scene `seed`; its appearance comes from `appearance_seed` (default: `seed` too)."""
    return render(sample_layout(seed), size, seed if appearance_seed is None else appearance_seed)

def label_to_color(label):
    """Color-code a label map with TOY_COLORS, the convention of PITI's label-map conditions."""
    return TOY_COLORS[label]

# --- tokenizer ---

class ToyTokenizer:
    """Word-level tokenizer of toy captions (id 0: padding). `encode`, as GLIDE's: ids cut or padded to the context
    length and a mask False on padding; the empty caption is classifier-free guidance's null input."""

    VOCAB = tuple("<pad> , a and by landscape of on under with the sky blue dusk night house houses tree trees "
                  "pine grass sand sea lake road snowy mountains cloud clouds sun moon red white yellow brown gray two "
                  "three four five six".split())

    def __init__(self):
        self.ids = {word: i for i, word in enumerate(self.VOCAB)}
        self.vocab_size = len(self.VOCAB)

    def encode(self, caption, ctx_len):
        words = caption.lower().replace(",", " , ").split()
        if unknown := [w for w in words if w not in self.ids]:
            raise ToyWorldError(f"word(s) {unknown} are not in the toy vocabulary: {' '.join(self.VOCAB[1:])}")
        ids = [self.ids[w] for w in words][:ctx_len]
        tokens = torch.zeros(ctx_len, dtype=torch.long)
        tokens[: len(ids)] = torch.tensor(ids, dtype=torch.long)
        return tokens, torch.arange(ctx_len) < len(ids)

    def decode(self, tokens, mask=None):
        ids = [int(t) for t, keep in zip(tokens, mask if mask is not None else [True] * len(tokens))
               if keep and int(t) != 0]
        return " ".join(self.VOCAB[i] for i in ids).replace(" ,", ",")

# --- pictures ---

def depth_to_gray(depth):
    """Inverse depth on a log scale as uint8: near is white, the sky is black."""
    near = np.log(SKY_DEPTH) - np.log(np.maximum(depth, 1.0))
    return (255 * near / np.log(SKY_DEPTH)).astype(np.uint8)

def save_example_grid(path, n=6, size=128, seed=8):
    """Save n scenes as rows of image | label colors | sketch | depth (docs/toy_world.png)."""
    from PIL import Image

    from nanopiti.pictures import grid_row
    scenes = [render_scene(seed + i, size) for i in range(n)]
    rows = [grid_row([s.image, label_to_color(s.label), np.repeat(s.sketch[..., None], 3, 2),
                      np.repeat(depth_to_gray(s.depth)[..., None], 3, 2)]) for s in scenes]
    gap = np.full((2, rows[0].shape[1], 3), 255, np.uint8)  # white rows between the scenes
    Image.fromarray(np.concatenate([part for row in rows for part in (row, gap)][:-1])).save(path, optimize=True)
