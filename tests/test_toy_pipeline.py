"""The whole toy pipeline, one step per stage: text prior (base and upsampler) -> exported small
checkpoints (as shipped in checkpoints/) -> stage 1 -> stage 2 -> adversarial upsampler ->
guided sampling with sample.py. Keeps the README's toy commands honest."""

import os
import shutil

import torch
from PIL import Image

import ablations
import sample
import train
from nanopiti import load_model
from nanopiti.checkpoint import export_weights, load_checkpoint
from toyworld.judge import save_segmenter, train_segmenter

ROOT = os.path.dirname(os.path.abspath(ablations.__file__))
STEP = ["--data", "toy", "--max-steps", "1", "--batch-size", "2", "--workers", "0", "--sample-every", "0"]


def test_every_stage_then_sampling(tmp_path):
    d = str(tmp_path)
    train.main(STEP + ["--stage", "0", "--model", "base", "--out", f"{d}/prior"])
    train.main(STEP + ["--stage", "0", "--model", "upsample", "--out", f"{d}/prior-up"])
    export_weights(f"{d}/prior/latest.pt", f"{d}/toy_prior_base.pt")
    export_weights(f"{d}/prior-up/latest.pt", f"{d}/toy_prior_upsample.pt")

    # the exported file is the EMA in fp16 and loads as the same model
    full, small = load_checkpoint(f"{d}/prior/latest.pt"), torch.load(f"{d}/toy_prior_base.pt", weights_only=True)
    assert set(small) == {"config", "model", "stage", "task", "step"}
    for k, v in full["ema"].items():
        assert torch.equal(small["model"][k], v.half())
    assert os.path.getsize(f"{d}/toy_prior_base.pt") < 0.3 * os.path.getsize(f"{d}/prior/latest.pt")
    assert load_model(f"{d}/toy_prior_base.pt").config["kind"] == "glide"

    train.main(STEP + ["--stage", "1", "--init", f"{d}/toy_prior_base.pt", "--out", f"{d}/s1"])
    train.main(STEP + ["--stage", "2", "--init", f"{d}/s1/latest.pt", "--out", f"{d}/s2"])
    train.main(STEP + ["--stage", "up", "--init", f"{d}/toy_prior_upsample.pt", "--random-vgg", "--out", f"{d}/up"])
    export_weights(f"{d}/s2/latest.pt", f"{d}/toy_mask_base.pt")
    export_weights(f"{d}/up/latest.pt", f"{d}/toy_mask_upsample.pt")

    mask = os.path.join(os.path.dirname(ablations.__file__), "docs", "toy_mask.png")
    code = sample.main(["--ckpt", f"{d}/toy_mask_base.pt", "--sr-ckpt", f"{d}/toy_mask_upsample.pt", "--cond", mask,
                        "--num", "2", "--steps", "3", "--sr-steps", "3", "--out", f"{d}/out"])
    assert code == 0
    assert Image.open(f"{d}/out/toy_mask_0.png").size == (64, 64)
    assert Image.open(f"{d}/out/toy_mask_grid.png").width > 3 * 64

    # the measure of the shipped models (ablations.py --measure), with a small judge saved beforehand
    save_segmenter(train_segmenter(num_images=8, size=32, steps=2, batch_size=4, width=8), f"{d}/m/segmenter.pt",
                   heldout_miou=0.5)
    rows, use = ablations.measure_models(ablations.parse_args(
        ["--measure", f"{d}/toy_mask_base.pt", f"{d}/toy_mask_upsample.pt", "--eval-n", "3", "--out", f"{d}/m"]))
    assert set(rows) == {"base", "upsampled"} and all(0 <= r["miou"] <= 1 and r["fid"] >= 0 for r in rows.values())
    assert use["ratio"] > 0 and use["layout"] > 0
    assert Image.open(f"{d}/m/measure.png").size == (4 * 128 + 3 * 2, 3 * 128)  # mask | base | upsampled | real


def test_ablation_plan_covers_the_papers_comparisons():
    chains = ablations.plan(ablations.parse_args(["--steps", "10"]), 0)
    assert set(chains) == {"two-stage", "one-stage", "pretrained-25", "pretrained-50", "one-stage-25", "one-stage-50",
                           "scratch-25", "scratch-50", "scratch-100", "up-diffusion", "up-perceptual", "up-full"}
    # one-stage trains as many steps as stage 1 + stage 2 of the two-stage run, from the same prior
    two, one = chains["two-stage"], chains["one-stage"]
    assert [c[c.index("--stage") + 1] for c in two] == ["1", "2"] and one[0][one[0].index("--stage") + 1] == "2"
    steps = lambda c: int(c[c.index("--max-steps") + 1])  # noqa: E731
    assert steps(one[0]) == steps(two[0]) + steps(two[1])
    assert one[0][one[0].index("--init") + 1] == two[0][two[0].index("--init") + 1]
    # pretrained (two-stage and one-stage) and scratch runs see the same share of the data
    for pct in (25, 50):
        limit = lambda c: c[c.index("--limit") + 1]  # noqa: E731
        assert (limit(chains[f"pretrained-{pct}"][0]) == limit(chains[f"pretrained-{pct}"][1])
                == limit(chains[f"one-stage-{pct}"][0]) == limit(chains[f"scratch-{pct}"][0]) == str(18 * pct))
        assert steps(chains[f"one-stage-{pct}"][0]) == steps(one[0])


def test_ablation_tables_pick_their_runs():
    runs = lambda *tables: set(ablations.plan(ablations.parse_args(["--tables", *tables]), 0))  # noqa: E731
    assert runs("3a") == {"two-stage", "one-stage"}  # frozen is the two-stage chain's stage 1
    assert runs("3b") == {"up-diffusion", "up-perceptual", "up-full"}
    assert runs("4", "3a") == runs("4")  # Table 4 has both finetuning strategies at 100%


def test_ablation_table_3a_end_to_end(tmp_path):
    d = str(tmp_path)
    save_segmenter(train_segmenter(num_images=8, size=32, steps=2, batch_size=4, width=8), f"{d}/segmenter.pt",
                   heldout_miou=0.5)
    argv = ["--tables", "3a", "--steps", "1", "--batch-size", "2", "--eval-n", "2", "--sample-steps", "2",
            "--seeds", "0", "--jobs", "1", "--out", d]
    assert ablations.main(argv) == 0
    rows = [line.split(" | ") for line in open(f"{d}/results.md").read().splitlines() if line.startswith("| ")]
    assert [r[0] for r in rows[2:]] == ["| frozen", "| one-stage", "| two-stage", "| real renders"]
    assert rows[-1][2] == "-" and rows[-2][2] != "-"  # real renders have no toy FID (against themselves)
    assert load_checkpoint(f"{d}/seed0/two-stage/latest.pt")["step"] == 1
    assert Image.open(f"{d}/seed0/base.png").size == (5 * 128 + 4 * 2, 2 * 128)  # mask | 3 variants | real


def test_ablation_names_a_failed_training_run_in_one_line(tmp_path, capsys):
    d = str(tmp_path)
    save_segmenter(train_segmenter(num_images=8, size=32, steps=2, batch_size=4, width=8), f"{d}/segmenter.pt",
                   heldout_miou=0.5)
    with open(f"{d}/prior.pt", "w") as f:
        f.write("not a checkpoint")
    capsys.readouterr()  # the segmenter's progress bar
    argv = ["--tables", "3a", "--prior-base", f"{d}/prior.pt", "--steps", "1", "--seeds", "0", "--jobs", "1", "--out", d]
    assert ablations.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: train.py for ") and "failed: see" in err
    log = err.split("see ")[1].split(",")[0]
    assert "not a PyTorch checkpoint" in open(log).read() and not os.path.exists(f"{d}/results.md")


def test_ablation_seeds_train_apart_with_the_toy_recipe():
    args = ablations.parse_args(["--seeds", "3", "4"])
    a, b = ablations.plan(args, 3)["two-stage"], ablations.plan(args, 4)["two-stage"]
    value = lambda c, flag: c[c.index(flag) + 1]  # noqa: E731
    assert [value(c, "--seed") for c in a + b] == ["3", "3", "4", "4"]
    assert value(a[1], "--out") != value(b[1], "--out") and value(a[1], "--init") == value(a[0], "--out") + "/latest.pt"
    assert all(value(c, "--timesteps") == "high-noise" and value(c, "--ema") == "0.999" for c in a + b)


def test_guidance_comparison_per_seed_and_its_table(tmp_path):
    d = str(tmp_path)
    shutil.copy(os.path.join(ROOT, "checkpoints", "toy_mask_base.pt"), d)
    save_segmenter(train_segmenter(num_images=8, size=32, steps=2, batch_size=4, width=8), f"{d}/segmenter.pt",
                   heldout_miou=0.5)
    argv = ["--guidance", f"{d}/toy_mask_base.pt", "--eval-n", "2", "--sample-steps", "2", "--seeds", "0", "1",
            "--out", d]
    assert ablations.main(argv) == 0
    table = open(f"{d}/results.md").read()
    rows = [line for line in table.splitlines() if line.startswith("| cf") or line.startswith("| ncf")]
    assert len(rows) == 6 and all(line.count(" / ") == 4 for line in rows)  # each measure: mean (seed 0 / seed 1)
    assert os.path.isfile(f"{d}/guidance_seed0.png") and os.path.isfile(f"{d}/guidance_seed1.png")
    # a rerun samples the same pictures: the same table, but for the wall time in its first line
    assert ablations.main(argv) == 0 and open(f"{d}/results.md").read().split("\n", 1)[1] == table.split("\n", 1)[1]


def test_measure_names_a_missing_model_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "m"
    assert ablations.main(["--measure", str(tmp_path / "base.pt"), str(tmp_path / "up.pt"), "--out", str(out)]) == 1
    assert "base.pt not found" in capsys.readouterr().err and not out.exists()


def test_measure_a_base_model_alone_and_refuse_a_wrong_pair(tmp_path, capsys):
    d, ckpt = str(tmp_path), os.path.join(ROOT, "checkpoints")
    base, up = f"{ckpt}/toy_mask_base.pt", f"{ckpt}/toy_mask_upsample.pt"
    save_segmenter(train_segmenter(num_images=8, size=32, steps=2, batch_size=4, width=8), f"{d}/segmenter.pt",
                   heldout_miou=0.5)
    rows, use = ablations.measure_models(ablations.parse_args(["--measure", base, "--eval-n", "2", "--out", d]))
    assert set(rows) == {"base"} and use["ratio"] > 1  # the shipped model listens to its masks
    assert Image.open(f"{d}/measure.png").size == (3 * 128 + 2 * 2, 2 * 128)  # mask | base | real
    capsys.readouterr()
    assert ablations.main(["--measure", up, base, "--out", f"{d}/swapped"]) == 1
    assert "this is an upsampler" in capsys.readouterr().err and not os.path.exists(f"{d}/swapped/segmenter.pt")
    assert ablations.main(["--measure", base, up, base, "--out", f"{d}/three"]) == 1
    assert "at most one upsampler" in capsys.readouterr().err
