#!/usr/bin/env bash
# The main job on the built-in toy world, from a fresh clone: install the requirements, train the
# task encoder (stage 1: decoder frozen) from the shipped toy prior, then sample pictures of a toy
# mask with it and the shipped toy upsampler. About 1.5 minutes on an idle 2-core CPU, plus the install.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip install -r requirements.txt
python3 train.py --stage 1 --data toy --init checkpoints/toy_prior_base.pt --max-steps 300 --lr 2e-4 \
    --sample-every 100 --out runs/quickstart --resume auto
python3 sample.py --ckpt runs/quickstart/latest.pt --sr-ckpt checkpoints/toy_mask_upsample.pt \
    --cond docs/toy_mask.png --num 4 --w 1 --out out/quickstart
echo "done: out/quickstart/toy_mask_grid.png (condition | 4 samples), training previews in runs/quickstart/samples/"
