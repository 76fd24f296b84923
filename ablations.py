"""The paper's ablations in miniature, on the toy world (paper section 4.3, Tables 3 and 4, Fig. 6).

    python ablations.py --prior-base checkpoints/toy_prior_base.pt --prior-up checkpoints/toy_prior_upsample.pt

Trains, from the shipped toy prior, every variant the paper compares (train.py in subprocesses,
`--jobs` at a time, each on one CPU thread), samples held-out toy masks with each, measures the
samples with toyworld.judge (mIoU of a toy segmenter against the input mask: faithfulness;
Frechet distance in its feature space: "toy FID"; saturation and high-frequency energy: the
guidance comparison) and writes `--out`/results.md and picture grids:

* finetuning (Table 3a): frozen decoder (stage 1 only) | one-stage (stage 2 from the prior) |
  two-stage (stage 1, then stage 2), the same total number of steps for the last two;
* pretraining and data (Table 4): two-stage from the prior vs the same architecture trained from
  scratch, on 25%, 50% and 100% of the paired training scenes;
* guidance (Fig. 6): CF vs NCF at w in {1, 3, 5} with the two-stage model;
* the upsampler (Table 3b): diffusion loss only | + perceptual | + perceptual + adversarial.

Finished runs are reused (their latest.pt), so an interrupted script can simply be restarted.

    python ablations.py --measure checkpoints/toy_mask_base.pt checkpoints/toy_mask_upsample.pt

measures two models as sample.py runs them instead (how the shipped toy models were measured).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

import sample
from nanopiti import load_model
from nanopiti.guidance import condition_use
from nanopiti.pictures import save_grid
from toyworld.data import ToyDataset
from toyworld.judge import evaluate_samples, get_segmenter
from toyworld.world import HELDOUT_SEED0, TOY_SCENES, render_scene

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prior-base", default="checkpoints/toy_prior_base.pt")
    p.add_argument("--prior-up", default="checkpoints/toy_prior_upsample.pt")
    p.add_argument("--out", default="runs/ablations")
    p.add_argument("--steps", type=int, default=300, help="steps of each finetuning stage")
    p.add_argument("--up-steps", type=int, default=150, help="steps of each upsampler run")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4, help="for every run (the toy runs are short)")
    p.add_argument("--eval-n", type=int, default=100, help="held-out masks to sample and measure")
    p.add_argument("--sample-steps", default="50", help="base-model respacing for the evaluation")
    p.add_argument("--w", type=float, default=1.0, help="NCF strength for the finetuning ablations")
    p.add_argument("--jobs", type=int, default=2, help="training runs at a time")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--measure", nargs=2, metavar=("BASE", "UP"),
                   help="train nothing: measure these two models with sample.py's defaults on --eval-n held-out masks")
    return p.parse_args(argv)

# --- training runs ---

def train_command(args, stage, out, init, steps, *extra):
    return [sys.executable, "train.py", "--stage", stage, "--data", "toy", "--init", init, "--out", out,
            "--max-steps", str(steps), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
            "--seed", str(args.seed), "--save-every", str(steps), "--sample-every", "0", "--workers", "0",
            "--resume", "auto", *extra]

def plan(args):
    """name -> list of train.py commands run one after the other (a chain of stages)."""
    o, s = args.out, args.steps
    chains = {
        "two-stage": [train_command(args, "1", f"{o}/frozen", args.prior_base, s),
                      train_command(args, "2", f"{o}/two-stage", f"{o}/frozen/latest.pt", s)],
        "one-stage": [train_command(args, "2", f"{o}/one-stage", args.prior_base, 2 * s)],
    }
    for pct in (25, 50, 100):
        limit = ["--limit", str(TOY_SCENES * pct // 100)]
        if pct != 100:  # the 100% pretrained two-stage run is "two-stage" above
            chains[f"pretrained-{pct}"] = [
                train_command(args, "1", f"{o}/pretrained-{pct}-s1", args.prior_base, s, *limit),
                train_command(args, "2", f"{o}/pretrained-{pct}", f"{o}/pretrained-{pct}-s1/latest.pt", s, *limit)]
        chains[f"scratch-{pct}"] = [train_command(args, "2", f"{o}/scratch-{pct}", "scratch", 2 * s, *limit)]
    for name, perc, adv in (("up-diffusion", 0, 0), ("up-perceptual", 0.004, 0), ("up-full", 0.004, 0.01)):
        chains[name] = [train_command(args, "up", f"{o}/{name}", args.prior_up, args.up_steps, "--random-vgg",
                                      "--perc-weight", str(perc), "--adv-weight", str(adv), "--batch-size", "4")]
    return chains

def run_chain(commands):
    for cmd in commands:
        out = cmd[cmd.index("--out") + 1]
        if os.path.isfile(f"{out}/latest.pt"):
            continue  # finished by an earlier invocation
        env = dict(os.environ, OMP_NUM_THREADS="1")  # one thread each: runs share the cores
        with open(f"{out}.log", "w") as log:
            if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed; see {out}.log")

# --- evaluation ---

def heldout(n, resolution=32):
    """Held-out toy scenes: conditions (128x128 masks), class-id labels, real images at `resolution`."""
    data = ToyDataset(n, "mask", resolution=resolution, cond_size=128, random_flip=False,
                      first_scene=HELDOUT_SEED0, vary_appearance=False)
    cond = torch.stack([data[i]["cond"] for i in range(n)])
    images = torch.stack([data[i]["image"] for i in range(n)])
    labels = np.stack([render_scene(HELDOUT_SEED0 + i, 128).label for i in range(n)])
    return cond, labels, images

def sample_base(path, cond, args, w, guidance):
    model = load_model(path)
    g = torch.Generator().manual_seed(args.seed)
    return sample.sample_base(model, cond, w=w, guidance=guidance, steps=args.sample_steps, generator=g,
                              progress=False)

def upsample(path, cond, low_res, args):
    model = load_model(path)
    g = torch.Generator().manual_seed(args.seed)
    return sample.sample_upsampler(model, cond, low_res, generator=g, progress=False)

def grid(columns, path, rows=4):
    """The first `rows` examples of each N x 3 x H x W column, one row per example."""
    save_grid([col[:rows] for col in columns], path)

def evaluate(args):
    torch.manual_seed(args.seed)
    o = args.out
    judge = get_segmenter(f"{o}/segmenter.pt")
    cond, labels, real = heldout(args.eval_n)
    rows, pictures = [], {}

    def measure(name, samples):
        metrics = evaluate_samples(judge, samples, labels, reference=real)
        rows.append({"run": name, **{k: round(v, 4) for k, v in metrics.items()}})
        pictures[name] = samples
        print(json.dumps(rows[-1]), flush=True)

    for name in ("frozen", "one-stage", "two-stage", "pretrained-25", "pretrained-50", "scratch-25", "scratch-50",
                 "scratch-100"):
        measure(name, sample_base(f"{o}/{name}/latest.pt", cond, args, args.w, "ncf"))
    for guidance in ("cf", "ncf"):
        for w in (1.0, 3.0, 5.0):
            measure(f"{guidance} w={w:g}", sample_base(f"{o}/two-stage/latest.pt", cond, args, w, guidance))
    real_up = heldout(args.eval_n, resolution=64)[2]
    for name in ("up-diffusion", "up-perceptual", "up-full"):
        samples = upsample(f"{o}/{name}/latest.pt", cond, real, args)
        metrics = evaluate_samples(judge, samples, labels, reference=real_up)
        rows.append({"run": name, **{k: round(v, 4) for k, v in metrics.items()}})
        pictures[name] = samples
        print(json.dumps(rows[-1]), flush=True)
    rows.append({"run": "real renders", **{k: round(v, 4) for k, v in evaluate_samples(judge, real, labels).items()}})

    grid([cond] + [pictures[n] for n in ("frozen", "one-stage", "two-stage", "scratch-100")] + [real],
         f"{o}/finetune.png")
    grid([cond] + [pictures[f"{k} w={w:g}"] for k in ("cf", "ncf") for w in (1.0, 3.0, 5.0)], f"{o}/guidance.png")
    grid([real] + [pictures[n] for n in ("up-diffusion", "up-perceptual", "up-full")] + [real_up], f"{o}/upsampler.png")
    return rows, judge.info

def measure_models(args):
    """--measure: the pipeline of sample.py with its defaults (NCF w = 0.3, 250 DDPM steps, fast27
    upsampler) on --eval-n held-out toy masks; mIoU and toy FID of the base and the upsampled
    samples, the base model's condition measure at t = 500, and a grid (mask | base | upsampled | real)."""
    judge = get_segmenter(f"{args.out}/segmenter.pt")
    cond, labels, real = heldout(args.eval_n)
    real_up = heldout(args.eval_n, resolution=64)[2]
    base, up = load_model(args.measure[0]), load_model(args.measure[1])
    low, high = sample.generate(base, up, cond, cond, generator=torch.Generator().manual_seed(args.seed))
    use = condition_use(base, real, {"cond": cond}, {"cond": torch.ones_like(cond)}, timesteps=(500,))[500]
    rows = {"base": evaluate_samples(judge, low, labels, reference=real),
            "upsampled": evaluate_samples(judge, high, labels, reference=real_up)}
    for name, m in rows.items():
        print(f"{name}: mIoU {m['miou']:.3f}, toy FID {m['fid']:.2f} ({args.eval_n} held-out masks; "
              f"judge's own mIoU on real renders {judge.info.get('heldout_miou', float('nan')):.3f})")
    print(f"condition measure at t = 500: wrong/right {use['ratio']:.3f}, mirrored/right {use['layout']:.3f}")
    grid([cond, low, high, real_up], f"{args.out}/measure.png", rows=min(8, args.eval_n))
    print(f"grid: {args.out}/measure.png (mask | base | upsampled | real render)")
    return rows, use

def write_table(rows, judge_info, args, seconds):
    lines = [f"Toy ablations: {args.steps} steps per finetuning stage, batch {args.batch_size}, lr {args.lr}; "
             f"{args.eval_n} held-out masks, base sampled with {args.sample_steps} DDPM steps, "
             f"NCF w = {args.w:g} unless named; upsampler {args.up_steps} steps, fast27. "
             f"Judge: toy segmenter, held-out mIoU {judge_info.get('heldout_miou', float('nan')):.3f}. "
             f"Wall time {seconds / 60:.0f} min.", "",
             "| run | mIoU (higher: more faithful) | toy FID (lower: more real) | saturation | HF energy |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['miou']:.3f} | {r.get('fid', float('nan')):.2f} | "
                     f"{r['saturation']:.3f} | {r['hf_energy']:.4f} |")
    with open(f"{args.out}/results.md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))

def main(argv=None):
    args = parse_args(argv)
    if args.measure:
        missing = [path for path in args.measure if not os.path.isfile(path)]
        if missing:
            print(f"error: --measure: {missing[0]} not found: give a base model and an upsampler", file=sys.stderr)
            return 1
        os.makedirs(args.out, exist_ok=True)
        measure_models(args)
        return 0
    for path in (args.prior_base, args.prior_up):
        if not os.path.isfile(path):
            print(f"error: {path} not found: train the toy prior first (see README, 'The toy prior')", file=sys.stderr)
            return 1
    os.makedirs(args.out, exist_ok=True)
    start = time.time()
    with ThreadPoolExecutor(args.jobs) as pool:
        for future in [pool.submit(run_chain, chain) for chain in plan(args).values()]:
            future.result()
    rows, judge_info = evaluate(args)
    write_table(rows, judge_info, args, time.time() - start)
    return 0

if __name__ == "__main__":
    sys.exit(main())
