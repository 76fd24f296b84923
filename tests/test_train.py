"""train.py end to end on the toy world at the toy model size, on the CPU: every stage, exact
resume, atomic checkpoints, torchrun with 2 processes, the non-finite-step guard, bad inputs.
(Kills, locks, full disks and every range check: tests/test_faults.py.)"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import train
from nanopiti import build_model, load_model, toy_config
from nanopiti.data import SyntheticPairs
from nanopiti.checkpoint import CheckpointError, load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--data", "toy", "--max-steps", "1", "--batch-size", "2", "--workers", "0", "--sample-every", "0", "--log-every", "1"]


def run(*argv):
    train.main(FAST + [str(a) for a in argv])


def records(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def changed(before, after, prefix):
    """Names of the `prefix` tensors that differ between two state dicts."""
    return {k for k in before if k.startswith(prefix) and not torch.equal(before[k], after[k])}


def expect_error(capsys, *argv, code=None):
    """Run train.main, expect a one-line error on exit; return the message."""
    with pytest.raises(SystemExit) as e:
        train.main(FAST + [str(a) for a in argv])
    if code is not None:
        assert e.value.code == code
        return capsys.readouterr().err
    message = e.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message
    return message


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def perturbed_glide_upsampler(path):
    """A bare GLIDE-style upsampler state dict (text encoder keys and all), as the released
    upsample.pt, perturbed so that no output layer is zero (as in a trained model): then every
    weight gets a gradient from the first step on."""
    glide = build_model(toy_config("glide", True, n_vocab=41))
    with torch.no_grad():
        for p in glide.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    torch.save(glide.state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def prior(tmp_path_factory):
    """A toy text prior made by stage 0 (2 steps): what stage 1 starts from."""
    out = tmp_path_factory.mktemp("stage0")
    run("--stage", "0", "--model", "base", "--out", out, "--max-steps", 2)
    return str(out / "latest.pt")


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, prior):
    out = tmp_path_factory.mktemp("stage1")
    run("--stage", "1", "--init", prior, "--out", out, "--max-steps", 2, "--sample-every", 2,
        "--num-samples", 2, "--sample-steps", "ddim2")
    return out


def test_stage0_writes_a_text_prior(prior):
    ckpt = load_checkpoint(prior)
    assert ckpt["stage"] == "0" and ckpt["step"] == 2 and ckpt["config"]["kind"] == "glide"
    assert not ckpt["config"]["super_res"]
    model = load_model(prior)  # weights_only loading through the public loader, EMA weights
    assert all(torch.equal(v, ckpt["ema"][k]) for k, v in model.state_dict().items())
    log = records(os.path.dirname(prior))
    assert [r["step"] for r in log] == [1, 2]
    assert all(r[k] == r[k] and r[k] > 0 for r in log for k in ("loss", "mse", "vb"))
    # the trained weights and their average differ after two steps
    assert changed(ckpt["model"], ckpt["ema"], "")


def test_stage1_trains_only_the_encoder(prior, stage1):
    prior_unet = load_model(prior).state_dict()
    ckpt = load_checkpoint(str(stage1 / "latest.pt"))
    model = ckpt["model"]
    decoder = {k[len("decoder."):]: v for k, v in model.items() if k.startswith("decoder.")}
    text_keys = ("token_embedding.", "positional_embedding", "padding_embedding", "transformer.", "final_ln.")
    expected = {k: v for k, v in prior_unet.items() if not k.startswith(text_keys)}
    assert set(decoder) == set(expected) and "transformer_proj.weight" in decoder
    assert all(torch.equal(decoder[k], expected[k]) for k in expected), "stage 1 changed the frozen decoder"
    assert all(torch.equal(ckpt["ema"]["decoder." + k], expected[k]) for k in expected)
    # The new encoder learned: every one of its tensors changed.
    args = train.get_args(FAST + ["--stage", "1", "--init", prior])
    torch.manual_seed(args.seed)
    start = train.initial_model(args).state_dict()
    encoder = {k for k in start if k.startswith("encoder.")}
    assert changed(start, model, "encoder.") == encoder
    assert os.path.getsize(stage1 / "samples" / "step_000002.png") > 0


def test_stage2_trains_encoder_and_decoder(tmp_path, stage1):
    init = str(stage1 / "latest.pt")
    run("--stage", "2", "--init", init, "--out", tmp_path, "--max-steps", 2)
    before, after = load_model(init).state_dict(), load_checkpoint(str(tmp_path / "latest.pt"))["model"]
    for part in ("encoder.", "decoder."):
        names = [k for k in before if k.startswith(part)]
        assert len(changed(before, after, part)) > 0.8 * len(names), part
    assert "decoder.out.2.weight" in changed(before, after, "decoder.")


def test_stage_up_trains_generator_and_discriminator(tmp_path):
    init = perturbed_glide_upsampler(tmp_path / "upsample.pt")
    out = tmp_path / "up"
    with pytest.warns(UserWarning, match="RANDOM VGG19"):
        run("--stage", "up", "--init", init, "--random-vgg", "--out", out, "--max-steps", 2)
    ckpt = load_checkpoint(str(out / "latest.pt"))
    assert ckpt["config"]["kind"] == "piti" and ckpt["config"]["super_res"]
    # Adam's first moments are non-zero for every tensor that received gradients: all of the
    # generator's (encoder and decoder), and every weight of the critic (some of its biases have
    # zero gradient: the ones an InstanceNorm subtracts again, and the last one, since the WGAN
    # loss D(fake) - D(real) does not change when all scores shift).
    generator = ckpt["optimizer"]["state"]
    assert len(generator) == len(ckpt["model"]) and all(s["exp_avg"].abs().sum() > 0 for s in generator.values())
    names = list(ckpt["disc"])
    critic = {names[i]: s["exp_avg"].abs().sum() > 0 for i, s in ckpt["disc_optimizer"]["state"].items()}
    assert len(critic) == len(names) == 10
    assert all(moved for k, moved in critic.items() if k.endswith("weight"))
    for r in records(out):
        assert {"perceptual", "adv", "disc", "mse", "vb"} <= set(r)
        assert r["perceptual"] > 0 and r["loss"] == pytest.approx(
            r["diffusion"] + 0.004 * r["perceptual"] + 0.01 * r["adv"], rel=1e-5, abs=1e-6)



def test_compiled_training_step_equals_the_eager_one(tmp_path, stage1, monkeypatch):
    """--compile traces the training forward with TorchDynamo and still saves the plain model. The
    test compiles with dynamo's "eager" backend (the captured graph run by PyTorch's own ops), which
    checks the wiring in seconds; inductor's code generation (2 minutes here) is PyTorch's to test."""
    compile_, compiled_models = torch.compile, []
    monkeypatch.setattr(torch, "compile", lambda model: compiled_models.append(model) or compile_(model, backend="eager"))
    init = str(stage1 / "latest.pt")
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        run("--stage", "2", "--init", init, "--out", tmp_path / name, "--max-steps", 2, *extra)
    assert len(compiled_models) == 1  # the --compile run only
    eager, compiled = records(tmp_path / "eager"), records(tmp_path / "compiled")
    assert [r["loss"] for r in compiled] == pytest.approx([r["loss"] for r in eager], rel=1e-6)
    a, b = (load_checkpoint(str(tmp_path / name / "latest.pt"))["model"] for name in ("eager", "compiled"))
    assert a.keys() == b.keys()  # saved uncompiled: no _orig_mod. prefixes
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)

def test_classifier_free_dropout_gives_the_null_condition():
    """train.py's one way of classifier-free dropout: dropped samples get the null condition (all
    ones for PITI, the empty caption for GLIDE); the upsampler's low_res is never dropped."""
    drop = torch.tensor([True, False])
    piti = build_model(toy_config("piti", super_res=True))
    batch = {"cond": torch.rand(2, 3, 8, 8) * 2 - 1, "low_res": torch.rand(2, 3, 4, 4)}
    kwargs, null = train.model_kwargs(piti, batch, "cpu", drop)
    assert (kwargs["cond"][0] == 1).all() and torch.equal(kwargs["cond"][1], batch["cond"][1])
    assert torch.equal(null["cond"], torch.ones_like(batch["cond"])) and torch.equal(kwargs["low_res"], batch["low_res"])
    glide = build_model(toy_config("glide"))
    kwargs, null = train.model_kwargs(glide, {"caption": ["a house on grass", "a tree on sand"]}, "cpu", drop)
    assert not kwargs["text_mask"][0].any() and not kwargs["text"][0].any() and kwargs["text_mask"][1].sum() == 4
    assert not null["text_mask"].any()


def test_prepared_dataset_with_limit_and_previews(tmp_path):
    """The route of the real datasets: list files from prepare_data.py (here of the toy world, in
    the layout every dataset gets), --limit, previews from the validation list."""
    import prepare_data
    prepare_data.main(["--data", "toy", "--root", str(tmp_path / "data"), "--num", "10", "--size", "128",
                       "--workers", "1"])
    out = tmp_path / "run"
    run("--stage", "2", "--init", "scratch", "--data", "ade20k", "--data-root", tmp_path / "data",
        "--model-size", "toy", "--limit", 3, "--max-steps", 2, "--sample-every", 2, "--num-samples", 2,
        "--sample-steps", "ddim2", "--out", out)
    assert len(records(out)) == 2 and (out / "samples" / "step_000002.png").is_file()
    args = json.loads((out / "args.json").read_text())
    assert args["data"] == "ade20k" and args["limit"] == 3 and args["task"] == "mask"


def test_resume_is_bitwise_exact(tmp_path):
    common = ["--stage", "2", "--init", "scratch", "--micro-batch", 1, "--timesteps", "loss-aware"]
    run(*common, "--out", tmp_path / "straight", "--max-steps", 4)
    run(*common, "--out", tmp_path / "split", "--max-steps", 2)
    run(*common, "--out", tmp_path / "split", "--max-steps", 4, "--resume", "auto")
    a = load_checkpoint(str(tmp_path / "straight" / "latest.pt"))
    b = load_checkpoint(str(tmp_path / "split" / "latest.pt"))
    assert a["step"] == b["step"] == 4
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    assert torch.equal(a["timesteps"]["history"], b["timesteps"]["history"])
    assert records(tmp_path / "straight") == records(tmp_path / "split")


def test_resume_with_a_new_lr_trains_at_that_lr(tmp_path):
    """A continued run with another --lr (a second, slower phase) must use it, not the rate saved with the
    optimizer's state: the checkpoint and the log both say which one it ran at."""
    out = tmp_path / "run"
    run("--stage", "2", "--init", "scratch", "--out", out, "--max-steps", 1, "--lr", 1e-3)
    run("--stage", "2", "--out", out, "--max-steps", 2, "--lr", 1e-5, "--resume", "auto")
    ckpt = load_checkpoint(str(out / "latest.pt"))
    assert [g["lr"] for g in ckpt["optimizer"]["param_groups"]] == [1e-5]
    assert [r["lr"] for r in records(out) if "lr" in r] == [1e-3, 1e-5]


def test_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    run("--stage", "2", "--init", "scratch", "--out", out, "--max-steps", 1)
    before = load_checkpoint(str(out / "latest.pt"))

    def dies_midway(obj, f):  # writes part of the file, then the "disk" fails
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("nanopiti.checkpoint.torch.save", dies_midway)
    message = expect_error(capsys, "--stage", "2", "--out", out, "--max-steps", 2, "--resume", "auto")
    assert "No space left on device" in message
    after = load_checkpoint(str(out / "latest.pt"))
    assert after["step"] == 1 and all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])
    assert os.listdir(out) and not [f for f in os.listdir(out) if f.endswith(".tmp")]
    # what a reader of a truncated file gets (had the file been written in place)
    with open(out / "latest.pt", "rb") as f, open(tmp_path / "truncated.pt", "wb") as g:
        g.write(f.read(1000))
    with pytest.raises(CheckpointError, match="not a readable nanopiti checkpoint"):
        load_checkpoint(str(tmp_path / "truncated.pt"))


def test_non_finite_step_is_skipped(tmp_path, monkeypatch, capsys):
    real = SyntheticPairs.__getitem__

    def poisoned(self, index):
        sample = real(self, index)
        sample["image"][0, 0, 0] = float("nan")
        return sample

    monkeypatch.setattr(SyntheticPairs, "__getitem__", poisoned)
    args = ["--stage", "2", "--init", "scratch", "--out", str(tmp_path), "--max-steps", "1",
            "--timesteps", "loss-aware"]
    train.main(FAST + args + ["--data", "synthetic", "--model-size", "toy"])
    assert "step skipped" in capsys.readouterr().err
    assert records(tmp_path)[0]["skipped"] is True
    history = load_checkpoint(str(tmp_path / "latest.pt"))["timesteps"]  # the NaN losses stay out of it
    assert history["counts"].sum() == 0 and torch.isfinite(history["history"]).all()
    torch.manual_seed(0)
    start = train.initial_model(train.get_args(FAST + args + ["--model-size", "toy"])).state_dict()
    ckpt = load_checkpoint(str(tmp_path / "latest.pt"))
    assert not changed(start, ckpt["model"], "") and not changed(start, ckpt["ema"], "")


def test_torchrun_two_processes_match_one(tmp_path):
    """2 processes x 2 samples (gloo) vs 1 process x 2 micro-batches of 2: the same global batch of
    4, data, timesteps and noise. The upsampler stage with loss-aware sampling exercises every
    cross-process path: DDP, the critic's all-reduce, the loss all-gather."""
    init = perturbed_glide_upsampler(tmp_path / "upsample.pt")
    args = ["train.py", "--stage", "up", "--init", init, "--random-vgg", "--timesteps", "loss-aware",
            "--max-steps", "2", "--batch-size", "4", "--data", "toy", "--workers", "0", "--sample-every", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    subprocess.run(two + args + ["--out", str(tmp_path / "ddp")], cwd=ROOT, env=env, check=True, timeout=240,
                   capture_output=True)
    subprocess.run([sys.executable] + args + ["--out", str(tmp_path / "one"), "--micro-batch", "2"], cwd=ROOT,
                   env=env, check=True, timeout=240, capture_output=True)
    a = load_checkpoint(str(tmp_path / "ddp" / "latest.pt"))
    b = load_checkpoint(str(tmp_path / "one" / "latest.pt"))
    # Parameters move by about lr = 1e-5 per step; only the order of float sums may differ
    # (measured: no difference at all on this CPU).
    for part in ("model", "ema", "disc"):
        diff = max((a[part][k] - b[part][k]).abs().max().item() for k in a[part])
        assert diff < 1e-6, (part, diff)
    for ra, rb in zip(records(tmp_path / "ddp"), records(tmp_path / "one"), strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
        assert ra["disc"] == pytest.approx(rb["disc"], rel=1e-5)


def test_bad_inputs_are_one_clear_line(tmp_path, capsys, prior, stage1):
    msg = expect_error(capsys, "--stage", "1", "--data", "ade20k", "--data-root", tmp_path / "nowhere", "--init", prior)
    assert "prepare_data.py --data ade20k" in msg
    assert "needs --init" in expect_error(capsys, "--stage", "1")
    assert "no such file" in expect_error(capsys, "--stage", "1", "--init", tmp_path / "missing.pt")
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    assert "not a PyTorch checkpoint" in expect_error(capsys, "--stage", "1", "--init", tmp_path / "notes.pt")
    assert "already a PITI model" in expect_error(capsys, "--stage", "1", "--init", stage1 / "latest.pt")
    assert "is a base model" in expect_error(capsys, "--stage", "up", "--init", prior, "--random-vgg")
    assert "--model-size toy" in expect_error(capsys, "--stage", "1", "--init", prior, "--model-size", "full",
                                               "--data", "synthetic")
    msg = expect_error(capsys, "--stage", "2", "--resume", stage1 / "latest.pt", "--out", tmp_path / "r")
    assert "stage 1 checkpoint" in msg and "this run is stage 2" in msg
    assert "invalid choice" in expect_error(capsys, "--stage", "3", code=2)
