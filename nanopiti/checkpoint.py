"""Training checkpoints: written atomically, read back safely.

A nanopiti training checkpoint is one dict that `torch.load(..., weights_only=True)` can read
(tensors, numbers, strings, lists and dicts only), so `nanopiti.load_model` accepts it too:

    config            the model's hyper-parameters (nanopiti.model)
    model, ema        state dicts of the trained weights and of their exponential moving average
    optimizer         AdamW's state
    disc, disc_optimizer   the upsampler's discriminator and its optimizer (stage "up" only)
    scaler            the fp16 GradScaler's state (fp16 runs only)
    step, stage, task, args
    rng               the random generator states, as tensors
    sampler           the loss-aware timestep sampler's loss history, as tensors

Atomic writes: a crash (power loss, kill -9, a full disk) while a checkpoint is being written
must never destroy the previous one. So the new checkpoint goes to a temporary file in the same
folder, is flushed to the disk (fsync), and only then renamed over the old one with
`os.replace`, which is atomic on POSIX and Windows: a reader sees either the old file or the new
one, never half of one.

A resumed run redoes the steps after its checkpoint, so `open_log` first drops their records
from log.jsonl: every step is logged once.
"""

import json
import os

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or read, or does not fit the run."""


def save_checkpoint(obj, path):
    """Write `obj` to `path` atomically (temporary file, fsync, rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # also KeyboardInterrupt: never leave a half-written temporary behind
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    # The rename itself lives in the folder's metadata: sync it too, where the OS allows it.
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def load_checkpoint(path, map_location="cpu"):
    """Read a training checkpoint written by `save_checkpoint`."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated file, not a torch file, pickled code objects, ...
        raise CheckpointError(f"{path}: not a readable nanopiti checkpoint ({type(e).__name__})") from None
    if not isinstance(obj, dict) or not {"config", "model", "step", "stage"} <= set(obj):
        raise CheckpointError(f"{path}: not a nanopiti training checkpoint (no config/model/step/stage); "
                              "to start from released weights use --init instead of --resume")
    return obj


def latest_checkpoint(out_dir):
    """The path of `out_dir`/latest.pt, or None when the run has not saved yet."""
    path = os.path.join(out_dir, "latest.pt")
    return path if os.path.isfile(path) else None


def open_log(path, start):
    """log.jsonl for appending, without the records of steps after `start` (written after the
    checkpoint that a resumed run continues from, and about to be redone)."""
    kept = []
    if start > 0 and os.path.isfile(path):
        with open(path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= start]
    with open(path, "w") as f:
        f.writelines(kept)
    return open(path, "a")


def rng_state(generator):
    """The states of `generator` and of torch's global CPU and CUDA generators, as tensors."""
    state = {"generator": generator.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(generator, state):
    """Restore what `rng_state` saved."""
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def export_weights(src, dst, dtype=torch.float16):
    """Keep only what sampling and finetuning need: the config and the EMA weights (in `dtype`,
    half the size of fp32), plus the run's stage, task and step. `nanopiti.load_model` and
    `train.py --init` read the result; this is how the toy models in checkpoints/ were made."""
    ckpt = load_checkpoint(src)
    weights = ckpt.get("ema") or ckpt["model"]
    save_checkpoint({"config": ckpt["config"], "model": {k: v.to(dtype) for k, v in weights.items()},
                     "stage": ckpt["stage"], "task": ckpt.get("task"), "step": ckpt["step"]}, dst)
