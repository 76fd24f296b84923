"""Training checkpoints (docs/training.md lists their keys), the run's log and its lock. A checkpoint is one dict
that `torch.load(..., weights_only=True)` reads (so does `nanopiti.load_model`), written atomically."""

import contextlib
import json
import os
import re
import shutil
import sys

import torch

class CheckpointError(ValueError):
    """A checkpoint that cannot be written or read, or does not fit the run."""

def save_checkpoint(obj, path):
    """Write `obj` to `path` through a temporary file, fsynced, then renamed: a crash or a full disk never destroys
    the previous checkpoint."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # also KeyboardInterrupt: never leave a half-written temporary behind
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        # A failed write (full disk, quota): torch.save raises a RuntimeError whose context is the OSError.
        cause = next((c for c in (e, e.__context__) if isinstance(c, OSError)), None)
        if cause is None and not isinstance(e, RuntimeError):
            raise
        free = shutil.disk_usage(folder).free / 2**20
        raise CheckpointError(f"{path}: not written ({cause.strerror if cause else str(e).splitlines()[0]}; "
                              f"{free:.0f} MiB free on its disk); the file there before, if any, is intact: "
                              "free space and run again (train.py: --resume auto)") from None
    # The rename itself lives in the folder's metadata: sync it too, where the OS allows it.
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

def load_checkpoint(path):
    """Read a training checkpoint written by `save_checkpoint`."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a torch file, pickled code objects, ...
        raise CheckpointError(f"{path}: not a readable nanopiti checkpoint ({type(e).__name__})") from None
    if not isinstance(obj, dict) or not {"config", "model", "step", "stage"} <= set(obj):
        raise CheckpointError(f"{path}: not a nanopiti training checkpoint (no config/model/step/stage); "
                              "to start from released weights use --init instead of --resume")
    return obj

def open_log(path, start):
    """log.jsonl for appending, without the records of the steps after `start` (to be redone). A last line torn by
    a kill is dropped; any other unreadable line is an error."""
    kept = []
    if start > 0 and os.path.isfile(path):
        with open(path) as f:
            lines = [line for line in f if line.strip()]
        for number, line in enumerate(lines, start=1):
            try:
                step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):
                if number == len(lines):
                    break  # torn by a kill while it was written: its step is redone
                raise CheckpointError(f"{path}: line {number} is not a log record; repair or remove that line, "
                                      "then resume again") from None
            if step <= start:
                kept.append(line.rstrip("\n") + "\n")
    with open(path, "w") as f:
        f.writelines(kept)
    return open(path, "a")

def _alive(pid):
    """Whether process `pid` runs (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        return True
    return True

@contextlib.contextmanager
def run_lock(folder):
    """Hold `folder`/lock while a run writes there: a second process is refused, a dead process's lock taken over
    and its `save_checkpoint` temporaries (killed during a save, each as large as a checkpoint) removed; folders
    made for the lock go again if the run wrote nothing."""
    made, parent = [], os.path.abspath(folder)
    while not os.path.isdir(parent):
        made.append(parent)
        parent = os.path.dirname(parent)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "lock")
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        with open(path) as f:
            owner = f.read().strip()
        if owner.isdigit() and _alive(int(owner)):
            raise CheckpointError(f"{folder} is in use by another run (process {owner}, {path}); wait for it to "
                                  "end or give another --out (remove the lock only if no such process runs)") from None
        os.remove(path)  # stale: its process was killed
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()}\n")
    try:
        for name in sorted(os.listdir(folder)):
            match = re.search(r"\.(\d+)\.tmp$", name)
            if match and not _alive(int(match.group(1))):
                os.remove(os.path.join(folder, name))
                print(f"removed {os.path.join(folder, name)}, left by process {match.group(1)} (killed during a save)",
                      file=sys.stderr)
        yield
    finally:
        os.remove(path)
        for empty in made:  # deepest first
            with contextlib.suppress(OSError):
                os.rmdir(empty)

def folder_problem(folder):
    """Why files cannot be written into `folder` (created if missing), or None when they can.
    Nothing is created: the deepest part of the path that exists must be a writable folder."""
    path = os.path.abspath(folder)
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        return f"{path} is a file, not a folder"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"the folder {path} is not writable"
    return None

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
    """Keep what sampling and finetuning need: config, EMA weights in `dtype`, stage, task and step (for
    `nanopiti.load_model` and `train.py --init`; how the toy models in checkpoints/ were made)."""
    ckpt = load_checkpoint(src)
    weights = ckpt.get("ema") or ckpt["model"]
    save_checkpoint({"config": ckpt["config"], "model": {k: v.to(dtype) for k, v in weights.items()},
                     "stage": ckpt["stage"], "task": ckpt.get("task"), "step": ckpt["step"]}, dst)
