"""The two models and the checkpoint loader. A model is described by a plain dict, `model.config`, which nanopiti
checkpoints store.

* `GlideText`: GLIDE's text-conditioned UNet (base 64x64 or the 64->256 upsampler), the pretrained prior of the
  paper (section 3.2). `model(x_t, t, text=..., text_mask=..., low_res=...)`.
* `PITI`: `encoder` (the task's ConditionEncoder) + `decoder` (the GLIDE UNet with its `transformer_proj`), the
  finetuned model (section 3.3). `model(x_t, t, cond=..., low_res=...)`.
* `load_model(path_or_state_dict)`: recognises a GLIDE or PITI checkpoint (released or nanopiti's) from its keys
  and shapes, builds the model with the right hyper-parameters, loads the weights strictly, in eval mode.
"""

import os

import torch
import torch.nn as nn

from .conditions import TASK_CHANNELS
from .encoder import ConditionEncoder, add_text_encoder, encode_text
from .unet import UNet

UNET_KEYS = ("model_channels", "num_res_blocks", "channel_mult", "attention_ds", "num_head_channels", "norm_groups")

class ModelError(ValueError):
    """A file or state dict that is not the model it should be; the message says what and why."""

class GlideText(UNet):
    """GLIDE's Text2ImUNet / SuperResText2ImUNet: the UNet with GLIDE's text encoder beside it."""

    def __init__(self, config):
        super().__init__(config["xf_width"], config["super_res"], **{k: config[k] for k in UNET_KEYS if k in config})
        add_text_encoder(self, config["text_ctx"], config["xf_width"], config["xf_layers"], config["xf_heads"],
                         config["n_vocab"], config["xf_final_ln"], config["xf_padding"])
        self.config = dict(config)

    def forward(self, x, timesteps, text=None, text_mask=None, low_res=None):
        return super().forward(x, timesteps, *encode_text(self, text, text_mask), low_res)

class PITI(nn.Module):
    """PITI's Text2ImModel / SuperResText2ImModel: task encoder E_i + pretrained decoder D."""

    def __init__(self, config):
        super().__init__()
        width = config["encoder_width"]
        options = {k: config[k] for k in ("cond_size", "stem", "patch_grid", "patch_norm") if k in config}
        self.encoder = ConditionEncoder(config["cond_channels"], width, config["encoder_layers"],
                                        config["encoder_heads"], **options)
        self.decoder = UNet(width, config["super_res"], **{k: config[k] for k in UNET_KEYS if k in config})
        self.config = dict(config)

    def encode(self, cond):
        return self.encoder(cond)

    def forward(self, x, timesteps, cond=None, low_res=None):
        return self.decoder(x, timesteps, *self.encode(cond), low_res)

def base_config(kind="piti", super_res=False, task="mask"):
    """The hyper-parameters of the released full-size models (GLIDE base.pt/upsample.pt and PITI's
    base/upsample checkpoints): 64x64 base with 3 blocks per level, 256x256 upsampler with 2."""
    config = dict(
        kind=kind, super_res=super_res, image_size=256 if super_res else 64, model_channels=192,
        num_res_blocks=2 if super_res else 3, channel_mult=[1, 1, 2, 2, 4, 4] if super_res else [1, 2, 3, 4],
        attention_ds=[8, 16, 32] if super_res else [2, 4, 8],  # attention at 32, 16 and 8
        num_head_channels=64, norm_groups=32, noise_schedule="linear" if super_res else "squaredcos_cap_v2")
    if kind == "glide":
        config.update(text_ctx=128, xf_width=512, xf_layers=16, xf_heads=8, xf_final_ln=True, xf_padding=True,
                      n_vocab=50257)
    else:
        config.update(task=task, cond_channels=TASK_CHANNELS[task], encoder_width=512, encoder_layers=8,
                      encoder_heads=8, cond_size=256, stem="cnn")
    return config

def toy_config(kind="piti", super_res=False, task="mask", n_vocab=64):
    """The toy world's models, small enough for a laptop CPU: 32x32 base, 32->64 upsampler, 128x128 conditions
    (8x8 tokens from `PatchStem`), 64-wide encoders: text and task encoder share the width, so that the decoder's
    `transformer_proj` and `encoder_kv` carry over from pretraining to finetuning."""
    config = dict(
        kind=kind, super_res=super_res, image_size=64 if super_res else 32, model_channels=32,
        num_res_blocks=1, channel_mult=[1, 2, 2], attention_ds=[4] if super_res else [2, 4], num_head_channels=32,
        # not GLIDE's 32 groups: at 32 channels those are InstanceNorms; the upsampler needs one group to pass its
        # 64x64 input's mean color through (results.md, "The toy's colors")
        norm_groups=1 if super_res else 8, noise_schedule="linear" if super_res else "squaredcos_cap_v2")
    if kind == "glide":
        config.update(text_ctx=24, xf_width=64, xf_layers=2, xf_heads=2, xf_final_ln=True, xf_padding=True,
                      n_vocab=n_vocab)
    else:
        config.update(task=task, cond_channels=TASK_CHANNELS[task], encoder_width=64, encoder_layers=2,
                      encoder_heads=2, cond_size=128, stem="patch")
        if task == "sketch":  # its distance field's patch means: mean -0.9, spread 0.09 (the mask's: 0.37)
            config.update(patch_grid=4, patch_norm=[-0.9, 4.0])
    return config

def build_model(config):
    models = {"glide": GlideText, "piti": PITI}
    if config.get("kind") not in models:
        raise ModelError(f"unknown model kind {config.get('kind')!r} (expected 'glide' or 'piti')")
    return models[config["kind"]](config)

def infer_config(state_dict, hints=None):
    """Read a model's hyper-parameters off its state dict's keys and shapes; head counts, norm groups and image
    size, not in the weights, come from `hints` (a checkpoint's config) or are the released models' (64 per head,
    8 heads, 32 groups, 64/256)."""
    hints = hints or {}
    if "decoder.input_blocks.0.0.weight" in state_dict and "encoder.cnn.conv1.weight" in state_dict:
        kind, p = "piti", "decoder."
    elif "input_blocks.0.0.weight" in state_dict and "token_embedding.weight" in state_dict:
        kind, p = "glide", ""
    else:
        some = ", ".join(list(state_dict)[:4]) or "none"
        raise ModelError(f"not a GLIDE or PITI model: no UNet with a text or condition encoder (first keys: {some})")
    mc, in_ch = state_dict[p + "input_blocks.0.0.weight"].shape[:2]
    super_res = in_ch == 6
    def count(prefix):  # how many numbered children `prefix` has, e.g. decoder.input_blocks.N
        return 1 + max(int(k[len(prefix):].split(".")[0]) for k in state_dict if k.startswith(prefix))
    n_in, n_out = count(p + "input_blocks."), count(p + "output_blocks.")
    # each level but the first ends its output blocks with an upsampling ResBlock (layer 1, or 2 after an attention)
    levels = 1 + sum(f"{p}output_blocks.{i}.{j}.in_layers.0.weight" in state_dict for i in range(n_out) for j in (1, 2))
    per_level = n_out // levels  # num_res_blocks + 1
    assert n_in == levels * per_level, "input and output blocks disagree"
    firsts = [1 + level * per_level for level in range(levels)]  # each level's first input block
    mult = [state_dict[f"{p}input_blocks.{i}.0.out_layers.3.weight"].shape[0] // mc for i in firsts]
    attention_ds = [2 ** level for level, i in enumerate(firsts) if f"{p}input_blocks.{i}.1.qkv.weight" in state_dict]
    config = dict(kind=kind, super_res=bool(super_res), model_channels=int(mc), num_res_blocks=per_level - 1,
                  channel_mult=mult, attention_ds=attention_ds,
                  num_head_channels=hints.get("num_head_channels", 64), norm_groups=hints.get("norm_groups", 32),
                  image_size=hints.get("image_size", 256 if super_res else 64),
                  noise_schedule="linear" if super_res else "squaredcos_cap_v2")
    if kind == "glide":
        ctx, width = state_dict["positional_embedding"].shape
        config.update(text_ctx=ctx, xf_width=width, n_vocab=state_dict["token_embedding.weight"].shape[0],
                      xf_layers=count("transformer.resblocks."), xf_heads=hints.get("xf_heads", 8),
                      xf_final_ln="final_ln.weight" in state_dict, xf_padding="padding_embedding" in state_dict)
    else:
        stem = "cnn" if "encoder.cnn.conv2.weight" in state_dict else "patch"
        grid = hints.get("patch_grid", 1)  # a patch stem reads grid x grid means of each channel
        cond_channels = state_dict["encoder.cnn.conv1.weight"].shape[1] // grid ** 2
        task = {c: t for t, c in TASK_CHANNELS.items()}.get(cond_channels)
        if task is None:
            raise ModelError(f"PITI encoder takes {cond_channels} condition channels; known tasks take 3, 1 or 6")
        config.update(task=task, cond_channels=cond_channels, encoder_width=state_dict["encoder.cls_token"].shape[-1],
                      encoder_layers=count("encoder.transformer.resblocks."),
                      encoder_heads=hints.get("encoder_heads", 8),
                      cond_size=16 * round((state_dict["encoder.positional_embedding"].shape[1] - 1) ** 0.5),
                      stem=stem, **{k: hints[k] for k in ("patch_grid", "patch_norm") if k in hints})
    return config

def _read(path):
    if not os.path.isfile(path):
        raise ModelError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds here; all mean "not a checkpoint we can read"
        raise ModelError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__})") from None

def _load_strict(model, state_dict, name):
    model_sd = model.state_dict()
    missing = [k for k in model_sd if k not in state_dict]
    unexpected = [k for k in state_dict if k not in model_sd]
    wrong = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in model_sd.items()
             if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = [f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''} ({len(keys)})"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", wrong)) if keys]
        raise ModelError(f"{name}: weights do not fit the {model.config['kind']} model; " + "; ".join(parts))
    model.load_state_dict(state_dict, strict=True)

def load_model(path_or_state_dict, use_ema=True, config=None):
    """Build and load a GLIDE or PITI model (eval mode, fp32, CPU) from a path or a loaded object: a released state
    dict, a nanopiti checkpoint (`config`, `model`, `ema` unless use_ema=False) or `state_dict` + `config` hints."""
    name = path_or_state_dict if isinstance(path_or_state_dict, (str, os.PathLike)) else "state dict"
    obj = _read(path_or_state_dict) if name != "state dict" else path_or_state_dict
    if not isinstance(obj, dict):
        raise ModelError(f"{name}: holds a {type(obj).__name__}, not a state dict")
    hints = {}
    if "model" in obj and "config" in obj:  # a nanopiti checkpoint
        config = config or obj["config"]
        state_dict = obj["ema"] if use_ema and obj.get("ema") is not None else obj["model"]
    else:  # a released state dict, or `state_dict` with its `config` as hints
        hints, state_dict = obj.get("config", {}), obj.get("state_dict", obj)
    if not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ModelError(f"{name}: not a state dict of tensors")
    state_dict = {k: v.float() for k, v in state_dict.items()}
    model = build_model(config or infer_config(state_dict, hints))
    _load_strict(model, state_dict, name)
    return model.eval()
