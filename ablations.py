"""The paper's ablations in miniature, on the toy world (paper section 4.3, Tables 3 and 4, Fig. 6).

    python ablations.py --prior-base checkpoints/toy_prior_base.pt --prior-up checkpoints/toy_prior_upsample.pt
    python ablations.py --measure checkpoints/toy_mask_base.pt checkpoints/toy_mask_upsample.pt
    python ablations.py --guidance checkpoints/toy_mask_base.pt

The first trains every variant the paper compares from the toy prior with the toy recipe (docs/toy_world.md), once
per `--seeds` (train.py in subprocesses, `--jobs` at a time, one CPU thread each; finished runs are reused, so an
interrupted script can simply be restarted), samples held-out toy masks with each, measures the samples with
toyworld.judge (mIoU: faithfulness; toy FID; saturation and high-frequency energy) and writes `--out`/results.md
(the mean over the seeds and each seed's value) and picture grids. `--tables` picks some of:
* 3a (finetuning): frozen decoder (stage 1 only) | one-stage (stage 2 from the prior) | two-stage (stage 1, then
  stage 2), the last two with the same total number of steps;
* 4 (pretraining and data): two-stage and one-stage from the prior vs scratch, on 25, 50 and 100% of the scenes;
* 3b (the upsampler): diffusion loss only | + perceptual | + perceptual + adversarial.
The other two train nothing: the second measures a base model (and an upsampler) as sample.py runs them (how the
shipped toy models were measured), the third compares guidance (Fig. 6: CF vs NCF at w in {1, 3, 5}), per seed.
"""

import argparse
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

TABLES = {"3a": ("frozen", "one-stage", "two-stage"),  # the paper's table -> the variants it compares
          "4": ("two-stage", "pretrained-25", "pretrained-50", "one-stage", "one-stage-25", "one-stage-50",
                "scratch-25", "scratch-50", "scratch-100"),
          "3b": ("up-diffusion", "up-perceptual", "up-full")}

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prior-base", default="checkpoints/toy_prior_base.pt")
    p.add_argument("--prior-up", default="checkpoints/toy_prior_upsample.pt")
    p.add_argument("--out", default="runs/ablations")
    p.add_argument("--steps", type=int, default=3000, help="steps of each finetuning stage")
    p.add_argument("--up-steps", type=int, default=1500, help="steps of each upsampler run")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3, help="for every run (the toy recipe's)")
    p.add_argument("--eval-n", type=int, default=100, help="held-out masks to sample and measure")
    p.add_argument("--sample-steps", default="50", help="base-model respacing for the evaluation")
    p.add_argument("--w", type=float, default=1.0, help="NCF strength for the finetuning ablations")
    p.add_argument("--jobs", type=int, default=2, help="training runs at a time")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="train and sample every variant once per seed")
    p.add_argument("--tables", nargs="+", choices=list(TABLES), default=list(TABLES), help="the tables to rerun")
    p.add_argument("--measure", nargs="+", metavar="BASE [UP]", help="train nothing: measure BASE (and UP)")
    p.add_argument("--guidance", metavar="BASE", help="train nothing: the CF/NCF comparison with this base model")
    return p.parse_args(argv)

# --- training runs ---

def variants(args):
    """The variants of the tables in `args.tables`, each once, in the tables' order."""
    return list(dict.fromkeys(name for table in args.tables for name in TABLES[table]))

def plan(args, seed):
    """name -> the train.py commands run one after the other (a chain of stages), in --out/seed<seed>, for the
    variants of `args.tables` ("frozen" is the two-stage chain's first stage)."""
    o, s = f"{args.out}/seed{seed}", args.steps
    def run(stage, out, init, steps, *extra):  # the toy recipe: high-noise timesteps, EMA 0.999 (docs/toy_world.md)
        return [sys.executable, "train.py", "--stage", stage, "--data", "toy", "--init", init, "--out", out,
                "--max-steps", str(steps), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
                "--timesteps", "high-noise", "--ema", "0.999", "--seed", str(seed), "--save-every", "500",
                "--sample-every", "0", "--workers", "0", "--resume", "auto", *extra]
    chains = {
        "two-stage": [run("1", f"{o}/frozen", args.prior_base, s),
                      run("2", f"{o}/two-stage", f"{o}/frozen/latest.pt", s)],
        "one-stage": [run("2", f"{o}/one-stage", args.prior_base, 2 * s)],
    }
    for pct in (25, 50, 100):
        limit = ["--limit", str(TOY_SCENES * pct // 100)]
        if pct != 100:  # the 100% pretrained runs are "two-stage" and "one-stage" above
            first = f"{o}/pretrained-{pct}-s1"
            chains[f"pretrained-{pct}"] = [run("1", first, args.prior_base, s, *limit),
                                           run("2", f"{o}/pretrained-{pct}", f"{first}/latest.pt", s, *limit)]
            chains[f"one-stage-{pct}"] = [run("2", f"{o}/one-stage-{pct}", args.prior_base, 2 * s, *limit)]
        chains[f"scratch-{pct}"] = [run("2", f"{o}/scratch-{pct}", "scratch", 2 * s, *limit)]
    for name, perc, adv in (("up-diffusion", 0, 0), ("up-perceptual", 0.004, 0), ("up-full", 0.004, 0.01)):
        chains[name] = [run("up", f"{o}/{name}", args.prior_up, args.up_steps, "--random-vgg",
                            "--perc-weight", str(perc), "--adv-weight", str(adv), "--batch-size", "4")]
    wanted = {"two-stage" if name == "frozen" else name for name in variants(args)}
    return {name: chain for name, chain in chains.items() if name in wanted}

def run_chain(commands):
    for cmd in commands:  # with --resume auto a finished run returns at once and an interrupted one goes on
        out = cmd[cmd.index("--out") + 1]
        os.makedirs(os.path.dirname(out), exist_ok=True)
        env = dict(os.environ, OMP_NUM_THREADS="1")  # one thread each: runs share the cores
        with open(f"{out}.log", "a") as log:
            if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode != 0:
                raise RuntimeError(f"train.py for {out} failed: see {out}.log, fix it and rerun (done runs are reused)")

# --- evaluation ---

def heldout(n, resolution=32, task="mask"):
    """Held-out toy scenes: conditions of `task` at 128x128, class-id labels, real images at `resolution`."""
    data = ToyDataset(n, task, resolution=resolution, cond_size=128, random_flip=False,
                      first_scene=HELDOUT_SEED0, vary_appearance=False)
    samples = [data[i] for i in range(n)]
    labels = np.stack([render_scene(HELDOUT_SEED0 + i, 128).label for i in range(n)])
    return torch.stack([x["cond"] for x in samples]), labels, torch.stack([x["image"] for x in samples])

def sample_base(path, cond, args, seed, w, guidance="ncf"):
    return sample.sample_base(load_model(path), cond, w=w, guidance=guidance, steps=args.sample_steps,
                              generator=torch.Generator().manual_seed(seed), progress=False)

def upsample(path, cond, low_res, seed):
    return sample.sample_upsampler(load_model(path), cond, low_res, generator=torch.Generator().manual_seed(seed),
                                   progress=False)

def grid(columns, path, rows=4):
    """The first `rows` examples of each N x 3 x H x W column, one row per example."""
    save_grid([col[:rows] for col in columns], path)

def evaluate(args, seed, judge):
    """name -> metrics of every variant of `args.tables` trained with `seed`, sampled with it; base models from
    held-out masks, upsamplers from the real 32x32 renders; grids in --out/seed<seed>."""
    o, names = f"{args.out}/seed{seed}", variants(args)
    cond, labels, real = heldout(args.eval_n)
    real_up = heldout(args.eval_n, resolution=64)[2]
    ups = [name for name in names if name.startswith("up-")]
    samples = {name: upsample(f"{o}/{name}/latest.pt", cond, real, seed) if name in ups else
               sample_base(f"{o}/{name}/latest.pt", cond, args, seed, args.w) for name in names}
    metrics = {name: evaluate_samples(judge, x, labels, reference=real_up if name in ups else real)
               for name, x in samples.items()}
    metrics["real renders"] = evaluate_samples(judge, real, labels)
    if base := [x for name, x in samples.items() if name not in ups]:
        grid([cond] + base + [real], f"{o}/base.png")
    if ups:
        grid([real] + [samples[name] for name in ups] + [real_up], f"{o}/upsampler.png")
    return metrics

def measure_guidance(args, judge):
    """--guidance (Fig. 6): name -> metrics per seed of one base model at every CF/NCF strength, a grid per seed."""
    cond, labels, real = heldout(args.eval_n)
    per_seed = []
    for seed in args.seeds:
        samples = {f"{g} w={w:g}": sample_base(args.guidance, cond, args, seed, w, g)
                   for g in ("cf", "ncf") for w in (1.0, 3.0, 5.0)}
        grid([cond] + list(samples.values()), f"{args.out}/guidance_seed{seed}.png")
        per_seed.append({n: evaluate_samples(judge, x, labels, reference=real) for n, x in samples.items()})
    return per_seed

def measure_models(args):
    """--measure: sample.py's pipeline with its defaults (NCF w = 0.3, 250 DDPM steps, fast27 upsampler) on --eval-n
    held-out conditions of the model's task: mIoU and toy FID of the base and upsampled samples, the base model's
    condition measure at t = 500, a grid (condition | base | upsampled | real)."""
    base = sample.load_piti(args.measure[0], upsampler=False)
    up = sample.load_piti(args.measure[1], upsampler=True) if len(args.measure) == 2 else None
    task = sample.check_pair(base, up, None)
    judge = get_segmenter(f"{args.out}/segmenter.pt")
    cond, labels, real = heldout(args.eval_n, task=task)
    real_up = heldout(args.eval_n, resolution=64, task=task)[2]
    low, high = sample.generate(base, up, cond, cond, generator=torch.Generator().manual_seed(args.seeds[0]))
    use = condition_use(base, real, {"cond": cond}, {"cond": torch.ones_like(cond)}, timesteps=(500,))[500]
    rows = {"base": evaluate_samples(judge, low, labels, reference=real)}
    if up is not None:
        rows["upsampled"] = evaluate_samples(judge, high, labels, reference=real_up)
    for name, m in rows.items():
        print(f"{name}: mIoU {m['miou']:.3f}, toy FID {m['fid']:.2f} ({args.eval_n} held-out {task} conditions; "
              f"judge's own mIoU on real renders {judge.info.get('heldout_miou', float('nan')):.3f})")
    print(f"condition measure at t = 500: wrong/right {use['ratio']:.3f}, mirrored/right {use['layout']:.3f}")
    columns = [cond, low] + ([high] if up is not None else []) + [real_up]
    grid(columns, f"{args.out}/measure.png", rows=min(8, args.eval_n))
    print(f"grid: {args.out}/measure.png (condition | base |{' upsampled |' if up is not None else ''} real render)")
    return rows, use

def write_table(per_seed, judge_info, args, header):
    """results.md: one row per variant, each measure as the mean over the seeds and, in brackets, every seed's."""
    def cell(name, key, digits):
        values = [m[name].get(key, float("nan")) for m in per_seed]
        if all(np.isnan(values)):  # a measure this row has not (the real renders' toy FID)
            return "-"
        each = " / ".join(f"{v:.{digits}f}" for v in values)
        return f"{np.mean(values):.{digits}f}" + (f" ({each})" if len(values) > 1 else "")
    lines = [f"{header} {args.eval_n} held-out masks, seeds {', '.join(map(str, args.seeds))}; judge: toy segmenter, "
             f"held-out mIoU {judge_info.get('heldout_miou', float('nan')):.3f}.", "",
             "| run | mIoU (higher: more faithful) | toy FID (lower: more real) | saturation | HF energy |",
             "| --- | --- | --- | --- | --- |"]
    for name in per_seed[0]:
        lines.append(f"| {name} | {cell(name, 'miou', 3)} | {cell(name, 'fid', 2)} | {cell(name, 'saturation', 3)} | "
                     f"{cell(name, 'hf_energy', 4)} |")
    with open(f"{args.out}/results.md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))

def main(argv=None):
    args = parse_args(argv)
    if args.measure and len(args.measure) > 2:
        print(f"error: --measure takes a base model and at most one upsampler, not {len(args.measure)} files",
              file=sys.stderr)
        return 1
    if args.measure:
        needed, hint = args.measure, "give a toy base model (and an upsampler)"
    elif args.guidance:
        needed, hint = [args.guidance], "give a toy base model"
    else:
        needed, hint = [args.prior_base, args.prior_up], "train the toy prior first (docs/toy_world.md)"
    if missing := [path for path in needed if not os.path.isfile(path)]:
        print(f"error: {missing[0]} not found: {hint}", file=sys.stderr)
        return 1
    os.makedirs(args.out, exist_ok=True)
    if args.measure:
        try:
            measure_models(args)
        except sample.SampleError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0
    judge = get_segmenter(f"{args.out}/segmenter.pt")
    start = time.time()
    if args.guidance:
        per_seed = measure_guidance(args, judge)
        header = f"Guidance (Fig. 6) with {args.guidance}: {args.sample_steps} DDPM steps;"
    else:
        with ThreadPoolExecutor(args.jobs) as pool:
            futures = [pool.submit(run_chain, chain) for seed in args.seeds for chain in plan(args, seed).values()]
        if failed := [e for e in (f.exception() for f in futures) if e is not None]:  # the others ran to their end
            print(f"error: {failed[0]}", file=sys.stderr)
            return 1
        per_seed = [evaluate(args, seed, judge) for seed in args.seeds]
        header = (f"Toy ablations (Tables {', '.join(args.tables)}): {args.steps} steps per finetuning stage, batch "
                  f"{args.batch_size}, lr {args.lr}, the toy recipe; base sampled with {args.sample_steps} DDPM steps, "
                  f"NCF w = {args.w:g};" + (f" upsampler {args.up_steps} steps, fast27, from the real 32x32 renders;"
                                            if "3b" in args.tables else ""))
    write_table(per_seed, judge.info, args, f"{header} wall time {(time.time() - start) / 60:.0f} min;")
    return 0

if __name__ == "__main__":
    sys.exit(main())
