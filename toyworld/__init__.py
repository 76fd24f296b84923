"""The toy world (docs/toy_world.md), built on nanopiti (nanopiti never imports it): world.py (layouts, captions,
the tokenizer, rendering), paint.py (painting a layout), data.py (scenes as training pairs) and judge.py (the toy
judge: segmenter, mIoU, toy FID, saturation, high-frequency energy)."""
