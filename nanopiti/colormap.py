"""The label color map that turns class-index masks into the RGB pictures PITI's encoder reads.

The released COCO-Stuff checkpoints were trained on maps colored by PITI's `preprocess/preprocess_mask.py`, whose
`labelcolormap` is PASCAL VOC's bit-interleaving map shifted by one ("let's give 0 a color"): class v gets the VOC
color of index v + 1, bits 3j, 3j + 1, 3j + 2 of the index going to bit 7 - j of R, G, B (j = 0..6, most
significant first), so neighbouring classes get very different colors; class 0 (COCO "person") is (128, 0, 0).
Values with no entry (COCO-Stuff's 255, "unlabeled") stay black, as PITI's `Colorize` leaves them. The COCO palette
has 183 entries, as `labelcolormap(183)` (entry 182, (128, 224, 192), is no class but is in the release's example
masks); ADE20K (0..150, 0 = "other") uses the same map; `tests/test_data.py` checks it against the reference JSON.
"""

import numpy as np

NUM_COCO_CLASSES = 182  # COCO-Stuff: 0..181 (things and stuff), 255 = unlabeled
UNLABELED = 255
# COCO-Stuff's class names by class value: 0..90 things (11 ids unused in the annotations, named
# after the COCO paper's list), 91..181 stuff. The colors are those of `label_colormap`.
COCO_STUFF_CLASSES = tuple((
    "person, bicycle, car, motorcycle, airplane, bus, train, truck, boat, traffic light, fire hydrant, street sign, "
    "stop sign, parking meter, bench, bird, cat, dog, horse, sheep, cow, elephant, bear, zebra, giraffe, hat, "
    "backpack, umbrella, shoe, eye glasses, handbag, tie, suitcase, frisbee, skis, snowboard, sports ball, kite, "
    "baseball bat, baseball glove, skateboard, surfboard, tennis racket, bottle, plate, wine glass, cup, fork, knife, "
    "spoon, bowl, banana, apple, sandwich, orange, broccoli, carrot, hot dog, pizza, donut, cake, chair, couch, "
    "potted plant, bed, mirror, dining table, window, desk, toilet, door, tv, laptop, mouse, remote, keyboard, "
    "cell phone, microwave, oven, toaster, sink, refrigerator, blender, book, clock, vase, scissors, teddy bear, "
    "hair drier, toothbrush, hair brush, "
    "banner, blanket, branch, bridge, building-other, bush, cabinet, cage, cardboard, carpet, ceiling-other, "
    "ceiling-tile, cloth, clothes, clouds, counter, cupboard, curtain, desk-stuff, dirt, door-stuff, fence, "
    "floor-marble, floor-other, floor-stone, floor-tile, floor-wood, flower, fog, food-other, fruit, "
    "furniture-other, grass, gravel, ground-other, hill, house, leaves, light, mat, metal, mirror-stuff, moss, "
    "mountain, mud, napkin, net, paper, pavement, pillow, plant-other, plastic, platform, playingfield, railing, "
    "railroad, river, road, rock, roof, rug, salad, sand, sea, shelf, sky-other, skyscraper, snow, solid-other, "
    "stairs, stone, straw, structural-other, table, tent, textile-other, towel, tree, vegetable, wall-brick, "
    "wall-concrete, wall-other, wall-panel, wall-stone, wall-tile, wall-wood, water-other, waterdrops, window-blind, "
    "window-other, wood").split(", "))

def label_colormap(n):
    """The (n, 3) uint8 color table, row v the color of class v (indices below 2**21 get distinct colors)."""
    ids = np.arange(1, n + 1)  # "+1": PITI gives class 0 a color instead of black
    cmap = np.zeros((n, 3), dtype=np.int64)
    for j in range(7):  # bits 3j, 3j + 1, 3j + 2 -> bit 7 - j of R, G, B
        cmap |= ((ids[:, None] >> np.arange(3)) & 1) << (7 - j)
        ids = ids >> 3
    return cmap.astype(np.uint8)

# COCO: the release's labelcolormap(183), one entry more than the classes; the ADE20K challenge's 0..150
PALETTES = {"coco": label_colormap(NUM_COCO_CLASSES + 1), "ade20k": label_colormap(151)}

def get_palette(palette):
    """Look up a palette by name ('coco' or 'ade20k'), or pass an (n, 3) table through."""
    if isinstance(palette, str):
        if palette not in PALETTES:
            raise ValueError(f"unknown palette {palette!r}; expected one of {sorted(PALETTES)}")
        return PALETTES[palette]
    return np.asarray(palette, dtype=np.uint8)

def labels_to_color(label, palette="coco"):
    """Class-index map (H, W) -> color-coded label map (H, W, 3) uint8; 255 (unlabeled) -> black. Any other value
    without a palette entry is an error, not a silent black hole: the mask is another dataset's."""
    table = get_palette(palette)
    label = np.asarray(label).astype(np.int64)
    if label.ndim != 2:
        raise ValueError(f"a label map must be 2-D (H, W), got shape {label.shape}")
    bad = (label >= len(table)) & (label != UNLABELED) | (label < 0)
    if bad.any():
        raise ValueError(f"label values {np.unique(label[bad]).tolist()[:5]} are outside the "
                         f"palette's 0..{len(table) - 1} (and 255 = unlabeled)")
    # one extra black row at the end absorbs the unlabeled pixels in a single gather
    lut = np.concatenate([table, np.zeros((1, 3), np.uint8)])
    return lut[np.where(label == UNLABELED, len(table), label)]

def _pack(rgb):
    """(..., 3) uint8 -> (...,) int, one integer per color, so colors compare as numbers."""
    rgb = np.asarray(rgb, dtype=np.int64)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]

def in_palette(color, palette="coco"):
    """(H, W, 3) colors -> (H, W) bool: True where the color is a palette color or black."""
    keys = np.append(_pack(get_palette(palette)), 0)
    return np.isin(_pack(color), keys)

def color_to_labels(color, palette="coco"):
    """Color-coded label map (H, W, 3) -> class-index map (H, W) uint8, black -> 255: `labels_to_color`'s inverse.
    A color not in the palette (e.g. from bilinear resizing) raises ValueError."""
    table = get_palette(palette)
    color = np.asarray(color)
    if color.ndim != 3 or color.shape[2] != 3:
        raise ValueError(f"a color label map must be (H, W, 3), got shape {color.shape}")
    unknown = ~in_palette(color, table)
    if unknown.any():
        raise ValueError(f"{int(unknown.sum())} pixels have colors that are not in the palette (first: "
                         f"{tuple(int(c) for c in color[unknown][0])}); was the map resized with a smoothing "
                         "filter instead of nearest?")
    keys, packed = _pack(table), _pack(color)
    order = np.argsort(keys)
    pos = np.clip(np.searchsorted(keys, packed, sorter=order), 0, len(keys) - 1)
    return np.where(packed == 0, UNLABELED, order[pos]).astype(np.uint8)
