"""Nothing lost, nothing silent: bad inputs and faults of train.py, sample.py and prepare_data.py.

Every bad option is one `error:` line, before any work; a kill -9 during a save and a SIGTERM leave a
loadable checkpoint, a complete log and an exact resume; a failing disk keeps the previous
checkpoint; one run per --out; palette pictures are judged by their colors.
"""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import prepare_data
import sample
import train
from nanopiti.checkpoint import export_weights, load_checkpoint
from nanopiti.colormap import color_to_labels, labels_to_color
from nanopiti.data import label_image_to_color, load_condition_image
from toyworld.world import TOY_COLORS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--stage", "2", "--init", "scratch", "--data", "toy", "--batch-size", "2", "--workers", "0",
        "--sample-every", "0", "--log-every", "100", "--timesteps", "loss-aware"]


# --- helpers ---

def train_run(out, *argv):
    train.main(FAST + ["--out", str(out)] + [str(a) for a in argv])


def train_error(out, *argv):
    """train.main must exit with one `error:` line; returns it."""
    with pytest.raises(SystemExit) as e:
        train_run(out, *argv)
    message = e.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, message
    return message


def steps(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


def records(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def same_run(a, b):
    """Checkpoints of two runs hold the same step, weights, EMA, optimizer and timestep-sampling state."""
    a, b = load_checkpoint(os.path.join(a, "latest.pt")), load_checkpoint(os.path.join(b, "latest.pt"))
    assert a["step"] == b["step"]
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    assert torch.equal(a["timesteps"]["history"], b["timesteps"]["history"])


def sample_error(capsys, *argv):
    """sample.main must return non-zero with one `error:` line on stderr; returns it."""
    code = sample.main(["--steps", "2", "--sr-steps", "2", "--device", "cpu"] + [str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and err and err[-1].startswith("error: "), err
    assert not any(line.startswith("Traceback") for line in err)
    return err[-1]


def prepare_error(*argv):
    with pytest.raises(SystemExit) as e:
        prepare_data.main([str(a) for a in argv])
    assert isinstance(e.value.code, str) and e.value.code.startswith("error: ") and "\n" not in e.value.code
    return e.value.code


def dead_pid():
    """The id of a process that has ended."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """A run of 2 steps, saved at both: the starting point of the resume and lock cases."""
    out = tmp_path_factory.mktemp("two") / "run"
    train_run(out, "--max-steps", 2, "--save-every", 1)
    return out


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
    """The uninterrupted run that every interrupted and resumed one must equal."""
    out = tmp_path_factory.mktemp("four") / "run"
    train_run(out, "--max-steps", 4, "--save-every", 2)
    return out


def copy_run(src, tmp_path):
    return shutil.copytree(src, tmp_path / "run")


# --- train.py: options, checked before any work ---

@pytest.mark.parametrize("argv, expected", [
    (["--lr", "-1"], "--lr -1.0: a learning rate must be a number > 0"),
    (["--lr", "nan"], "--lr nan: a learning rate"),
    (["--micro-batch", "-1"], "--micro-batch -1: must be at least 1"),
    (["--limit", "-1"], "--limit -1: must be at least 1"),
    (["--limit", "0"], "--limit 0: must be at least 1"),
    (["--toy-scenes", "0"], "--toy-scenes 0: must be at least 1"),
    (["--workers", "-1"], "--workers -1: must be 0 or more"),
    (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["--batch-size", "-2"], "--batch-size -2: must be at least 1"),
    (["--save-every", "-1"], "--save-every -1: must be 0 or more"),
    (["--ema", "2"], "--ema 2.0: the EMA decay must be in [0, 1)"),
    (["--uncond-p", "2"], "--uncond-p 2.0: a probability must be in [0, 1]"),
    (["--max-steps", "0"], "--max-steps 0: must be at least 1"),
    (["--sample-every", "5", "--sample-steps", "many"], "--sample-steps: "),
    (["--sample-every", "5", "--num-samples", "0"], "--num-samples 0: must be at least 1"),
    (["--out", "{file}/run"], "is a file, not a folder"),
    (["--copy-task", "--task", "sketch"], "--copy-task is a toy-world mask task"),
])
def test_train_bad_option_is_one_line_before_any_work(tmp_path, monkeypatch, argv, expected):
    (tmp_path / "file").write_text("a file, not a folder")
    argv = [a.replace("{file}", str(tmp_path / "file")) for a in argv]

    def work(args):
        raise AssertionError("the run started before its options were checked")

    monkeypatch.setattr(train, "train", work)
    message = train_error(tmp_path / "out", *argv)
    assert expected in message
    assert not (tmp_path / "out").exists()


def test_missing_toy_list_suggests_a_command_that_works(tmp_path):
    listed = tmp_path / "data" / "train_mask.txt"
    message = train_error(tmp_path / "out", "--train-list", listed)
    command = message.split("prepare it with: ")[1]
    assert command == f"python prepare_data.py --data toy --root {listed.parent}"
    prepare_data.main(command.split()[2:] + ["--num", "2", "--size", "64", "--workers", "1"])
    assert listed.is_file()


# --- train.py: one run per --out ---

def test_fresh_run_refuses_a_folder_that_holds_a_run(tmp_path, two_steps):
    out = copy_run(two_steps, tmp_path)
    before = {n: (out / n).read_bytes() for n in ("latest.pt", "log.jsonl", "args.json")}
    message = train_error(out, "--max-steps", 3)
    assert "holds another run" in message and "--resume auto" in message and "new --out" in message
    assert {n: (out / n).read_bytes() for n in before} == before


def test_second_process_refused_stale_lock_and_temporaries_taken_over(tmp_path, two_steps):
    out = copy_run(two_steps, tmp_path)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (out / "lock").write_text(f"{other.pid}\n")  # another train.py writes here
        message = train_error(out, "--max-steps", 3, "--resume", "auto")
        assert f"in use by another run (process {other.pid}" in message and "another --out" in message
        assert steps(out) == [1, 2] and load_checkpoint(str(out / "latest.pt"))["step"] == 2
    finally:
        other.kill()
        other.wait()
    # its process is gone: the lock is taken over, the temporaries of dead processes are removed
    stale, live = out / f"latest.pt.{dead_pid()}.tmp", out / f"latest.pt.{os.getppid()}.tmp"
    stale.write_bytes(b"half a checkpoint")
    live.write_bytes(b"a save in progress")
    train_run(out, "--max-steps", 3, "--resume", "auto")
    assert steps(out) == [1, 2, 3] and not (out / "lock").exists()
    assert not stale.exists() and live.exists()


def test_resume_of_an_exported_model_or_of_a_finished_run(tmp_path, capsys, two_steps):
    export_weights(str(two_steps / "latest.pt"), str(tmp_path / "exported.pt"))
    message = train_error(tmp_path / "new", "--resume", tmp_path / "exported.pt", "--max-steps", 3)
    assert "holds weights only" in message and f"--init {tmp_path / 'exported.pt'}" in message
    message = train_error(two_steps, "--resume", "auto", "--max-steps", 1)
    assert "is at step 2, past --max-steps 1" in message
    before = {p.name: p.read_bytes() for p in two_steps.iterdir()}
    train_run(two_steps, "--resume", "auto", "--max-steps", 2)  # a finished run: rerunning it changes nothing
    assert "nothing to train" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in two_steps.iterdir()} == before


# --- train.py: the log ---

def test_torn_last_log_line_is_dropped_on_resume(tmp_path, two_steps):
    out = copy_run(two_steps, tmp_path)
    with open(out / "log.jsonl", "a") as f:
        f.write('{"loss": 0.5, "st')  # a kill in the middle of a line
    train_run(out, "--max-steps", 3, "--resume", "auto")
    assert steps(out) == [1, 2, 3]
    # a damaged line before the last one is no kill: it is named, not dropped silently
    lines = (out / "log.jsonl").read_text().splitlines()
    (out / "log.jsonl").write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    message = train_error(out, "--max-steps", 4, "--resume", "auto")
    assert "log.jsonl: line 2 is not a log record" in message


KILLED = r"""
import os, signal, sys
import torch
import train
mode, real_torch_save, real_save_checkpoint = sys.argv[1], torch.save, train.save_checkpoint

def torch_save(obj, f):  # kill -9 in the middle of writing the second checkpoint
    if obj["step"] == 4:
        f.write(b"PK\x03\x04 half a checkpoint")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    real_torch_save(obj, f)

def save_checkpoint(obj, path):  # SIGTERM once the first checkpoint is in place
    real_save_checkpoint(obj, path)
    if obj["step"] == 2:
        os.kill(os.getpid(), signal.SIGTERM)

if mode == "kill":
    torch.save = torch_save
else:
    train.save_checkpoint = save_checkpoint
train.main(sys.argv[2:])
"""


@pytest.mark.parametrize("mode, signum, logged", [("kill", signal.SIGKILL, [1, 2, 3, 4]),
                                                  ("term", signal.SIGTERM, [1, 2])])
def test_killed_run_keeps_checkpoint_and_log_and_resumes_exactly(tmp_path, four_steps, mode, signum, logged):
    out = tmp_path / "run"
    argv = FAST + ["--out", str(out), "--max-steps", "4", "--save-every", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", KILLED, mode] + argv, cwd=ROOT, env=env, capture_output=True,
                            timeout=300)
    assert result.returncode == -signum, result.stderr.decode()[-2000:]
    assert load_checkpoint(str(out / "latest.pt"))["step"] == 2  # the checkpoint before the kill loads
    assert steps(out) == logged  # every step of that checkpoint is in the log (--log-every 100)
    assert (out / "lock").exists()
    assert [p.name.endswith(".tmp") for p in out.iterdir()].count(True) == (mode == "kill")
    train_run(out, "--max-steps", 4, "--resume", "auto")
    assert records(out) == records(four_steps)  # every step once, with the uninterrupted run's values
    same_run(out, four_steps)
    assert sorted(p.name for p in out.iterdir()) == ["args.json", "latest.pt", "log.jsonl"]


# --- train.py: a failing disk ---

def test_failing_disk_during_a_save_is_one_line_and_keeps_the_checkpoint(tmp_path, two_steps):
    """A real write failure: the file size limit (EFBIG) cuts torch.save's writes as a full disk does."""
    out = copy_run(two_steps, tmp_path)
    before = (out / "latest.pt").read_bytes()
    limits, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) // 2, limits[1]))
    try:
        message = train_error(out, "--max-steps", 3, "--resume", "auto")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert "latest.pt: not written (File too large" in message and "MiB free" in message
    assert (out / "latest.pt").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["args.json", "latest.pt", "log.jsonl"]
    train_run(out, "--max-steps", 3, "--resume", "auto")  # and the run goes on once the disk has room
    assert steps(out) == [1, 2, 3]


# --- sample.py ---

def coco_mask(path, classes):
    """A color-coded COCO mask of vertical stripes, one per class value."""
    labels = np.repeat(np.array(classes), 8)[None].repeat(40, 0)
    Image.fromarray(labels_to_color(labels)).save(path)
    return path


@pytest.mark.parametrize("case, expected", [
    ("nan", "--w nan: must be a number >= 0"),
    ("inf", "--w inf: must be a number >= 0"),
    ("unwritable", "is not writable"),
    ("existing_file", "is a file, not a folder"),
    ("through_a_file", "is a file, not a folder"),
])
def test_sample_bad_option_is_one_line_before_loading(tmp_path, capsys, monkeypatch, case, expected):
    mask = coco_mask(tmp_path / "mask.png", [0, 1, 2])
    (tmp_path / "file").write_text("a file")
    (tmp_path / "locked").mkdir(mode=0o555)
    if os.geteuid() == 0:  # root may write anywhere: answer as the permission bits do for a user
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: real(p, mode) and p != str(tmp_path / "locked"))
    argv = {"nan": ["--w", "nan"], "inf": ["--w", "inf"],
            "unwritable": ["--out", tmp_path / "locked"], "existing_file": ["--out", tmp_path / "file"],
            "through_a_file": ["--out", tmp_path / "file" / "x.png"]}[case]

    def work(*args, **kwargs):
        raise AssertionError("models were loaded before the options were checked")

    monkeypatch.setattr(sample, "load_piti", work)
    assert expected in sample_error(capsys, "--cond", mask, *argv)


def test_sample_never_overwrites_its_condition(tmp_path, capsys, monkeypatch):
    mask = coco_mask(tmp_path / "mask.png", [0, 1, 2])
    earlier = coco_mask(tmp_path / "mask_0.png", [3, 4])  # a sample of an earlier run into this folder
    before = mask.read_bytes(), earlier.read_bytes()
    monkeypatch.setattr(sample, "sample_base", lambda *a, **k: pytest.fail("sampled"))
    message = sample_error(capsys, "--cond", mask, "--out", mask, "--base-only")
    assert f"--out {mask} would overwrite the condition {mask}; give another --out" in message
    message = sample_error(capsys, "--cond", tmp_path, "--out", tmp_path, "--base-only")
    assert f"would overwrite the condition {earlier}" in message
    assert (mask.read_bytes(), earlier.read_bytes()) == before


def test_default_toy_models_refuse_a_real_mask(tmp_path, capsys):
    real = coco_mask(tmp_path / "coco.png", [0, 1, 20, 150, 182])
    message = sample_error(capsys, "--cond", real, "--out", tmp_path / "o", "--base-only")
    assert f"{real}: classes 20, 150, 182 (60% of the pixels) are unknown to the default models" in message
    assert "toy-world models" in message and "sky, cloud" in message
    assert "--ckpt base_mask.pt --sr-ckpt upsample_mask.pt" in message and "python -m nanopiti.download" in message
    assert not (tmp_path / "o").exists()
    # a mask of the toy world's classes samples with the defaults
    toy = coco_mask(tmp_path / "toy.png", list(range(len(TOY_COLORS))))
    assert sample.main(["--cond", str(toy), "--out", str(tmp_path / "t.png"), "--base-only", "--steps", "2",
                        "--device", "cpu"]) == 0
    assert (tmp_path / "t.png").is_file()


def test_label_range_error_names_the_file(tmp_path, capsys):
    Image.fromarray(np.full((16, 16), 200, np.uint8)).save(tmp_path / "index.png")
    message = sample_error(capsys, "--cond", tmp_path / "index.png", "--palette", "ade20k", "--out", tmp_path / "o")
    assert message.startswith(f"error: {tmp_path / 'index.png'}: label values [200] are outside")


# --- palettes ---

def test_palette_png_is_read_by_its_colors_and_warned():
    labels = np.kron(np.arange(9).reshape(3, 3), np.ones((10, 10), np.int64))
    rgb = labels_to_color(labels)
    rgb[0, :3] = (1, 2, 3)  # a few off-palette pixels (of 900)
    picture = Image.fromarray(rgb).quantize(colors=16, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    assert picture.mode == "P" and np.array_equal(np.asarray(picture.convert("RGB")), rgb)
    assert np.array_equal(label_image_to_color(picture), rgb)  # its colors, not its indices as classes
    # a class-index map saved as "P" (each index's color is its own gray) keeps its indices
    as_index = Image.fromarray(labels.astype(np.uint8)).convert("P")
    assert np.array_equal(label_image_to_color(as_index), labels_to_color(labels))


def test_palette_png_condition_equals_the_rgb_one_with_the_same_warning(tmp_path):
    labels = np.kron(np.arange(9).reshape(3, 3), np.ones((10, 10), np.int64))
    rgb = labels_to_color(labels)
    rgb[0, :3] = (1, 2, 3)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(rgb).quantize(colors=16, method=Image.Quantize.FASTOCTREE,
                                  dither=Image.Dither.NONE).save(tmp_path / "p.png")
    conds = []
    for name in ("rgb.png", "p.png"):
        with pytest.warns(UserWarning, match=r"0\.3% of pixels have colors outside the coco label palette"):
            conds.append(load_condition_image(str(tmp_path / name), "mask", size=30))
    assert torch.equal(conds[0], conds[1])


def test_coco_palette_has_the_release_entry_182(tmp_path):
    assert labels_to_color(np.array([[182]])).tolist() == [[[128, 224, 192]]]
    assert color_to_labels(np.array([[[128, 224, 192]]], np.uint8)).tolist() == [[182]]
    coco_mask(tmp_path / "release.png", [0, 20, 182])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "colors outside the palette"
        load_condition_image(str(tmp_path / "release.png"), "mask")


# --- prepare_data.py ---

def test_prepare_bad_options_are_one_line(tmp_path):
    (tmp_path / "file").write_text("a file")
    assert "--size 0: must be at least 1" in prepare_error("--data", "toy", "--root", tmp_path / "t", "--size", 0)
    assert "--root" in prepare_error("--data", "toy", "--root", tmp_path / "file", "--num", 2)
    assert "is a file" in prepare_error("--data", "toy", "--root", tmp_path / "file", "--num", 2)
    assert not (tmp_path / "t").exists()


def test_prepare_lists_nan_depth_and_names_bad_label_files(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        scan = tmp_path / f"diode/{split}/indoors/scene_00001/scan_00001"
        scan.mkdir(parents=True)
        for i in range(2):
            stem = scan / f"{i:03d}"
            Image.fromarray(rng.integers(0, 255, (16, 12, 3), dtype=np.uint8)).save(f"{stem}.png")
            depth = np.full((16, 12, 1), 3.0, np.float32)
            if split == "train" and i == 1:
                depth[4, 4] = np.nan
            np.save(f"{stem}_depth.npy", depth)
            np.save(f"{stem}_depth_mask.npy", np.ones((16, 12), np.float32))
            np.save(f"{stem}_normal.npy", np.tile(np.float32([0, 0, 1]), (16, 12, 1)))
    prepare_data.main(["--data", "diode", "--root", str(tmp_path / "diode"), "--out", str(tmp_path / "d"),
                       "--workers", "1", "--size", "16"])
    assert "skipped 1 of 4 inputs (1 non-finite values)" in capsys.readouterr().err
    skipped = (tmp_path / "d" / "skipped.txt").read_text()
    assert skipped.startswith("non-finite values\t") and "001_depth.npy: 1 values are NaN" in skipped
    assert len((tmp_path / "d" / "train_depth.txt").read_text().splitlines()) == 1

    base = tmp_path / "ade" / "ADEChallengeData2016"
    for folder, value in (("training", 3), ("training", 200), ("validation", 3)):
        (base / "images" / folder).mkdir(parents=True, exist_ok=True)
        (base / "annotations" / folder).mkdir(parents=True, exist_ok=True)
        stem = f"ADE_{value}"
        Image.new("RGB", (16, 16)).save(base / "images" / folder / f"{stem}.jpg")
        Image.fromarray(np.full((16, 16), value, np.uint8)).save(base / "annotations" / folder / f"{stem}.png")
    prepare_data.main(["--data", "ade20k", "--root", str(tmp_path / "ade"), "--out", str(tmp_path / "a"),
                       "--workers", "1", "--size", "16"])
    skipped = (tmp_path / "a" / "skipped.txt").read_text()
    bad = base / "annotations" / "training" / "ADE_200.png"
    assert skipped == f"bad labels\t{bad}: label values [200] are outside the palette's 0..150 (and 255 = unlabeled)\n"
