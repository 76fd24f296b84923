"""sample.py: the CLI end to end on tiny toy checkpoints, guidance inside the sampler, bad inputs."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image

import bench
import sample
from nanopiti import build_model, toy_config
from nanopiti.data import load_condition_image
from nanopiti.guidance import make_guided_model_fn
from toyworld.world import TOY_COLORS

FAST = ["--steps", "4", "--sr-steps", "3", "--device", "cpu"]


def save_checkpoint(path, kind, super_res, task="mask", seed=0):
    config = toy_config(kind, super_res, task)
    torch.manual_seed(seed)
    state = bench.randomize_untrained_(build_model(config), seed).state_dict()
    torch.save({"config": config, "model": state, "ema": state}, path)
    return str(path)


def toy_mask(seed, shape=(100, 90)):
    """A blocky color-coded label map in the toy world's (COCO) colors, not square on purpose."""
    labels = np.random.RandomState(seed).randint(0, len(TOY_COLORS), (10, 9))
    return TOY_COLORS[labels].repeat(shape[0] // 10, 0).repeat(shape[1] // 9, 1)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("sample")
    Image.fromarray(toy_mask(0)).save(d / "mask.png")
    Image.fromarray(np.full((40, 40, 2), 128, np.uint8), mode="LA").save(d / "two_channel.png")
    (d / "text.png").write_text("this is not a picture\n")
    (d / "notes.pt").write_text("nor is this a checkpoint\n")
    return {"base": save_checkpoint(d / "base.pt", "piti", False, seed=1),
            "up": save_checkpoint(d / "up.pt", "piti", True, seed=2),
            "sketch_up": save_checkpoint(d / "sketch_up.pt", "piti", True, task="sketch", seed=3),
            "glide": save_checkpoint(d / "glide.pt", "glide", False, seed=4),
            "mask": str(d / "mask.png"), "two_channel": str(d / "two_channel.png"),
            "text": str(d / "text.png"), "notes": str(d / "notes.pt")}


def cli(capsys, files, *args, models=True):
    argv = (["--ckpt", files["base"], "--sr-ckpt", files["up"]] if models else []) + FAST + [str(a) for a in args]
    code = sample.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read(path):
    return np.asarray(Image.open(path))


def test_end_to_end_files_and_sizes(capsys, files, tmp_path):
    code, out, _ = cli(capsys, files, "--cond", files["mask"], "--num", 2, "--out", tmp_path / "o")
    assert code == 0, out
    for k in range(2):
        assert read(tmp_path / "o" / f"mask_{k}.png").shape == (64, 64, 3)  # toy upsampler: 64x64
    grid = read(tmp_path / "o" / "mask_grid.png")
    assert grid.shape == (64, 3 * 64 + 2 * 2, 3)  # condition | sample | sample, 2-pixel gaps
    # the grid's first cell is the condition, squashed to 64x64 with nearest neighbour
    at_cond_size = Image.fromarray(toy_mask(0)).resize((128, 128), Image.NEAREST)
    expected = np.asarray(at_cond_size.resize((64, 64), Image.NEAREST))
    assert np.array_equal(grid[:, :64], expected)
    assert np.array_equal(grid[:, 66:130], read(tmp_path / "o" / "mask_0.png"))

    code, _, _ = cli(capsys, files, "--cond", files["mask"], "--base-only", "--out", tmp_path / "one.png")
    assert code == 0
    assert read(tmp_path / "one.png").shape == (32, 32, 3)  # toy base model: 32x32
    assert read(tmp_path / "one_grid.png").shape == (32, 2 * 32 + 2, 3)


def test_same_seed_same_bytes_other_seed_differs(capsys, files, tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        assert cli(capsys, files, "--cond", files["mask"], "--seed", seed, "--out", tmp_path / f"{name}.png")[0] == 0
    a, b, c = ((tmp_path / f"{n}.png").read_bytes() for n in "abc")
    assert a == b
    assert not np.array_equal(read(tmp_path / "a.png"), read(tmp_path / "c.png"))


def test_batch_mode_folder_and_list_file(capsys, files, tmp_path):
    conds = tmp_path / "conds"
    conds.mkdir()
    Image.fromarray(toy_mask(1)).save(conds / "rgb.png")
    Image.fromarray(toy_mask(2)).convert("P").save(conds / "palette.png")
    Image.fromarray(np.random.RandomState(3).randint(0, 10, (50, 70)).astype(np.uint8)).save(conds / "index.png")
    code, out, _ = cli(capsys, files, "--cond", conds, "--palette", "coco", "--batch-size", 2, "--num", 2,
                       "--base-only", "--out", tmp_path / "o")
    assert code == 0, out
    for stem in ("rgb", "palette", "index"):
        assert read(tmp_path / "o" / f"{stem}_1.png").shape == (32, 32, 3)
        assert (tmp_path / "o" / f"{stem}_grid.png").is_file()
    # the class-index map is colored with the COCO palette: its grid cell shows toy colors only
    cell = read(tmp_path / "o" / "index_grid.png")[:, :32].reshape(-1, 3)
    assert {tuple(c) for c in cell} <= {tuple(c) for c in TOY_COLORS}

    (tmp_path / "list.txt").write_text("conds/rgb.png\n\n# a comment\nconds/index.png\n")
    code, _, _ = cli(capsys, files, "--cond", tmp_path / "list.txt", "--base-only", "--out", tmp_path / "l")
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "l").iterdir()) == ["index_0.png", "index_grid.png",
                                                                   "rgb_0.png", "rgb_grid.png"]


@pytest.fixture(scope="module")
def base_and_cond(files):
    from nanopiti import load_model
    base = load_model(files["base"])
    cond = torch.stack([load_condition_image(files["mask"], "mask", size=128),
                        load_condition_image(files["mask"], "mask", size=128).flip(-1)])
    return base, cond


def record_guidance(monkeypatch, model):
    """Spy on the sampler: the network's raw output (both branches) and the guided output, per step."""
    raw, guided = [], []
    handle = model.decoder.register_forward_hook(lambda mod, inp, out: raw.append(out.detach().clone()))

    def spy(*args, **kwargs):
        fn = make_guided_model_fn(*args, **kwargs)
        def wrapped(x, t):
            out = fn(x, t)
            guided.append(out.clone())
            return out
        return wrapped

    monkeypatch.setattr(sample, "make_guided_model_fn", spy)
    return raw, guided, handle


def test_condition_encoded_once_gives_the_model_output(base_and_cond):
    base, cond = base_and_cond
    x, t = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([999.0, 3.0])
    with torch.inference_mode():
        direct = base(x, t, cond=cond)
        cached = sample.decoder_call(base, torch.float32)(x, t, **sample.encode(base, cond, torch.float32))
    assert torch.allclose(direct, cached, atol=1e-6)


def test_ncf_keeps_conditional_statistics_at_every_step(monkeypatch, base_and_cond):
    base, cond = base_and_cond
    raw, guided, handle = record_guidance(monkeypatch, base)
    gen = torch.Generator().manual_seed(0)
    sample.sample_base(base, cond, w=3.0, guidance="ncf", steps="6", generator=gen, progress=False)
    handle.remove()
    assert len(raw) == len(guided) == 6  # one batched forward (cond + null) per step
    dims = (1, 2, 3)
    for out, g in zip(raw, guided):
        assert out.shape[0] == 2 * len(cond)
        cond_out, null_out = out.split(len(cond))
        eps, eps_null, eps_hat = cond_out[:, :3], null_out[:, :3], g[:, :3]
        assert torch.allclose(eps_hat.mean(dims), eps.mean(dims), atol=1e-5)
        assert torch.allclose(eps_hat.std(dims), eps.std(dims), rtol=1e-4, atol=1e-6)
        assert torch.equal(g[:, 3:], cond_out[:, 3:])  # variance values from the conditional branch
        assert (eps_hat - eps).abs().max() > 1e-3  # and guidance did change epsilon
        assert (eps - eps_null).abs().max() > 1e-3  # the null condition is a different condition

    # the check can fail: plain CF at the same w moves the statistics
    raw, guided, handle = record_guidance(monkeypatch, base)
    sample.sample_base(base, cond, w=3.0, guidance="cf", steps="2", generator=gen, progress=False)
    handle.remove()
    assert (guided[0][:, :3].std(dims) - raw[0][: len(cond), :3].std(dims)).abs().max() > 1e-3


def test_zero_guidance_all_kinds_same_image(capsys, files, tmp_path, base_and_cond):
    base, cond = base_and_cond
    # the guided network at w = 0 is the conditional one, at every noise level (compared step by step:
    # a whole trajectory would amplify the batched forward's float rounding by up to 1/sqrt(abar))
    kwargs, null = sample.encode(base, cond, torch.float32), sample.encode(base, torch.ones_like(cond), torch.float32)
    call = sample.decoder_call(base, torch.float32)
    x_t = torch.randn(len(cond), 3, 32, 32, generator=torch.Generator().manual_seed(7))
    for step in (999.0, 500.0, 20.0):
        t = torch.full((len(cond),), step)
        plain = make_guided_model_fn(call, kwargs, null, 0.0, "none")(x_t, t)
        for g in ("cf", "ncf"):
            torch.testing.assert_close(make_guided_model_fn(call, kwargs, null, 0.0, g)(x_t, t), plain,
                                       atol=1e-5, rtol=1e-5)
    images = {g: sample.sample_base(base, cond, w=w, guidance=g, steps="5", progress=False,
                                    generator=torch.Generator().manual_seed(7)) for g, w in (("none", 0.0), ("ncf", 5.0))}
    assert (images["ncf"] - images["none"]).abs().max() > 0.05  # while strong guidance matters
    # and through the whole CLI pipeline, base model and upsampler (8-bit pictures: one level of slack)
    for g in ("ncf", "none"):
        assert cli(capsys, files, "--cond", files["mask"], "--w", 0, "--guidance", g,
                   "--out", tmp_path / f"{g}.png")[0] == 0
    assert np.abs(read(tmp_path / "ncf.png").astype(int) - read(tmp_path / "none.png")).max() <= 1


@pytest.mark.parametrize("case, expected", [
    ("missing", "no such file"),
    ("text_png", "unreadable image"),
    ("two_channel", "2 channels"),
    ("glide", "text-to-image GLIDE model, not a PITI model"),
    ("upsampler_as_base", "this is an upsampler; give it as --sr-ckpt"),
    ("base_as_upsampler", "this is a base model; give it as --ckpt"),
    ("task_mismatch", "finetuned for the mask task"),
    ("tasks_disagree", "upsampler a sketch model"),
    ("not_a_checkpoint", "not a readable PyTorch checkpoint"),
    ("default_missing", "git checkout -- checkpoints"),
    ("bad_steps", "--steps"),
    ("one_file_many_samples", "give a folder"),
])
def test_bad_input_one_line_and_nonzero_exit(capsys, files, tmp_path, monkeypatch, case, expected):
    m, base, up = files["mask"], files["base"], files["up"]
    argv = {
        "missing": ["--ckpt", base, "--sr-ckpt", up, "--cond", tmp_path / "nope.png"],
        "text_png": ["--ckpt", base, "--sr-ckpt", up, "--cond", files["text"]],
        "two_channel": ["--ckpt", base, "--sr-ckpt", up, "--cond", files["two_channel"]],
        "glide": ["--ckpt", files["glide"], "--sr-ckpt", up, "--cond", m],
        "upsampler_as_base": ["--ckpt", up, "--sr-ckpt", up, "--cond", m],
        "base_as_upsampler": ["--ckpt", base, "--sr-ckpt", base, "--cond", m],
        "task_mismatch": ["--ckpt", base, "--sr-ckpt", up, "--cond", m, "--task", "sketch"],
        "tasks_disagree": ["--ckpt", base, "--sr-ckpt", files["sketch_up"], "--cond", m],
        "not_a_checkpoint": ["--ckpt", files["notes"], "--sr-ckpt", up, "--cond", m],
        "default_missing": ["--sr-ckpt", up, "--cond", m],
        "bad_steps": ["--ckpt", base, "--sr-ckpt", up, "--cond", m, "--steps", "many"],
        "one_file_many_samples": ["--ckpt", base, "--sr-ckpt", up, "--cond", m, "--num", 2,
                                  "--out", tmp_path / "x.png"],
    }[case]
    monkeypatch.setattr(sample, "DEFAULT_CKPT", tmp_path / "checkpoints" / "toy_mask_base.pt")
    if case == "default_missing":
        argv = ["--ckpt", str(sample.DEFAULT_CKPT)] + argv
    if "--out" not in argv:
        argv += ["--out", tmp_path / "o"]
    code, out, err = cli(capsys, files, *argv, models=False)
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
    assert not (tmp_path / "o").exists()


def test_bench_smoke_toy(capsys):
    code = bench.main(["--config", "toy", "--steps", "2", "--sr-steps", "2", "--batch-size", "2", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0
    seconds = float(out.split(": ")[-1].split(" s per 64x64 image")[0])
    assert seconds > 0 and "batch 2, 2+2 steps, float32" in out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_replay_equals_eager(base_and_cond):
    base, cond = copy.deepcopy(base_and_cond[0]).cuda(), base_and_cond[1].cuda()
    runs = [sample.sample_base(base, cond, w=3.0, steps="8", cuda_graph=graph, progress=False,
                               generator=torch.Generator("cuda").manual_seed(0)) for graph in (False, True)]
    assert torch.allclose(runs[0], runs[1], atol=1e-5)
