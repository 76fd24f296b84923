"""The upsampler's extra losses: the PatchGAN discriminator with its GAN losses (eq. 5) and the
VGG19 perceptual loss (eq. 4)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nanopiti.disc import PatchDiscriminator, discriminator_loss, generator_loss
from nanopiti.perceptual import PerceptualError, VGGPerceptual, vgg19_features

# torchvision's vgg19().features: the index of every conv and its (out, in) channels.
VGG19_CONVS = {0: (64, 3), 2: (64, 64), 5: (128, 64), 7: (128, 128), 10: (256, 128), 12: (256, 256),
               14: (256, 256), 16: (256, 256), 19: (512, 256), 21: (512, 512), 23: (512, 512),
               25: (512, 512), 28: (512, 512), 30: (512, 512), 32: (512, 512), 34: (512, 512)}


def test_patchgan_size_and_output():
    d = PatchDiscriminator()
    # pix2pix's default discriminator (n_layers_D = 3, ndf = 64) has 2.765 M parameters.
    assert sum(p.numel() for p in d.parameters()) == 2_764_737
    assert d(torch.randn(2, 3, 256, 256)).shape == (2, 1, 30, 30)
    assert d(torch.randn(1, 3, 64, 64)).shape == (1, 1, 6, 6)


def test_patchgan_sees_70x70_patches():
    d = PatchDiscriminator()
    # InstanceNorm's statistics see the whole image; without them each score sees one patch.
    d.model = nn.Sequential(*[nn.Identity() if isinstance(m, nn.InstanceNorm2d) else m for m in d.model])
    x = torch.randn(1, 3, 128, 128, requires_grad=True)
    d(x)[0, 0, 7, 7].backward()
    rows, cols = (x.grad[0].abs().sum(0) > 0).nonzero().unbind(1)
    assert rows.max() - rows.min() + 1 == 70 and cols.max() - cols.min() + 1 == 70


class LinearCritic(nn.Module):
    """D(x) = <a, x> as one patch score: its input gradient is `a` everywhere."""

    def __init__(self, a):
        super().__init__()
        self.a = nn.Parameter(a)

    def forward(self, x):
        return (x * self.a).sum(dim=(1, 2, 3)).view(-1, 1, 1, 1)


def test_wgan_gp_loss_value():
    torch.manual_seed(0)
    a = torch.randn(3, 4, 4)
    d = LinearCritic(a)
    real, fake, mix = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4), torch.rand(5)
    loss = discriminator_loss(d, real, fake, "wgan-gp", mix)
    expected = (fake * a).sum((1, 2, 3)).mean() - (real * a).sum((1, 2, 3)).mean() + 10 * (a.norm() - 1) ** 2
    assert torch.allclose(loss, expected, rtol=1e-5)
    loss.backward()  # the penalty is differentiable in the critic's weights (double backward)
    expected_grad = ((fake - real).mean(0) + 20 * (a.norm() - 1) * a / a.norm())
    assert torch.allclose(d.a.grad, expected_grad, rtol=1e-4, atol=1e-5)


def test_hinge_loss_value():
    d = LinearCritic(torch.ones(1, 1, 1))
    real, fake = torch.tensor([2.0, 0.5]).view(2, 1, 1, 1), torch.tensor([-3.0, 0.25]).view(2, 1, 1, 1)
    # relu(1 - D(real)) = [0, 0.5], relu(1 + D(fake)) = [0, 1.25]
    assert discriminator_loss(d, real, fake, "hinge").item() == pytest.approx(0.25 + 0.625)
    with pytest.raises(ValueError, match="unknown GAN loss"):
        discriminator_loss(d, real, fake, "lsgan")


def test_generator_loss_reaches_the_generator_only():
    d = PatchDiscriminator().requires_grad_(False)
    fake = torch.randn(2, 3, 64, 64, requires_grad=True)
    loss = generator_loss(d, fake)
    assert loss.shape == (2,)
    assert torch.allclose(loss, -d(fake).mean(dim=(1, 2, 3)))
    loss.sum().backward()
    assert fake.grad.abs().sum() > 0 and all(p.grad is None for p in d.parameters())


def test_critic_learns_to_separate():
    torch.manual_seed(0)
    d = PatchDiscriminator(width=16)
    opt = torch.optim.Adam(d.parameters(), lr=1e-3)
    real = torch.linspace(-1, 1, 32).view(1, 1, 1, 32).expand(4, 3, 32, 32)  # smooth ramps
    fake = torch.rand(4, 3, 32, 32) * 2 - 1  # noise
    gap = lambda: (d(real).mean() - d(fake).mean()).item()  # noqa: E731
    before = gap()
    for _ in range(15):
        opt.zero_grad()
        discriminator_loss(d, real, fake, "wgan-gp", torch.rand(4)).backward()
        opt.step()
    assert gap() > before + 1.0


def test_vgg19_layout_matches_torchvision():
    state = vgg19_features().state_dict()
    expected = {}
    for i, (out, inp) in VGG19_CONVS.items():
        expected[f"{i}.weight"], expected[f"{i}.bias"] = (out, inp, 3, 3), (out,)
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    assert sum(v.numel() for v in state.values()) == 20_024_384  # vgg19 minus its classifier
    assert len(vgg19_features()) == 37


def test_vgg_weights_load_from_a_torchvision_file(tmp_path):
    torch.manual_seed(0)
    full = {f"features.{k}": torch.randn(v.shape) for k, v in vgg19_features().state_dict().items()}
    full["classifier.6.bias"] = torch.zeros(1000)  # the rest of the file is ignored
    torch.save(full, tmp_path / "vgg19-dcbccd4d.pth")
    vgg = VGGPerceptual(str(tmp_path / "vgg19-dcbccd4d.pth"))
    assert len(vgg.features) == 8  # up to conv2_2, PITI's choice
    assert torch.equal(vgg.features[7].weight, full["features.7.weight"])
    assert not any(p.requires_grad for p in vgg.parameters())
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(PerceptualError, match="not torchvision's VGG19"):
        VGGPerceptual(str(tmp_path / "other.pth"))
    with pytest.raises(PerceptualError, match="no such"):
        VGGPerceptual(str(tmp_path / "missing.pth"))
    with pytest.raises(PerceptualError, match="needs VGG19 weights"):
        VGGPerceptual()


def test_perceptual_loss_equals_a_direct_computation():
    with pytest.warns(UserWarning, match="RANDOM"):
        vgg = VGGPerceptual(allow_random=True)
    with pytest.warns(UserWarning):
        assert all(torch.equal(a, b) for a, b in zip(vgg.parameters(), VGGPerceptual(allow_random=True).parameters()))
    torch.manual_seed(1)
    pred = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_(True)
    target = torch.rand(2, 3, 32, 32) * 2 - 1
    w = {i: (vgg.features[i].weight, vgg.features[i].bias) for i in (0, 2, 5, 7)}

    def phi(x):  # conv1_1 relu conv1_2 relu pool conv2_1 relu conv2_2, on ImageNet-normalized [0, 1]
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        h = ((x + 1) / 2 - mean) / std
        h = F.relu(F.conv2d(h, *w[0], padding=1))
        h = F.max_pool2d(F.relu(F.conv2d(h, *w[2], padding=1)), 2)
        h = F.relu(F.conv2d(h, *w[5], padding=1))
        return F.conv2d(h, *w[7], padding=1)

    loss = vgg(pred, target)
    assert loss.shape == (2,)
    assert torch.allclose(loss, ((phi(pred) - phi(target)) ** 2).mean(dim=(1, 2, 3)), rtol=1e-5)
    assert torch.all(vgg(target, target) == 0)
    loss.sum().backward()
    assert pred.grad.abs().sum() > 0
