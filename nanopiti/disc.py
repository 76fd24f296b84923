"""PITI's upsampler's adversarial loss (paper eq. 5): a PatchGAN critic judges the predicted x0 against real images.

`PatchDiscriminator` is pix2pix's PatchGAN (Isola et al. 2017), the release's `NLayerDiscriminator`: one score per
70x70 patch (30x30 for a 256x256 image), a texture critic, as an upsampler needs (the low-res input fixes the
layout). PITI trains it as a WGAN-GP critic (Gulrajani et al. 2017), the default here (`loss="wgan-gp"`):

    critic:    L_D = E[D(fake)] - E[D(real)] + 10 E[(||grad_x D(x_mix)||_2 - 1)^2]
    generator: L_adv = -E[D(fake)]                      (per sample, weighted by 0.01 in eq. 5)

with x_mix a random per-sample mix of real and fake, one critic step per generator step, Adam at lr 1e-5: its
gradient does not vanish when the critic wins, and the penalty keeps the nudge to the pretrained model bounded.
`loss="hinge"` (Miyato et al. 2018; L_D = E[relu(1 - D(real))] + E[relu(1 + D(fake))]) is cheaper: it needs no
second backward pass through the critic.
"""

import torch
import torch.distributed as dist
import torch.nn as nn

GAN_LOSSES = ("wgan-gp", "hinge")

class PatchDiscriminator(nn.Module):
    """pix2pix's NLayerDiscriminator: 3 stride-2 layers then 2 stride-1 layers (70x70 patches)."""

    def __init__(self, in_channels=3, width=64, n_layers=3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        ch = width
        for n in range(1, n_layers + 1):
            out = width * min(2 ** n, 8)
            stride = 2 if n < n_layers else 1  # the last widening conv keeps the resolution
            layers += [nn.Conv2d(ch, out, 4, stride=stride, padding=1), nn.InstanceNorm2d(out), nn.LeakyReLU(0.2)]
            ch = out
        layers.append(nn.Conv2d(ch, 1, 4, stride=1, padding=1))
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        """x (B, 3, H, W) in [-1, 1] -> (B, 1, h, w) patch scores (higher = more real)."""
        return self.model(x)

def _check(loss):
    if loss not in GAN_LOSSES:
        raise ValueError(f"unknown GAN loss {loss!r}; use one of {', '.join(GAN_LOSSES)}")

def discriminator_loss(disc, real, fake, loss="wgan-gp", mix=None, gp_weight=10.0):
    """The critic's loss on one batch (a scalar); `fake` detached. mix: (B,) in [0, 1], x_mix's place on the
    line from fake to real (WGAN-GP only), drawn by the caller's generator so that training stays reproducible."""
    _check(loss)
    d_real, d_fake = disc(real), disc(fake)
    if loss == "hinge":
        return torch.relu(1 - d_real).mean() + torch.relu(1 + d_fake).mean()
    mix = mix.view(-1, 1, 1, 1).to(real)
    x_mix = (fake * (1 - mix) + real * mix).requires_grad_(True)
    grad, = torch.autograd.grad(disc(x_mix).sum(), x_mix, create_graph=True)
    penalty = (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()
    return d_fake.mean() - d_real.mean() + gp_weight * penalty

def generator_loss(disc, fake, loss="wgan-gp"):
    """The generator's adversarial loss, per sample (B,): minus the mean patch score of its fakes.
    (The same for both losses: hinge GANs also train the generator on -D(fake).)"""
    _check(loss)
    return -disc(fake).mean(dim=(1, 2, 3))

def critic_step(disc, opt, reals, fakes, loss_name, mixes, batch_size):
    """One critic step on this process's micro-batches (lists, together `batch_size` samples: the gradient is the
    batch mean); returns the summed loss. Gradients are averaged over processes by hand (DDP cannot wrap a network
    that WGAN-GP differentiates twice); a non-finite gradient skips the step."""
    disc.requires_grad_(True)
    total = 0.0
    for real, fake, mix in zip(reals, fakes, mixes):
        loss = discriminator_loss(disc, real, fake, loss_name, mix)
        (loss * len(fake) / batch_size).backward()
        total = total + loss.detach() * len(fake)
    grads = [p.grad for p in disc.parameters()]
    if dist.is_available() and dist.is_initialized():  # builds without torch.distributed lack is_initialized
        for g in grads:
            dist.all_reduce(g)
            g.div_(dist.get_world_size())
    if all(bool(torch.isfinite(g).all()) for g in grads):
        opt.step()
    opt.zero_grad(set_to_none=True)
    disc.requires_grad_(False)  # until the next critic step: the generator's loss must not train it
    return total
