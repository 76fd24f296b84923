"""Train nanopiti: one loop for every stage of the paper's method (section 3), on a CPU, a GPU or many GPUs.

    python train.py --stage 0 --data toy --model base        # text-to-image prior, from scratch
    python train.py --stage 1 --data ade20k --init checkpoints/base.pt   # new task encoder, frozen decoder
    python train.py --stage 2 --data ade20k --init runs/stage1-mask/latest.pt   # joint finetuning
    python train.py --stage up --data ade20k --init checkpoints/upsample.pt --vgg-weights checkpoints/vgg19-dcbccd4d.pth
    torchrun --nproc_per_node 8 train.py --stage 1 ...         # the same on 8 GPUs

Stage up adds the perceptual (eq. 4) and adversarial (eq. 5) losses. Every process draws the global batch's
randomness from one shared generator and keeps its slice: N processes compute what one would, and --resume
continues bit for bit. docs/training.md has the details, the recipes and what a run writes.
"""

import argparse
import contextlib
import copy
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from nanopiti import ModelError, build_model
from nanopiti.checkpoint import (CheckpointError, folder_problem, load_checkpoint, open_log, rng_state, run_lock,
                                 save_checkpoint, set_rng_state)
from nanopiti.data import DataError, EpochIndexed, PairedDataset, StepBatches, SyntheticPairs, collate_skip_none
from nanopiti.diffusion import DiffusionError, model_diffusion
from nanopiti.disc import GAN_LOSSES, PatchDiscriminator, critic_step, generator_loss
from nanopiti.guidance import condition_use, make_guided_model_fn
from nanopiti.conditions import TASK_CHANNELS
from nanopiti.model import UNET_KEYS, base_config, infer_config, load_model, toy_config
from nanopiti.ops import DTYPES
from nanopiti.perceptual import PerceptualError, VGGPerceptual
from nanopiti.pictures import save_grid
from nanopiti.timesteps import LossAwareTimesteps, high_noise_timesteps
from toyworld.data import ToyDataset
from toyworld.world import TOY_SCENES, ToyTokenizer, ToyWorldError

DATA_TASK = {"ade20k": "mask", "coco": "mask", "coco-sketch": "sketch", "diode": "depth"}
DEFAULT_LR = {"0": 1e-4, "1": 3.5e-5, "2": 3e-5, "up": 1e-5}  # paper (stages 1, 2), release (up)
PROBE_PAIRS = 16  # held-out pairs of the condition measure (its previews: the first --num-samples)

class TrainError(ValueError):
    """A training run that cannot start or go on; the message says why and what to do."""

def get_args(argv=None):
    p = argparse.ArgumentParser(description="Train nanopiti (see the module docstring).")
    p.add_argument("--stage", required=True, choices=["0", "1", "2", "up"])
    p.add_argument("--model", choices=["base", "upsample"], default="base", help="stage 0: which prior")
    p.add_argument("--data", choices=["toy", "ade20k", "coco", "coco-sketch", "diode", "synthetic"], default="toy")
    p.add_argument("--data-root", help="prepared dataset folder (default data/<name>)")
    p.add_argument("--train-list", help="list file of training pairs (default <data-root>/train_<task>.txt)")
    p.add_argument("--val-list", help="list file for the sample grids (default <data-root>/val_<task>.txt)")
    p.add_argument("--limit", type=int, help="use only the first N training pairs")
    p.add_argument("--task", choices=sorted(TASK_CHANNELS), help="condition type (default: the dataset's; toy: mask)")
    p.add_argument("--model-size", choices=["full", "toy"], help="default: toy for --data toy, else full")
    p.add_argument("--init", help="stage 1: GLIDE base.pt or a stage-0 checkpoint; 2: a stage-1 checkpoint (or a text "
                   "prior, or 'scratch'); up: GLIDE upsample.pt or a stage-0 upsampler")
    p.add_argument("--resume", help="a checkpoint of this run to continue, or 'auto' (latest.pt in --out, if any)")
    p.add_argument("--out", help="output folder (default runs/stage<stage>-<task or model>)")
    p.add_argument("--max-steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, help="global batch over all processes (default 128 full, 8 toy)")
    p.add_argument("--micro-batch", type=int, help="per-process micro-batch for gradient accumulation")
    p.add_argument("--lr", type=float, help="AdamW learning rate (default: 1e-4, 3.5e-5, 3e-5, 1e-5 for 0, 1, 2, up)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--ema", type=float, default=0.9999, help="EMA decay (warmed up as min(ema, (1+n)/(10+n)))")
    p.add_argument("--uncond-p", type=float, help="null-condition probability (default 0.2; 0 for stage up)")
    p.add_argument("--timesteps", choices=["uniform", "loss-aware", "high-noise"], default="uniform",
                   help="high-noise: p(t) proportional to t, the toy recipe")
    p.add_argument("--grad-clip", type=float, default=0.0, help="max gradient norm (0: no clipping)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="autocast dtype (GPU only)")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute UNet blocks in the backward")
    p.add_argument("--no-kernels", action="store_true", help="use the PyTorch ops instead of the Triton kernels")
    p.add_argument("--compile", action="store_true", help="torch.compile the forward (toy CPU: 1.2x after ~2 min)")
    p.add_argument("--perc-weight", type=float, default=0.004, help="stage up: perceptual loss weight (eq. 4)")
    p.add_argument("--adv-weight", type=float, default=0.01, help="stage up: adversarial loss weight (eq. 5)")
    p.add_argument("--gan-loss", choices=GAN_LOSSES, default="wgan-gp")
    p.add_argument("--disc-lr", type=float, default=1e-5, help="discriminator Adam learning rate")
    p.add_argument("--vgg-weights", help="torchvision's vgg19-dcbccd4d.pth for the perceptual loss")
    p.add_argument("--random-vgg", action="store_true", help="random VGG features (offline toy runs only)")
    p.add_argument("--save-every", type=int, default=1000, help="latest.pt every N steps and at the end (0: never)")
    p.add_argument("--keep-every", type=int, default=0, help="also keep step_NNNNNN.pt every N steps")
    p.add_argument("--sample-every", type=int, default=1000)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--sample-steps", default="50", help="respacing of the preview sampler")
    p.add_argument("--sample-w", type=float, default=0.5, help="NCF guidance strength of the previews")
    p.add_argument("--toy-scenes", type=int, default=TOY_SCENES)
    p.add_argument("--copy-task", action="store_true", help="toy masks: each image is its own label map")
    p.add_argument("--workers", type=int, default=2, help="data loader processes")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.task = args.task or DATA_TASK.get(args.data, "mask")
    args.model_size = args.model_size or ("toy" if args.data == "toy" else "full")
    args.batch_size = args.batch_size if args.batch_size is not None else (8 if args.model_size == "toy" else 128)
    args.lr = args.lr if args.lr is not None else DEFAULT_LR[args.stage]
    args.uncond_p = args.uncond_p if args.uncond_p is not None else (0.0 if args.stage == "up" else 0.2)
    args.out = args.out or os.path.join("runs", f"stage{args.stage}-{args.model if args.stage == '0' else args.task}")
    return args

def check_args(args):
    """Every option, checked before any work starts: one line naming the option and what to do."""
    def need(ok, name, what):
        if not ok:
            raise TrainError(f"--{name.replace('_', '-')} {getattr(args, name)}: {what}")
    for name in ("max_steps", "batch_size", "log_every", "num_samples", "toy_scenes", "micro_batch", "limit"):
        need(getattr(args, name) is None or getattr(args, name) >= 1, name, "must be at least 1")  # None: left out
    for name in ("workers", "save_every", "keep_every", "sample_every", "weight_decay", "grad_clip", "perc_weight",
                 "adv_weight", "sample_w"):
        need(0 <= getattr(args, name) < math.inf, name, "must be 0 or more")  # NaN and inf fail too
    for name in ("lr", "disc_lr"):
        need(0 < getattr(args, name) < math.inf, name, "a learning rate must be a number > 0")
    need(0 <= args.ema < 1, "ema", "the EMA decay must be in [0, 1) (default 0.9999)")
    need(0 <= args.uncond_p <= 1, "uncond_p", "a probability must be in [0, 1]")
    if args.copy_task and (args.data != "toy" or args.task != "mask" or args.stage in ("0", "up")):
        raise TrainError("--copy-task is a toy-world mask task: use it with --data toy --task mask and stage 1 or 2")
    need(args.dtype == "fp32" or torch.cuda.is_available(), "dtype", "autocasts on a GPU; on the CPU use --dtype fp32")
    if args.stage == "0" and args.data not in ("toy", "synthetic"):
        raise TrainError("stage 0 needs toy captions (--data toy) or --data synthetic; for real data start stage 1 "
                         "from GLIDE's base.pt (python -m nanopiti.download glide-base)")
    if args.stage == "up" and args.perc_weight > 0 and not (args.vgg_weights or args.random_vgg):
        raise TrainError("stage up's perceptual loss needs --vgg-weights checkpoints/vgg19-dcbccd4d.pth (python -m "
                         "nanopiti.download vgg19), or --random-vgg for offline toy runs, or --perc-weight 0")
    path = list_file(args, "train")  # the training pairs must be there before any weights load
    if path is not None and not os.path.isfile(path):
        where = " --root" if args.data == "toy" else " --root <where the dataset is> --out"
        raise TrainError(f"no {args.data} training list at {path}; prepare it with: "
                         f"python prepare_data.py --data {args.data}{where} {os.path.dirname(path) or '.'}")
    if args.sample_every > 0:  # the previews' sampler, parsed now rather than at the first preview
        try:
            model_diffusion("linear", args.sample_steps)
        except DiffusionError as e:
            raise TrainError(f"--sample-steps: {e}") from None
    if problem := folder_problem(args.out):
        raise TrainError(f"--out {args.out}: {problem}; give a folder this run can write to")
    found = [n for n in ("latest.pt", "log.jsonl", "args.json") if os.path.exists(os.path.join(args.out, n))]
    if found and not args.resume:  # a fresh run never wipes another run's log and checkpoint
        raise TrainError(f"--out {args.out} holds another run ({', '.join(found)}): --resume auto, or a new --out")

# --- the model each stage starts from (paper section 3.3) ---

INIT_HINT = {"1": "stage 1 expects a text prior: GLIDE's base.pt (python -m nanopiti.download glide-base) or a "
                 "stage-0 checkpoint (python train.py --stage 0)",
             "2": "stage 2 expects a stage-1 checkpoint (python train.py --stage 1), a text prior, or 'scratch'",
             "up": "stage up expects GLIDE's upsample.pt (python -m nanopiti.download glide-upsample) or a stage-0 "
                   "upsampler (python train.py --stage 0 --model upsample)"}
TEXT_KEYS = ("token_embedding.", "positional_embedding", "padding_embedding", "transformer.", "final_ln.")  # not UNet

def template(args, kind, super_res):
    """--model-size's hyper-parameters for a model kind (those the weights cannot tell)."""
    if args.model_size == "toy":
        return toy_config(kind, super_res, args.task, n_vocab=len(ToyTokenizer.VOCAB))
    return base_config(kind, super_res, args.task)

def read_init(args):
    """--init as a model; a released state dict gets --model-size's head counts and image size (not in its weights)."""
    try:
        obj = torch.load(args.init, map_location="cpu", weights_only=True)
    except Exception as e:
        what = "no such file" if isinstance(e, FileNotFoundError) else f"not a PyTorch checkpoint ({type(e).__name__})"
        raise TrainError(f"--init {args.init}: {what}; {INIT_HINT[args.stage]}") from None
    try:
        if not (isinstance(obj, dict) and "config" in obj and "model" in obj):  # a released state dict
            inferred = infer_config(obj)
            obj = {"state_dict": obj, "config": template(args, inferred["kind"], inferred["super_res"])}
        return load_model(obj)
    except (ModelError, AttributeError, TypeError, KeyError) as e:  # anything but a GLIDE/PITI state dict
        raise TrainError(f"--init {args.init}: {e}; {INIT_HINT[args.stage]}") from None

def initial_model(args):
    """The model a fresh run starts from: stage 0 a new text prior; stage 1 (2 or up from a prior) the surgery of
    section 3.3; stage 2 the stage-1 model ('scratch': untrained, the paper's from-scratch baseline)."""
    if args.stage == "0":
        if args.init:
            raise TrainError("stage 0 trains a text prior from scratch and takes no --init")
        return build_model(template(args, "glide", args.model == "upsample"))
    if not args.init:
        raise TrainError(f"stage {args.stage} needs --init: {INIT_HINT[args.stage]}")
    if args.stage == "2" and args.init == "scratch":
        return build_model(template(args, "piti", False))
    init = read_init(args)
    source = init.config
    if source["super_res"] != (args.stage == "up"):
        raise TrainError(f"--init {args.init} is {'an upsampler' if source['super_res'] else 'a base model'}; "
                         f"{INIT_HINT[args.stage]}")
    if source["kind"] == "piti":
        if args.stage == "1":
            raise TrainError(f"--init {args.init} is already a PITI model: continue it with --stage 2")
        if source["task"] != args.task:
            raise TrainError(f"--init {args.init} is a {source['task']} model, this run's task is {args.task}")
        return init
    # The surgery: the decoder is the prior's UNet, `transformer_proj` included; a new task encoder of the same
    # width replaces the text encoder.
    config = template(args, "piti", source["super_res"])
    config.update({k: source[k] for k in UNET_KEYS + ("image_size", "noise_schedule") if k in source})
    if config["encoder_width"] != source["xf_width"]:
        size = "full" if source["xf_width"] == 512 else "toy"
        raise TrainError(f"--init {args.init} has text width {source['xf_width']}, a {args.model_size}-size encoder "
                         f"{config['encoder_width']} (encoder_kv needs them equal): use --model-size {size}")
    model = build_model(config)
    model.decoder.load_state_dict({k: v for k, v in init.state_dict().items() if not k.startswith(TEXT_KEYS)})
    return model

# --- the data ---

def list_file(args, split):
    """The list file of a split ("train" or "val"), or None for data made on the fly."""
    explicit = args.train_list if split == "train" else args.val_list
    if args.data == "synthetic" or (args.data == "toy" and not explicit):
        return None
    return explicit or os.path.join(args.data_root or os.path.join("data", args.data), f"{split}_{args.task}.txt")

def make_dataset(args, config, split):
    """The training ("train") or preview ("val") dataset for this run."""
    low_res = 64 if config["image_size"] == 256 else config["image_size"] // 2  # GLIDE 64 -> 256, toy 32 -> 64
    if args.data == "synthetic":
        return SyntheticPairs(config, low_res)
    kw = dict(resolution=config["image_size"], upsampler=config["super_res"], low_res=low_res, seed=args.seed,
              cond_size=config.get("cond_size", 128 if args.model_size == "toy" else 256))
    path = list_file(args, split)
    if path is None:  # the toy world, rendered on the fly; previews come from held-out scenes
        first, count = (0, args.toy_scenes) if split == "train" else (args.toy_scenes, max(args.num_samples, PROBE_PAIRS))
        return ToyDataset(count, args.task, first_scene=first, copy=args.copy_task, **kw)
    if not os.path.isfile(path):  # only "val" gets here (check_args): preview the first training pairs
        return make_dataset(args, config, "train")
    return PairedDataset(path, args.task, random_crop=split == "train", random_flip=split == "train", **kw)

def model_kwargs(model, batch, device, drop=None):
    """(kwargs, null kwargs) of a batch: PITI's cond (null: all ones, as released) or GLIDE's caption tokens
    (null: all padding). `drop` (B,) bool swaps in the null condition: classifier-free dropout."""
    config = model.config
    if config["kind"] == "piti":
        kwargs = {"cond": batch["cond"].to(device)}
    elif "text" in batch:
        kwargs = {"text": batch["text"].to(device), "text_mask": batch["text_mask"].to(device)}
    else:
        text, mask = zip(*[ToyTokenizer().encode(c, config["text_ctx"]) for c in batch["caption"]])
        kwargs = {"text": torch.stack(text).to(device), "text_mask": torch.stack(mask).to(device)}
    null = {k: (torch.ones_like if k == "cond" else torch.zeros_like)(v) for k, v in kwargs.items()}
    if drop is not None:
        kwargs = {k: torch.where(drop.view(-1, *(1,) * (v.dim() - 1)), null[k], v) for k, v in kwargs.items()}
    if config["super_res"]:
        kwargs["low_res"] = batch["low_res"].to(device)
    return kwargs, null

# --- distributed setup and previews ---

def setup_distributed():
    """(rank, world size, device). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; plain python runs alone."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local)
    return dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local}" if cuda else "cpu")

@torch.no_grad()
def save_preview(path, ema, batch, args, device, autocast):
    """A grid, one row per sample: [condition |] [low-res |] EMA sample | ground truth."""
    config = ema.config
    diffusion = model_diffusion(config["noise_schedule"], args.sample_steps)
    guidance = "ncf" if args.uncond_p > 0 and args.sample_w > 0 else "none"
    model_fn = make_guided_model_fn(ema, *model_kwargs(ema, batch, device), args.sample_w, guidance)
    n, r = batch["image"].shape[0], config["image_size"]
    generator = torch.Generator(device=device).manual_seed(args.seed)  # the same noise in every preview
    loop = diffusion.ddim_sample_loop if args.sample_steps.startswith("ddim") else diffusion.p_sample_loop
    with autocast:
        out = loop(model_fn, (n, 3, r, r), temperature=0.997 if config["super_res"] else 1.0,
                   device=device, generator=generator, progress=False)
    columns = ([batch["cond"]] if config["kind"] == "piti" else []) + ([batch["low_res"]] if config["super_res"] else [])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_grid(columns + [out, batch["image"]], path, size=max(r, 64))
    if config["kind"] == "glide" and "caption" in batch:  # the text prior's condition, row by row
        with open(path[:-len(".png")] + ".txt", "w") as f:
            f.writelines(c + "\n" for c in batch["caption"])

# --- training ---

def train(args):
    if args.no_kernels:
        os.environ["NANOPITI_KERNELS"] = "0"
    rank, world, device = setup_distributed()
    master, cuda = rank == 0, device.type == "cuda"
    if args.batch_size % world:
        raise TrainError(f"--batch-size {args.batch_size} does not split over {world} processes")
    local_batch = args.batch_size // world
    micro = min(args.micro_batch or local_batch, local_batch)

    # The model: from a checkpoint of this run, or what the stage starts from.
    latest = os.path.join(args.out, "latest.pt")
    resume = (latest if os.path.isfile(latest) else None) if args.resume == "auto" else args.resume
    ckpt = load_checkpoint(resume) if resume else None
    start = int(ckpt["step"]) if ckpt else 0
    torch.manual_seed(args.seed)
    if ckpt is not None:
        if missing := [k for k in ("ema", "optimizer", "rng") if k not in ckpt]:
            raise TrainError(f"--resume {resume}: it holds weights only (an exported model, no {', '.join(missing)}); "
                             f"start a new run from it with --init {resume}")
        what = f"{ckpt['config']['kind']} {'upsampler' if ckpt['config']['super_res'] else 'base'}"
        if (str(ckpt["stage"]), ckpt.get("task")) != (args.stage, args.task) or (
                args.stage == "0" and ckpt["config"]["super_res"] != (args.model == "upsample")):
            raise TrainError(f"{resume} is a stage {ckpt['stage']} checkpoint ({what}, task {ckpt.get('task')}); "
                             f"this run is stage {args.stage}, task {args.task}: resume with those, or --init from it")
        if start > args.max_steps:
            raise TrainError(f"--resume {resume} is at step {start}, past --max-steps {args.max_steps}: raise that")
        if start == args.max_steps:  # a finished run: rerunning its command changes nothing
            print(f"{resume} is at step {start} = --max-steps: nothing to train (raise --max-steps to continue)")
            return
        model = build_model(ckpt["config"])
        model.load_state_dict(ckpt["model"])
    else:
        model = initial_model(args)
    config = model.config
    (model if config["kind"] == "glide" else model.decoder).grad_checkpointing = args.grad_checkpointing
    if args.stage == "1":
        model.decoder.requires_grad_(False)  # stage 1: only the task encoder learns
    model.to(device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    ema_params = [e for e, p in zip(ema.parameters(), model.parameters()) if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=args.dtype == "fp16")
    autocast = torch.autocast(device.type, dtype=DTYPES[args.dtype], enabled=args.dtype != "fp32")
    net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None,
                                                    broadcast_buffers=False) if world > 1 else model
    net = torch.compile(net) if args.compile else net  # the checkpoints still save `model`, uncompiled

    diffusion = model_diffusion(config["noise_schedule"])
    loss_aware = LossAwareTimesteps(diffusion.num_timesteps) if args.timesteps == "loss-aware" else None
    generator = torch.Generator(device=device).manual_seed(args.seed)  # the same on every process

    # The upsampler's extra losses: perceptual (frozen VGG) and adversarial (its own optimizer).
    vgg = disc = disc_opt = None
    if args.stage == "up" and args.perc_weight > 0:  # --random-vgg: VGGPerceptual warns
        vgg = VGGPerceptual(args.vgg_weights, allow_random=args.random_vgg).to(device)
    if args.stage == "up" and args.adv_weight > 0:
        disc = PatchDiscriminator().to(device).requires_grad_(False)  # only the critic step turns its gradients on
        disc_opt = torch.optim.Adam(disc.parameters(), lr=args.disc_lr)

    # Everything a checkpoint holds besides the model (see nanopiti/checkpoint.py), by its key.
    stateful = {"ema": ema, "optimizer": opt, "disc": disc, "disc_optimizer": disc_opt, "timesteps": loss_aware,
                "scaler": scaler if scaler.is_enabled() else None}
    stateful = {k: v for k, v in stateful.items() if v is not None}
    if ckpt is not None:
        for k, v in stateful.items():
            if k in ckpt:  # "ema" and "optimizer" always are (checked above)
                v.load_state_dict(ckpt[k])
        set_rng_state(generator, ckpt["rng"])
        opt.param_groups[0]["lr"] = args.lr  # this command's rates, not the saved ones
        if disc_opt is not None:
            disc_opt.param_groups[0]["lr"] = args.disc_lr

    def checkpoint_state(step):
        return {"config": config, "model": model.state_dict(), "step": step, "stage": args.stage, "task": args.task,
                "args": vars(args), "rng": rng_state(generator), **{k: v.state_dict() for k, v in stateful.items()}}

    # Data: this process's slice of every global batch, from the resumed step on.
    dataset = make_dataset(args, config, "train")
    n_pairs = min(args.limit or len(dataset), len(dataset))  # --limit: the first N pairs only
    sampler = StepBatches(n_pairs, args.batch_size, rank, world, args.seed, start, args.max_steps)
    batches = torch.utils.data.DataLoader(EpochIndexed(dataset), batch_sampler=sampler, num_workers=args.workers,
                                          collate_fn=collate_skip_none, pin_memory=cuda)
    if master:  # run_lock (main) made args.out
        if args.sample_every > 0:
            val = make_dataset(args, config, "val")
            probe = collate_skip_none([val[i] for i in range(min(PROBE_PAIRS, len(val)))])
        with open(os.path.join(args.out, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=1)
        log = open_log(os.path.join(args.out, "log.jsonl"), start)
        print(f"stage {args.stage} ({config['kind']}, task {args.task}), {sum(p.numel() for p in params) / 1e6:.2f}M "
              f"trained parameters, {n_pairs} pairs, global batch {args.batch_size} = {world} x {local_batch} "
              f"(micro-batch {micro}), steps {start}..{args.max_steps}, on {device} in {args.dtype}")
    bar = tqdm(total=args.max_steps, initial=start, disable=not master, desc=f"stage {args.stage}")
    timed_steps, timed_seconds = 0, 0.0
    for step, batch in zip(range(start, args.max_steps), batches):
        t0 = time.perf_counter()
        if batch is None or batch["image"].shape[0] != local_batch:
            raise TrainError("too many unreadable pairs in a row to fill a batch; see the warnings above")
        # Randomness for the whole global batch, drawn identically on every process, which keeps its slice.
        b, r = args.batch_size, config["image_size"]
        if loss_aware is not None:
            t_all, w_all = loss_aware.sample(b, device, generator)
        else:
            t_all = (diffusion.sample_timesteps(b, device, generator) if args.timesteps == "uniform"
                     else high_noise_timesteps(b, diffusion.num_timesteps, device, generator))
            w_all = torch.ones(b, device=device)
        noise_all = torch.randn((b, 3, r, r), generator=generator, device=device)
        drop_all = torch.rand(b, generator=generator, device=device) < args.uncond_p
        mix_all = torch.rand(b, generator=generator, device=device)  # WGAN-GP interpolation
        mine = slice(rank * local_batch, (rank + 1) * local_batch)
        t, weights, noise, drop, mix = t_all[mine], w_all[mine], noise_all[mine], drop_all[mine], mix_all[mine]
        x0 = batch["image"].to(device)
        kwargs, _ = model_kwargs(model, batch, device, drop)

        parts, fakes = [], []  # each micro-batch's losses per sample, and its predicted x0 for the critic (detached)
        chunks = [slice(i, min(i + micro, local_batch)) for i in range(0, local_batch, micro)]
        for i, sl in enumerate(chunks):
            kw = {k: v[sl] for k, v in kwargs.items()}
            # DDP all-reduces gradients in the backward; only the last micro-batch needs it.
            sync = contextlib.nullcontext() if (world == 1 or i == len(chunks) - 1) else net.no_sync()
            with sync:
                with autocast:
                    losses = diffusion.training_losses(lambda x, s: net(x, s, **kw), x0[sl], t[sl], noise[sl])
                    losses["diffusion"] = losses["loss"]
                    if vgg is not None:
                        losses["perceptual"] = vgg(losses["pred_xstart"], x0[sl]).float()
                        losses["loss"] = losses["loss"] + args.perc_weight * losses["perceptual"]
                    if disc is not None:
                        with torch.autocast(device.type, enabled=False):  # the critic runs in fp32
                            losses["adv"] = generator_loss(disc, losses["pred_xstart"].float(), args.gan_loss)
                        losses["loss"] = losses["loss"] + args.adv_weight * losses["adv"]
                scaler.scale((losses["loss"] * weights[sl]).sum() / local_batch).backward()
            parts.append({k: v.detach().float() for k, v in losses.items() if k not in ("x_t", "pred_xstart")})
            if disc is not None:
                fakes.append(losses["pred_xstart"].detach().float())
        terms = {k: sum(part[k].sum() for part in parts) for k in parts[0]}

        # The optimizer step, unless some gradient is inf/NaN (then skip it and say so).
        scaler.unscale_(opt)  # a no-op unless fp16
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip if args.grad_clip > 0 else float("inf"))
        finite = bool(torch.isfinite(grad_norm))
        if finite:
            scaler.step(opt)
            rate = min(args.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for e, p in zip(ema_params, params):
                    e.lerp_(p, 1 - rate)
        elif master:
            tqdm.write(f"step {step + 1}: non-finite gradient norm {grad_norm.item()}, step skipped", file=sys.stderr)
        scaler.update()
        opt.zero_grad(set_to_none=True)

        # The discriminator's step, on this step's (detached) predicted x0 against real images.
        if disc is not None:
            terms["disc"] = critic_step(disc, disc_opt, [x0[sl].float() for sl in chunks], fakes, args.gan_loss,
                                        [mix[sl] for sl in chunks], local_batch)

        # Loss-aware sampling learns from the losses of the whole global batch (of finite steps only).
        if loss_aware is not None and finite:
            mine_losses = torch.cat([part["loss"] for part in parts])
            if world > 1:
                gathered = [torch.empty_like(mine_losses) for _ in range(world)]
                dist.all_gather(gathered, mine_losses)
                mine_losses = torch.cat(gathered)
            loss_aware.update(t_all.cpu(), mine_losses.cpu())

        # Log the global batch's mean of every term.
        keys = sorted(terms)
        values = torch.stack([terms[k].float() for k in keys])
        if world > 1:
            dist.all_reduce(values)
        record = {k: v / args.batch_size for k, v in zip(keys, values.tolist())}
        record.update(step=step + 1, grad_norm=grad_norm.item(), lr=args.lr, skipped=not finite)
        if step > start:  # the first step pays for warm-up (allocations, kernel compilation)
            timed_steps, timed_seconds = timed_steps + 1, timed_seconds + time.perf_counter() - t0
        if master:
            if args.sample_every > 0 and (step + 1) % args.sample_every == 0:
                save_preview(os.path.join(args.out, "samples", f"step_{step + 1:06d}.png"), ema,
                             {k: v[:args.num_samples] for k, v in probe.items()}, args, device, autocast)
                if probe["image"].shape[0] >= 2:  # the condition measure swaps the conditions of two pairs
                    with autocast:  # wrong / right condition noise error at t = 300, 500, 700 (1: ignored)
                        use = condition_use(ema, probe["image"].to(device), *model_kwargs(ema, probe, device))
                    measures = [k for k in ("ratio", "layout") if k in next(iter(use.values()))]
                    record["condition"] = {s: {k: round(v[k], 4) for k in measures} for s, v in use.items()}
                    line = {k: "/".join(f"{v[k]:.3f}" for v in use.values()) for k in measures}
                    tqdm.write(f"step {step + 1}: noise error at t={'/'.join(map(str, use))}, wrong/right condition "
                               f"{line['ratio']}" + (f", mirrored/right {line['layout']}" if "layout" in line else ""))
            log.write(json.dumps(record) + "\n")
            bar.update(1)
            if (step + 1) % args.log_every == 0 or step + 1 == args.max_steps:
                log.flush()
                bar.set_postfix(loss=f"{record['loss']:.4f}")
            if args.save_every > 0 and ((step + 1) % args.save_every == 0 or step + 1 == args.max_steps):
                log.flush()  # the log lines of the steps this checkpoint covers reach the disk first
                os.fsync(log.fileno())
                save_checkpoint(checkpoint_state(step + 1), latest)
                if args.keep_every and (step + 1) % args.keep_every == 0:
                    save_checkpoint(checkpoint_state(step + 1), os.path.join(args.out, f"step_{step + 1:06d}.pt"))
    bar.close()
    if master:
        log.close()
        if timed_seconds > 0:
            print(f"{timed_steps * args.batch_size / timed_seconds:.2f} samples/s (global, steps after the first)")
        if cuda:
            print(f"peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()

def main(argv=None):
    args = get_args(argv)
    try:
        check_args(args)
        master = int(os.environ.get("RANK", "0")) == 0  # torchrun's process 0 writes --out and holds its lock
        with run_lock(args.out) if master else contextlib.nullcontext():
            train(args)
    except (TrainError, CheckpointError, DataError, DiffusionError, ModelError, PerceptualError, ToyWorldError) as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # e.g. a full disk while writing a checkpoint (the previous one stays intact)
        sys.exit(f"error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}")

if __name__ == "__main__":
    main()
