"""What each training stage starts from (paper section 3.3).

Stage 0 builds a text-to-image prior from scratch. Stage 1 turns a prior into a PITI model: the
decoder is the prior's UNet, `transformer_proj` included (the pooled condition token keeps its
path into the timestep embedding), the text encoder is dropped and a new task encoder takes its
place. Stage 2 continues a stage-1 model (a prior directly: the paper's one-stage ablation;
'scratch': its from-scratch baseline). The upsampler stage starts from a text upsampler the same
way. `initial_model(args)` takes train.py's arguments: stage, init, model_size, task, model.
"""

import torch

from .model import ModelError, UNET_KEYS, base_config, build_model, infer_config, load_model, toy_config
from toyworld.world import ToyTokenizer

# The text encoder's parameters in a GLIDE checkpoint: everything else is the UNet.
TEXT_KEYS = ("token_embedding.", "positional_embedding", "padding_embedding", "transformer.", "final_ln.")


class TrainError(ValueError):
    """A training run that cannot start or go on; the message says why and what to do."""


def template(args, kind, super_res):
    """The hyper-parameters of --model-size for a model kind (those the weights cannot tell)."""
    if args.model_size == "toy":
        return toy_config(kind, super_res, args.task, n_vocab=ToyTokenizer().vocab_size)
    return base_config(kind, super_res, args.task)


def read_init(args):
    """--init as a model: a nanopiti checkpoint keeps its own config; a released state dict gets
    the head counts and image size of --model-size, which its weights do not record."""
    try:
        obj = torch.load(args.init, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TrainError(f"--init {args.init}: no such file; {INIT_HINT[args.stage]}") from None
    except Exception as e:
        raise TrainError(f"--init {args.init}: not a PyTorch checkpoint ({type(e).__name__}); {INIT_HINT[args.stage]}") from None
    try:
        if isinstance(obj, dict) and "config" in obj and "model" in obj:
            return load_model(obj)
        inferred = infer_config(obj)
        hints = template(args, inferred["kind"], inferred["super_res"])
        return load_model({"state_dict": obj, "config": hints})
    except (ModelError, AttributeError, TypeError, KeyError) as e:  # anything but a GLIDE/PITI state dict
        raise TrainError(f"--init {args.init}: {e}; {INIT_HINT[args.stage]}") from None


INIT_HINT = {
    "1": ("stage 1 expects a text prior: GLIDE's base.pt (python -m nanopiti.download glide-base) or a stage-0 "
          "checkpoint (python train.py --stage 0)"),
    "2": "stage 2 expects a stage-1 checkpoint (python train.py --stage 1), a text prior, or 'scratch'",
    "up": ("stage up expects GLIDE's upsample.pt (python -m nanopiti.download glide-upsample) or a stage-0 "
           "upsampler (python train.py --stage 0 --model upsample)"),
}


def piti_from_prior(prior, args):
    """A PITI model whose decoder is the text prior's UNet and whose task encoder is new."""
    config = template(args, "piti", prior.config["super_res"])
    config.update({k: prior.config[k] for k in UNET_KEYS + ("image_size", "noise_schedule")})
    if config["encoder_width"] != prior.config["xf_width"]:
        raise TrainError(f"--init {args.init} has text width {prior.config['xf_width']} but a {args.model_size}-size "
                         f"PITI encoder is {config['encoder_width']} wide; the decoder's encoder_kv and transformer_proj "
                         f"need equal widths: pass --model-size {'full' if prior.config['xf_width'] == 512 else 'toy'}")
    model = build_model(config)
    unet = {k: v for k, v in prior.state_dict().items() if not k.startswith(TEXT_KEYS)}
    model.decoder.load_state_dict(unet, strict=True)
    return model


def initial_model(args):
    """The model a fresh run starts from, by stage."""
    if args.stage == "0":
        if args.init:
            raise TrainError("stage 0 trains a text prior from scratch and takes no --init")
        return build_model(template(args, "glide", args.model == "upsample"))
    if not args.init:
        raise TrainError(f"stage {args.stage} needs --init: {INIT_HINT[args.stage]}")
    if args.stage == "2" and args.init == "scratch":
        return build_model(template(args, "piti", False))
    init = read_init(args)
    super_res = init.config["super_res"]
    if super_res != (args.stage == "up"):
        have = "an upsampler" if super_res else "a base model"
        raise TrainError(f"--init {args.init} is {have}; {INIT_HINT[args.stage]}")
    if init.config["kind"] == "glide":
        return piti_from_prior(init, args)
    if args.stage == "1":
        raise TrainError(f"--init {args.init} is already a PITI model; {INIT_HINT['1']}, or continue it with --stage 2")
    if init.config["task"] != args.task:
        raise TrainError(f"--init {args.init} is a {init.config['task']} model, this run's task is {args.task}")
    return init
