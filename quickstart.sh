#!/usr/bin/env bash
# The main job on the built-in toy world, from a fresh clone: install the requirements; turn 16
# held-out toy masks into pictures with the shipped toy models and measure them with the toy judge
# (its grid: out/quickstart/measure.png); then go on training an early mask model (step 2,000 of the toy
# recipe from the toy prior, where it starts to listen to its masks) and watch the condition measure rise.
# About 7 minutes on an idle 2-core CPU (measured 6 min 38 s), plus the install.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip install -r requirements.txt
python3 ablations.py --measure checkpoints/toy_mask_base.pt checkpoints/toy_mask_upsample.pt --eval-n 16 \
    --out out/quickstart
python3 train.py --stage 2 --init checkpoints/toy_mask_base_step2000.pt --timesteps high-noise --lr 1e-3 --ema 0.999 \
    --max-steps 1000 --sample-every 250 --out runs/quickstart --resume auto
echo "done: out/quickstart/measure.png (mask | base | upsampled | real render), training previews in runs/quickstart/samples/"
