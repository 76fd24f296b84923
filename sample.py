"""Sample pictures from condition images with a PITI model: the paper's two-stage pipeline.

    python sample.py --cond mask.png                          # the shipped toy models
    python sample.py --ckpt base_mask.pt --sr-ckpt upsample_mask.pt --cond mask.png --palette coco

1. The base model (64x64 released) denoises noise in `--steps` steps (250 in the paper), guided (section 3.4):
   conditional and null condition (all-ones `cond`) in one batched forward, combined by normalized
   classifier-free guidance (eq. 8), plain CF (eq. 7) or not at all.
2. The result is quantized to 8 bits, the form the upsampler saw in training.
3. The upsampler (256x256) denoises noise scaled by 0.997 in 27 steps ("fast27"), given that picture and the
   same condition, without guidance, as the PITI release does.

Every random number comes from one torch.Generator seeded by --seed, on the sampling device. On a GPU the
decoder's forward is replayed as a CUDA graph (docs/sampling.md; bench.py times it).
"""

import argparse
import math
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nanopiti import ModelError, load_model
from nanopiti.checkpoint import folder_problem
from nanopiti.colormap import color_to_labels, in_palette
from nanopiti.cuda_graph import graphed
from nanopiti.data import DataError, load_condition_image
from nanopiti.diffusion import DiffusionError, model_diffusion
from nanopiti.guidance import GUIDANCES, GuidanceError, make_guided_model_fn
from nanopiti.ops import DTYPES
from nanopiti.pictures import condition_picture, grid_row, quantize, to_uint8
from toyworld.world import TOY_CLASSES, TOY_COLORS

DEFAULT_CKPT = Path(__file__).resolve().parent / "checkpoints" / "toy_mask_base.pt"
DEFAULT_SR_CKPT = DEFAULT_CKPT.with_name("toy_mask_upsample.pt")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
DEFAULT_W = 0.3  # the released PITI sampling script uses sample_c = 1.3, i.e. w = 0.3 in the paper's convention

class SampleError(ValueError):
    """Bad command-line input for sampling: the message says what is wrong and what to do."""

# --- models and conditions ---

def load_piti(path, upsampler):
    """Load a PITI base model (upsampler=False) or upsampler, refusing anything else."""
    role, flag = ("upsampler", "--sr-ckpt") if upsampler else ("base model", "--ckpt")
    if Path(path).resolve() in (DEFAULT_CKPT, DEFAULT_SR_CKPT) and not Path(path).is_file():
        raise SampleError(f"the default toy {role} {path} is missing: restore it with `git checkout -- checkpoints` "
                          f"(docs/toy_world.md has the commands that made it), or pass {flag}")
    model = load_model(str(path))
    if model.config["kind"] == "glide":
        raise SampleError(f"{path}: it is a text-to-image GLIDE model, not a PITI model; finetune it first "
                          f"with `python train.py --stage 1 --init {path}`")
    if model.config["super_res"] != upsampler:
        other, where = ("an upsampler", "--sr-ckpt") if model.config["super_res"] else ("a base model", "--ckpt")
        raise SampleError(f"{path}: {flag} needs a PITI {role} but this is {other}; give it as {where}")
    return model

def check_pair(base, sr, task):
    """The task the models were finetuned for, checked against --task and between the two models."""
    model_task = base.config["task"]
    if task is not None and task != model_task:
        raise SampleError(f"--task {task} but the base model was finetuned for the {model_task} task")
    if sr is not None:
        if sr.config["task"] != model_task:
            raise SampleError(f"the base model is a {model_task} model but the upsampler a {sr.config['task']} "
                              "model; give both checkpoints of one task")
        if sr.config["image_size"] <= base.config["image_size"]:
            raise SampleError(f"the upsampler makes {sr.config['image_size']}px images, not more than the base "
                              f"model's {base.config['image_size']}px; are the checkpoints of one release?")
    return model_task

def find_conditions(spec, task):
    """--cond -> condition paths: one image, a folder's images (depth: its *_depth.png), or a list file (one per line,
    relative to its folder). Depth: "normal.png,depth.png" or x_depth.png next to x_normal.png."""
    if task == "depth" and "," in spec:
        return [spec]
    path = Path(spec)
    if path.is_dir():
        pattern = "_depth.png" if task == "depth" else IMAGE_EXTS
        found = sorted(str(p) for p in path.iterdir() if p.name.lower().endswith(pattern))
        if not found:
            raise SampleError(f"--cond {spec}: the folder holds no condition images ({', '.join(IMAGE_EXTS)})")
        return found
    if not path.is_file():
        raise SampleError(f"--cond {spec}: no such file or folder")
    if path.suffix.lower() in IMAGE_EXTS:
        return [spec]
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (UnicodeDecodeError, OSError) as e:
        raise SampleError(f"--cond {spec}: neither an image ({', '.join(IMAGE_EXTS)}) nor a readable "
                          f"list file ({type(e).__name__})") from None
    entries = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not entries:
        raise SampleError(f"--cond {spec}: the list file names no conditions")
    return [",".join(str(path.parent / p) for p in entry.split(",")) for entry in entries]

def check_toy_defaults(ckpt, task, paths, conds):
    """The default models are the toy world's: a mask with other classes gets an error that says so."""
    if task != "mask" or Path(ckpt).resolve() != DEFAULT_CKPT.resolve():
        return
    for path, cond in zip(paths, conds):
        colors = to_uint8(cond[None])[0]
        unknown = in_palette(colors) & ~in_palette(colors, TOY_COLORS)  # toy class i has COCO color i
        if unknown.any():
            classes = [v for v in np.unique(color_to_labels(colors * unknown[..., None])).tolist() if v != 255]
            listed = ", ".join(map(str, classes[:8])) + (", ..." if len(classes) > 8 else "")
            raise SampleError(
                f"{path}: classes {listed} ({unknown.mean():.0%} of the pixels) are unknown to the default models, "
                f"the toy-world models (10 classes: {', '.join(TOY_CLASSES)}); for real masks pass PITI's released "
                "COCO-Stuff models (from the PITI-Synthesis/PITI repository): --ckpt base_mask.pt --sr-ckpt "
                "upsample_mask.pt --palette coco; or train your own from GLIDE's prior (python -m nanopiti.download "
                "glide-base glide-upsample, then train.py)")

def output_files(out, paths, num):
    """Per condition: ([its sample files], its grid file), never one of the condition files: --out x.png for one
    sample, else out/x_0.png... and out/x_grid.png for a/x.png (depth: x_depth.png; a repeated x: x-2_0.png...)."""
    if out.suffix.lower() == ".png":
        if len(paths) > 1 or num > 1:
            raise SampleError(f"--out {out} is one file but {len(paths) * num} samples are asked for; give a folder")
        outputs = [([out], out.with_name(out.stem + "_grid.png"))]
    else:
        outputs, seen = [], {}
        for p in paths:
            stem = Path(p.split(",")[-1]).stem.removesuffix("_depth")
            seen[stem] = seen.get(stem, 0) + 1
            stem = stem if seen[stem] == 1 else f"{stem}-{seen[stem]}"
            outputs.append(([out / f"{stem}_{k}.png" for k in range(num)], out / f"{stem}_grid.png"))
    inputs = {Path(p).resolve() for entry in paths for p in entry.split(",")}
    clash = next((f for names, grid in outputs for f in names + [grid] if f.resolve() in inputs), None)
    if clash is not None:
        raise SampleError(f"--out {out} would overwrite the condition {clash}; give another --out")
    return outputs

# --- the pipeline ---

def _autocast(device, dtype):
    """Autocast in `dtype` on a GPU; the CPU always computes in fp32."""
    return torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda" and dtype != torch.float32)

def encode(model, cond, dtype):
    """The task encoder's output as decoder keyword arguments: once per batch, as it does not depend on x_t or t
    (the PITI release reruns it at every step)."""
    with _autocast(cond.device, dtype):
        pooled, tokens = model.encode(cond)
    return {"pooled": pooled, "tokens": tokens}

def decoder_call(model, dtype, cuda_graph=False):
    """model_call(x_t, t, pooled=, tokens=, low_res=) -> B x 6 x H x W in fp32 for the diffusion:
    the same as model(x_t, t, cond=..., low_res=...) with the condition encoded beforehand."""
    def call(x, t, pooled, tokens, low_res=None):
        with _autocast(x.device, dtype):
            return model.decoder(x, t, pooled, tokens, low_res).float()
    return graphed(call) if cuda_graph else call

def sample_base(model, cond, *, w=DEFAULT_W, guidance="ncf", steps="250", sampler="ddpm",
                generator=None, dtype=torch.float32, cuda_graph=False, progress=True, callback=None):
    """Base-model samples, B x 3 x S x S in [-1, 1], for conditions B x C x H x W; the null condition (all-ones
    `cond`) and the condition run in one batched forward (nanopiti.guidance.make_guided_model_fn)."""
    size = model.config["image_size"]
    null = encode(model, torch.ones_like(cond), dtype) if guidance != "none" else {}
    model_fn = make_guided_model_fn(decoder_call(model, dtype, cuda_graph), encode(model, cond, dtype), null,
                                    w, guidance)
    diffusion = model_diffusion(model.config["noise_schedule"], steps)
    loop = diffusion.ddim_sample_loop if sampler == "ddim" else diffusion.p_sample_loop
    return loop(model_fn, (len(cond), 3, size, size), device=cond.device, generator=generator, progress=progress,
                callback=callback)

def sample_upsampler(model, cond, low_res, *, steps="fast27", temperature=0.997, generator=None,
                     dtype=torch.float32, cuda_graph=False, progress=True, callback=None):
    """Upsampled samples, B x 3 x S x S, from the quantized base samples `low_res`: conditional only, ancestral,
    x_T scaled by `temperature`, as the PITI release samples it."""
    size = model.config["image_size"]
    condition = {**encode(model, cond, dtype), "low_res": low_res}
    model_fn = make_guided_model_fn(decoder_call(model, dtype, cuda_graph), condition, {}, 0.0, "none")
    return model_diffusion(model.config["noise_schedule"], steps).p_sample_loop(
        model_fn, (len(cond), 3, size, size), temperature=temperature, device=cond.device,
        generator=generator, progress=progress, callback=callback)

def generate(base, sr, cond, sr_cond=None, *, w=DEFAULT_W, guidance="ncf", steps="250", sampler="ddpm",
             sr_steps="fast27", sr_temperature=0.997, generator=None, dtype=torch.float32, cuda_graph=False,
             progress=True, callback=None):
    """The two-stage pipeline for one batch (sample.py's and demo.py's): (base samples, upsampled or None).
    `cond`, `sr_cond`: the conditions at each model's size; `callback(stage, done, total)` after every step."""
    def stage(name):
        return None if callback is None else lambda done, total: callback(name, done, total)
    speed = dict(generator=generator, dtype=dtype, cuda_graph=cuda_graph, progress=progress)
    low = sample_base(base, cond, w=w, guidance=guidance, steps=steps, sampler=sampler, callback=stage("base"), **speed)
    if sr is None:
        return low, None
    high = sample_upsampler(sr, sr_cond, quantize(low), steps=sr_steps, temperature=sr_temperature,
                            callback=stage("upsampler"), **speed)
    return low, high

# --- the command line ---

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--cond", help="condition image, folder of images, or list file (one path per line)")
    p.add_argument("--task", choices=["mask", "sketch", "depth"], help="default: the checkpoint's task")
    p.add_argument("--ckpt", default=str(DEFAULT_CKPT), help="PITI base model (released or nanopiti)")
    p.add_argument("--sr-ckpt", default=str(DEFAULT_SR_CKPT), help="PITI upsampler")
    p.add_argument("--base-only", action="store_true", help="skip the upsampler, write base-size images")
    p.add_argument("--num", type=int, default=1, help="samples per condition")
    p.add_argument("--batch-size", type=int, default=8, help="images sampled together")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out", help="output folder, or a .png file for one sample")
    p.add_argument("--w", type=float, default=DEFAULT_W, help="guidance strength (PITI's sample_c = 1 + w)")
    p.add_argument("--guidance", choices=GUIDANCES, default="ncf", help="normalized CF (eq. 8), CF (eq. 7), or none")
    p.add_argument("--steps", default="250", help="base model steps: N, 'a,b,c' sections, ddimN or fast27")
    p.add_argument("--sr-steps", default="fast27", help="upsampler steps, same forms")
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm", help="base model sampler")
    p.add_argument("--sr-temperature", type=float, default=0.997, help="scale of the upsampler's x_T")
    p.add_argument("--palette", choices=["coco", "ade20k"], help="colors for single-channel class-index maps")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cuda:1, cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="autocast dtype on GPU (default bf16; CPU: fp32)")
    p.add_argument("--no-kernels", action="store_true", help="PyTorch ops instead of the Triton kernels")
    p.add_argument("--no-cuda-graph", action="store_true", help="launch the decoder's kernels one by one")
    return p.parse_args(argv)

def resolve_device(name, dtype_name):
    try:
        device = torch.device("cuda" if name == "auto" and torch.cuda.is_available() else
                              "cpu" if name == "auto" else name)
    except RuntimeError:
        raise SampleError(f"--device {name}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SampleError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
    if device.type != "cuda":
        if dtype_name not in (None, "fp32"):
            print(f"note: --dtype {dtype_name} is a GPU option; the CPU samples in fp32", file=sys.stderr)
        return device, torch.float32
    return device, DTYPES[dtype_name or "bf16"]

def check_options(args):
    if not args.cond:
        raise SampleError("--cond is required: a condition image, a folder of them, or a list file")
    if not Path(args.cond).exists() and "," not in args.cond:  # fail before loading big checkpoints
        raise SampleError(f"--cond {args.cond}: no such file or folder")
    for name in ("num", "batch_size"):
        if getattr(args, name) < 1:
            raise SampleError(f"--{name.replace('_', '-')} must be at least 1")
    if not (math.isfinite(args.w) and args.w >= 0):
        raise SampleError(f"--w {args.w}: must be a number >= 0 (0 = the plain conditional model)")
    if not 0 < args.sr_temperature <= 1.5:
        raise SampleError("--sr-temperature must be in (0, 1.5]; PITI uses 0.997")
    for flag, spec in (("--steps", args.steps), ("--sr-steps", args.sr_steps)):
        try:  # a bad spec should fail now, not after loading the models
            model_diffusion("linear", spec)
        except DiffusionError as e:
            raise SampleError(f"{flag}: {e}") from None
    out = Path(args.out)  # the outputs must be writable before any sampling, or the samples are lost
    single_file = out.suffix.lower() == ".png"
    if single_file and out.is_dir():
        raise SampleError(f"--out {out} is a folder; give a new .png file name or the folder without .png")
    if problem := folder_problem(out.parent if single_file else out):
        raise SampleError(f"--out {out}: {problem}; give a writable output {'file' if single_file else 'folder'}")

def run(args, device, dtype):
    base = load_piti(args.ckpt, upsampler=False)
    sr = None if args.base_only else load_piti(args.sr_ckpt, upsampler=True)
    task = check_pair(base, sr, args.task)
    paths = find_conditions(args.cond, task)
    outputs = output_files(Path(args.out), paths, args.num)
    # Every condition is read before any sampling, so a bad file fails fast.
    base_size, sr_size = base.config["cond_size"], (sr or base).config["cond_size"]
    conds = [{s: load_condition_image(p, task, args.palette, size=s) for s in {base_size, sr_size}} for p in paths]
    check_toy_defaults(args.ckpt, task, paths, [c[base_size] for c in conds])
    base.to(device)
    if sr:
        sr.to(device)

    size = (sr or base).config["image_size"]
    items = [i for i in range(len(paths)) for _ in range(args.num)]  # condition i, --num times
    print(f"sampling {len(items)} image(s) from {len(paths)} condition(s): {task} base model "
          f"{base.config['image_size']}px ({args.steps} {args.sampler} steps, {args.guidance} w={args.w})"
          + (f", upsampler {size}px ({args.sr_steps} steps)" if sr else "") + f" on {device}", flush=True)
    generator = torch.Generator(device).manual_seed(args.seed)
    speed = dict(dtype=dtype, cuda_graph=device.type == "cuda" and not args.no_cuda_graph)
    samples = [[] for _ in paths]
    start = time.time()
    with torch.inference_mode():
        for b in range(0, len(items), args.batch_size):
            batch = items[b:b + args.batch_size]
            cond = torch.stack([conds[i][base_size] for i in batch]).to(device)
            sr_cond = torch.stack([conds[i][sr_size] for i in batch]).to(device) if sr else None
            low, high = generate(base, sr, cond, sr_cond, w=args.w, guidance=args.guidance,
                                 steps=args.steps, sampler=args.sampler, sr_steps=args.sr_steps,
                                 sr_temperature=args.sr_temperature, generator=generator, **speed)
            for i, picture in zip(batch, to_uint8(low if high is None else high)):
                samples[i].append(picture)
    elapsed = time.time() - start

    folder = outputs[0][1].parent  # --out, or the folder of --out x.png
    folder.mkdir(parents=True, exist_ok=True)
    for (names, grid), pictures, cond in zip(outputs, samples, conds):
        for name, picture in zip(names, pictures):
            Image.fromarray(picture).save(name)
        Image.fromarray(grid_row([condition_picture(cond[base_size], size)] + pictures)).save(grid)
    print(f"wrote {len(items)} sample(s) and {len(paths)} grid(s) to {folder} "
          f"({elapsed:.1f} s, {elapsed / len(items):.2f} s per image)")

def _warn_one_line(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)

def main(argv=None):
    args = parse_args(argv)
    if args.no_kernels:
        os.environ["NANOPITI_KERNELS"] = "0"  # read by nanopiti.ops at every call
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _warn_one_line  # e.g. off-palette colors in a label map
            check_options(args)
            device, dtype = resolve_device(args.device, args.dtype)
            run(args, device, dtype)
    except (SampleError, ModelError, DataError, DiffusionError, GuidanceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0

if __name__ == "__main__":
    sys.exit(main())
