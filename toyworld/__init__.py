"""The toy world: a procedural world of small outdoor scenes in which the whole PITI method runs on a
CPU in minutes, and a judge of generated pictures. It builds on nanopiti; nanopiti never imports it.

    world.py   layouts, captions, the tokenizer, rendering (render_scene)
    paint.py   painting a layout: rasterization, textures, the appearance of every class
    data.py    ToyDataset: scenes as training pairs, rendered on the fly
    judge.py   the toy judge: segmenter, mIoU, toy FID, saturation, high-frequency energy
"""
