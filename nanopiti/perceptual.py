"""The perceptual loss of PITI's upsampler (paper eq. 4) on VGG features of the predicted and the real x0:

    L_perc = || phi(x0_hat) - phi(x0) ||^2,   x0_hat = (x_t - sqrt(1 - abar_t) eps_theta) / sqrt(abar_t)

phi: VGG19's `features` up to conv2_2 (before its ReLU) on ImageNet-normalized [0, 1] images, the squared
difference averaged per sample, weight 0.004 (PITI). The layers carry torchvision's indices, so
`vgg19-dcbccd4d.pth` (https://download.pytorch.org/models/vgg19-dcbccd4d.pth) loads directly, without
torchvision. Random features (`allow_random=True`) allow offline toy runs, but are NOT the paper's loss.
"""

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

# VGG19: conv widths, "M" = 2x2 max-pool. Each conv is followed by a ReLU, so in torchvision's
# `features` Sequential conv i sits at an even offset: conv1_1 = 0, conv1_2 = 2, pool = 4, ...
VGG19 = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]
CONV2_2 = 8  # the number of `features` modules up to conv2_2, before its ReLU (PITI's conv_index '22')
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

class PerceptualError(ValueError):
    """VGG weights that are missing or do not fit."""

def vgg19_features(depth=None):
    """The first `depth` modules of torchvision's vgg19().features (all 37 by default)."""
    layers, in_ch = [], 3
    for v in VGG19:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(in_ch, v, 3, padding=1), nn.ReLU(inplace=True)]
            in_ch = v
    return nn.Sequential(*layers[:depth])

class VGGPerceptual(nn.Module):
    """Per-sample perceptual loss between images in [-1, 1]; frozen, always in eval mode. `weights`: torchvision's
    VGG19 file or state dict; without, `allow_random` takes random features (with a warning)."""

    def __init__(self, weights=None, allow_random=False):
        super().__init__()
        self.features = vgg19_features(CONV2_2)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        if weights is not None:
            self.load_weights(weights)
        elif allow_random:
            warnings.warn("perceptual loss with RANDOM VGG19 features: fine for offline toy runs, but not the "
                          "paper's loss; pass the ImageNet weights (vgg19-dcbccd4d.pth) for real training")
            generator = torch.Generator().manual_seed(0)  # the same random features in every run
            for m in self.features:
                if isinstance(m, nn.Conv2d):  # torchvision's init for VGG convs
                    std = (2.0 / (m.out_channels * 9)) ** 0.5
                    with torch.no_grad():
                        m.weight.copy_(torch.randn(m.weight.shape, generator=generator) * std)
                        m.bias.zero_()
        else:
            raise PerceptualError("the perceptual loss needs VGG19 weights (vgg19-dcbccd4d.pth: python -m "
                                  "nanopiti.download vgg19), or allow_random=True")
        self.requires_grad_(False)
        self.eval()

    def train(self, mode=True):  # a frozen feature extractor: never switch to training mode
        return super().train(False)

    def load_weights(self, weights):
        """Load the `features.*` entries of torchvision's VGG19 state dict (the rest is ignored)."""
        name = weights if isinstance(weights, str) else "state dict"
        if isinstance(weights, str):
            try:
                weights = torch.load(weights, map_location="cpu", weights_only=True)
            except FileNotFoundError:
                raise PerceptualError(f"{name}: no such VGG19 weights file") from None
            except Exception as e:
                raise PerceptualError(f"{name}: not a readable PyTorch weights file ({type(e).__name__})") from None
        if not isinstance(weights, dict):
            raise PerceptualError(f"{name}: holds a {type(weights).__name__}, not a VGG19 state dict")
        own = {f"features.{k}": v for k, v in self.features.state_dict().items()}
        missing = [k for k in own if k not in weights]
        wrong = [f"{k} {tuple(weights[k].shape)}" for k, v in own.items()
                 if k in weights and tuple(weights[k].shape) != tuple(v.shape)]
        if missing or wrong:
            raise PerceptualError(f"{name}: not torchvision's VGG19 weights (missing: {missing[:3]}, "
                                  f"wrong shapes: {wrong[:3]})")
        self.features.load_state_dict({k[len("features."):]: weights[k].float() for k in own})

    def features_of(self, x):
        return self.features(((x + 1) / 2 - self.mean) / self.std)

    def forward(self, pred, target):
        """pred (with gradients) and target, B x 3 x H x W in [-1, 1] -> (B,) mean squared
        feature difference; the target's features carry no gradient."""
        with torch.no_grad():
            target_features = self.features_of(target)
        return F.mse_loss(self.features_of(pred), target_features, reduction="none").mean(dim=(1, 2, 3))
