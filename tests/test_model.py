"""The model core equals the original GLIDE and PITI code (golden outputs on random weights, from
tests/golden/) and builds the released full-size models with exactly their keys, shapes and
parameter counts."""

import pytest
import torch

import nanopiti
from nanopiti.model import ModelError, base_config, build_model, infer_config

MODELS = ["glide_text_base", "glide_text_upsample", "piti_mask_base", "piti_mask_upsample"]
PRESETS = {  # manifest name -> base_config arguments
    "glide_base": ("glide", False, "mask"), "glide_upsample": ("glide", True, "mask"),
    "piti_mask_base": ("piti", False, "mask"), "piti_mask_upsample": ("piti", True, "mask"),
    "piti_sketch_base": ("piti", False, "sketch"), "piti_sketch_upsample": ("piti", True, "sketch"),
    "piti_depth_normal_base": ("piti", False, "depth"),
}


@pytest.fixture(scope="module")
def manifests(golden):
    return golden.json("checkpoint_manifests.json")


@pytest.mark.parametrize("name", MODELS)
def test_reference_outputs(name, golden):
    gold = golden.model(name)
    model = nanopiti.load_model(gold)
    # The original code's keyword arguments, by their nanopiti names.
    names = {"ref": "cond", "tokens": "text", "mask": "text_mask", "low_res": "low_res"}
    inputs = {names[k]: v for k, v in gold["inputs"].items() if k not in ("x", "t")}
    x, t = gold["inputs"]["x"], gold["inputs"]["t"]
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, **inputs), gold["output"], atol=1e-4, rtol=0)
        if "output_null_ref" in gold:  # the null condition of classifier-free guidance
            inputs["cond"] = torch.ones_like(inputs["cond"])
            torch.testing.assert_close(model(x, t, **inputs), gold["output_null_ref"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", list(PRESETS))
def test_full_size_models_match_manifest(name, manifests):
    manifest = manifests[name]
    with torch.device("meta"):
        model = build_model(base_config(*PRESETS[name]))
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == manifest["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == manifest["params"]
    # and the loader reads the same hyper-parameters back off the shapes alone
    fake = {k: torch.empty(s, device="meta") for k, s in manifest["state_dict"].items()}
    assert infer_config(fake) == base_config(*PRESETS[name])


def test_parameter_count_of_glide_base_and_piti_mask_base(manifests):
    assert manifests["glide_base"]["params"] == 385_030_726
    assert manifests["piti_mask_base"]["params"] == 338_015_302


def test_load_from_path_and_nanopiti_checkpoint(tmp_path, golden):
    ref = golden.model("piti_mask_base")
    path = tmp_path / "released.pt"
    torch.save(ref["state_dict"], path)
    model = nanopiti.load_model(path, config=None)
    assert model.config["task"] == "mask" and not model.training
    # a nanopiti checkpoint: config + model (+ ema, which is preferred)
    ema = {k: v + 1 for k, v in model.state_dict().items()}
    ckpt = tmp_path / "nano.pt"
    torch.save({"config": nanopiti.infer_config(ref["state_dict"], ref["config"]), "model": model.state_dict(),
                "ema": ema}, ckpt)
    loaded = nanopiti.load_model(ckpt)
    torch.testing.assert_close(loaded.decoder.out[2].bias, ema["decoder.out.2.bias"])
    raw = nanopiti.load_model(ckpt, use_ema=False)
    torch.testing.assert_close(raw.decoder.out[2].bias, model.decoder.out[2].bias)


def test_toy_patch_stem_is_a_projection_of_patch_means():
    torch.manual_seed(0)
    model = build_model(nanopiti.toy_config("piti", task="depth"))  # 6 condition channels, 128x128
    cond = torch.randn(2, 6, 128, 128)
    means = cond.view(2, 6, 8, 16, 8, 16).mean((3, 5))  # each 16x16 patch's mean
    conv = model.encoder.cnn.conv1
    expected = torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], means) + conv.bias[:, None, None]
    torch.testing.assert_close(model.encoder.cnn(cond), expected)
    # the sketch's: each token reads its patch's 4x4 sub-patch means (of 4x4 pixels each), standardized
    model = build_model(nanopiti.toy_config("piti", task="sketch"))
    cond = torch.rand(2, 1, 128, 128) * 2 - 1
    means = (cond.view(2, 8, 4, 4, 8, 4, 4).mean((3, 6)) + 0.9) * 4  # (b, row, a, sub-row, col, b, sub-col)
    features = means.permute(0, 2, 4, 1, 3).reshape(2, 16, 8, 8)  # channel a * 4 + b of token (row, col)
    conv = model.encoder.cnn.conv1
    expected = torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], features) + conv.bias[:, None, None]
    torch.testing.assert_close(model.encoder.cnn(cond), expected)


def test_toy_unet_passes_its_input_mean_through_its_norms():
    # At high noise eps ~ x_t, so the predicted noise must follow x_t's mean color. GLIDE's 32 groups
    # over the toy's 32 channels are InstanceNorms, which drop every channel's mean: shifting x_t's
    # red channel then hardly moves the prediction's mean. 8 groups of 4 channels keep it.
    shift = torch.zeros(1, 3, 1, 1)
    shift[0, 0] = 0.1
    moved = {}
    for groups in (32, 8):
        torch.manual_seed(0)
        model = build_model(dict(nanopiti.toy_config(), norm_groups=groups)).eval()
        for conv in model.decoder.modules():  # the zero-initialized output convolutions, made random
            if isinstance(conv, torch.nn.Conv2d) and not conv.weight.any():
                torch.nn.init.normal_(conv.weight, std=0.05)
        x, t, cond = torch.randn(4, 3, 32, 32), torch.full((4,), 900), torch.rand(4, 3, 128, 128) * 2 - 1
        with torch.no_grad():
            eps = model(x, t, cond=cond)[:, :3], model(x + shift, t, cond=cond)[:, :3]
        moved[groups] = (eps[1] - eps[0]).mean((2, 3)).abs().mean()
    assert nanopiti.toy_config()["norm_groups"] == 8
    assert nanopiti.toy_config(super_res=True)["norm_groups"] == 1
    assert moved[8] > 10 * moved[32]  # measured 1.0e-2 vs 2.4e-4


def test_toy_encoder_starts_with_2d_positions_and_identity_blocks():
    torch.manual_seed(0)
    encoder = build_model(nanopiti.toy_config("piti")).encoder  # 8x8 tokens, 64 wide
    pos = encoder.positional_embedding[0, 1:].detach().view(8, 8, 64)
    assert abs(float(pos.std()) - 1) < 1e-5
    # the first half of each position depends on its row only, the second on its column only
    torch.testing.assert_close(pos[:, :, :32], pos[:, :1, :32].expand(8, 8, 32))
    torch.testing.assert_close(pos[:, :, 32:], pos[:1, :, 32:].expand(8, 8, 32))
    assert torch.cdist(pos.view(64, 64), pos.view(64, 64)).add(torch.eye(64)).min() > 0.5  # all 64 tell apart
    # the transformer starts as the identity: tokens = final LayerNorm(patch stem + positions)
    cond = torch.randn(2, 3, 128, 128)
    pooled, tokens = encoder(cond)
    x = encoder.cnn(cond).flatten(2).transpose(1, 2) + encoder.positional_embedding[:, 1:]
    torch.testing.assert_close(tokens, encoder.final_ln(x).transpose(1, 2))
    torch.testing.assert_close(pooled, encoder.final_ln(encoder.cls_token + encoder.positional_embedding[:, :1])[:, 0].expand(2, -1))


@pytest.mark.parametrize("stem, task", [("patch", "mask"), ("cnn", "mask"), ("patch", "sketch")])
def test_toy_configs_read_back_off_the_weights(stem, task):
    # the shipped toy models of both stems load by their keys alone (head counts, norm groups, patch grid: hints)
    config = dict(nanopiti.toy_config("piti", super_res=True, task=task), stem=stem)
    with torch.device("meta"):
        model = build_model(config)
    hints = {k: config[k] for k in ("num_head_channels", "norm_groups", "image_size", "encoder_heads", "patch_grid",
                                    "patch_norm") if k in config}
    assert infer_config(model.state_dict(), hints) == config


def test_load_errors_are_one_clear_line(tmp_path, golden):
    with pytest.raises(ModelError, match="no such checkpoint"):
        nanopiti.load_model(tmp_path / "missing.pt")
    text = tmp_path / "notes.pt"
    text.write_text("this is not a checkpoint")
    with pytest.raises(ModelError, match="not a readable PyTorch checkpoint"):
        nanopiti.load_model(text)
    with pytest.raises(ModelError, match="not a GLIDE or PITI model"):
        nanopiti.load_model({"conv.weight": torch.zeros(3, 3)})
    sd = golden.model("glide_text_base")["state_dict"]
    sd.pop("out.2.bias")
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(ModelError, match=r"missing: out\.2\.bias.*unexpected: extra\.weight"):
        nanopiti.load_model(sd)


def test_gradient_checkpointing_gives_same_gradients():
    config = dict(base_config("piti"), model_channels=32, channel_mult=[1, 2], attention_ds=[2], num_res_blocks=1,
                  num_head_channels=16, encoder_layers=1, encoder_width=64, encoder_heads=2)
    torch.manual_seed(0)
    model = build_model(config).train()
    for p in model.parameters():  # zero-initialised output convs would give zero gradients upstream
        torch.nn.init.normal_(p, std=0.05)
    x, t, cond = torch.randn(2, 3, 16, 16), torch.tensor([10, 500]), torch.randn(2, 3, 256, 256)

    def grads(flag):
        model.decoder.grad_checkpointing = flag
        model.zero_grad()
        model(x, t, cond=cond).square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    for a, b in zip(grads(False), grads(True)):
        torch.testing.assert_close(a, b)
