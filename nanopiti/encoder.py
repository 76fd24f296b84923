"""The encoders that map a condition into the decoder's token space (paper section 3.3, Figure 2).

* `Transformer`: the CLIP-style transformer that both GLIDE's text encoder and PITI's task
  encoder use (pre-LayerNorm residual blocks, fp32 LayerNorm, GELU MLP, no causal mask).
* `ConditionEncoder`: PITI's task-specific head E_i, the only part trained in stage 1. A small CNN turns a 256x256
  condition (mask: 3 channels, sketch: 1, depth+normal: 6) into 16x16 512-d features (toy models: `PatchStem`),
  which with a cls token and learned positions go through the transformer: the cls output is the pooled latent
  (added to the timestep embedding), the 256 other tokens the sequence the UNet attends to.
* `add_text_encoder` / `encode_text`: GLIDE's text encoder for pretraining; the last token's output is pooled.

Both return (pooled (B, W), tokens (B, W, L)), the encoder's output that `nanopiti.unet.UNet` takes.
"""

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ops import attention

class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input dtype, as GLIDE does."""

    def forward(self, x):
        return super().forward(x.float()).to(x.dtype)

class MultiheadAttention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.c_qkv = nn.Linear(width, 3 * width)
        self.c_proj = nn.Linear(width, width)

    def forward(self, x):
        b, n, w = x.shape
        # GLIDE's layout: the qkv features are grouped per head as [q | k | v].
        qkv = self.c_qkv(x).view(b, n, self.heads, -1).transpose(1, 2)  # (B, H, N, 3D)
        q, k, v = qkv.split(w // self.heads, dim=-1)
        return self.c_proj(attention(q, k, v).transpose(1, 2).reshape(b, n, w))

class ResidualAttentionBlock(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.attn = MultiheadAttention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=nn.GELU(),
                                             c_proj=nn.Linear(4 * width, width)))
        self.ln_2 = LayerNorm(width)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))

class Transformer(nn.Module):
    def __init__(self, width, layers, heads):
        super().__init__()
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x):
        return self.resblocks(x)

class ConditionCNN(nn.Module):
    """7x7 conv then four stride-2 3x3 convs (InstanceNorm + LeakyReLU), then a 3x3 conv: 256 -> 16.
    PITI's width is 512; smaller models (the toy world) narrow the last two convs."""

    def __init__(self, in_channels, width=512):
        super().__init__()
        widths = [in_channels, 32, 64, 128, 256, width]
        for i in range(1, 6):
            kernel, stride = (7, 1) if i == 1 else (3, 2)
            setattr(self, f"conv{i}", nn.Conv2d(widths[i - 1], widths[i], kernel, stride, padding=kernel // 2))
            setattr(self, f"norm{i}", nn.InstanceNorm2d(widths[i], affine=True))
        self.conv6 = nn.Conv2d(width, width, 3, 1, padding=1)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x):
        for i in range(1, 6):
            x = self.act(getattr(self, f"norm{i}")(getattr(self, f"conv{i}")(x)))
        return self.conv6(x)

class PatchStem(nn.Module):
    """The toy world's stem in place of ConditionCNN: each 16x16 patch as the means of its grid x grid sub-patches
    (grid 1: the patch's mean), as (mean - shift) * scale, projected by a 1x1 conv. With a fresh ConditionCNN the toy
    models ignored their masks on a CPU budget, with patch means they use them within a few hundred steps
    (docs/results.md, "A patch stem for the toy encoder"). The sketch's distance field varies little within a toy
    scene, so its stem keeps a 4x4 grid and standardizes (docs/results.md, "Sketch and depth")."""

    def __init__(self, in_channels, width, grid=1, shift=0.0, scale=1.0):
        super().__init__()
        self.grid, self.shift, self.scale = grid, shift, scale
        self.conv1 = nn.Conv2d(in_channels * grid * grid, width, 1)

    def forward(self, x):
        means = F.avg_pool2d(x, 16 // self.grid)  # (B, C, H/16 * grid, W/16 * grid): one mean per sub-patch
        return self.conv1(F.pixel_unshuffle((means - self.shift) * self.scale, self.grid))  # a token's grid, stacked

class ConditionEncoder(nn.Module):
    """PITI's task encoder E_i; stem="patch" puts the toy world's `PatchStem` in place of the CNN."""

    def __init__(self, in_channels=3, width=512, layers=8, heads=8, cond_size=256, stem="cnn", patch_grid=1,
                 patch_norm=(0.0, 1.0)):
        super().__init__()
        self.transformer = Transformer(width, layers, heads)
        self.cnn = ConditionCNN(in_channels, width) if stem == "cnn" else PatchStem(in_channels, width, patch_grid,
                                                                                     *patch_norm)
        self.final_ln = LayerNorm(width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        tokens = (cond_size // 16) ** 2  # the CNN downsamples 16x: 256 tokens for PITI's 256x256 input
        self.positional_embedding = nn.Parameter(torch.randn(1, tokens + 1, width) * 0.01)
        if stem == "patch":
            self.toy_init(cond_size // 16)

    @torch.no_grad()
    def toy_init(self, n):
        """The toy encoder's start, on an n x n token grid: 2D sinusoid positions of std 1 and zero residual
        projections (the transformer starts as the identity). With PITI's init the decoder learned which classes a
        mask holds but never where (docs/results.md, "Why the toy ignored the layout")."""
        width = self.positional_embedding.shape[-1]
        angle = torch.linspace(0, torch.pi, n)[:, None] * torch.arange(1, width // 4 + 1)  # (n, width/4)
        wave = torch.cat([angle.sin(), angle.cos()], 1)  # (n, width/2): one coordinate's code
        # token (i, j): the row's code, then the column's (raster order, as the stem's tokens)
        grid = torch.cat([wave[:, None].expand(n, n, -1), wave[None].expand(n, n, -1)], -1).reshape(n * n, width)
        self.positional_embedding[0, 1:] = grid / grid.std()
        for block in self.transformer.resblocks:
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                nn.init.zeros_(proj.weight)
                nn.init.zeros_(proj.bias)

    def forward(self, cond):
        x = self.cnn(cond).flatten(2).transpose(1, 2) + self.positional_embedding[:, 1:]  # (B, 256, W) for 256x256
        # PITI appends the cls token at the end (with position 0), so it plays the role of
        # GLIDE's last text token, whose output is the pooled latent.
        cls = (self.cls_token + self.positional_embedding[:, :1]).expand(x.shape[0], -1, -1)
        x = self.final_ln(self.transformer(torch.cat([x, cls], dim=1)))
        return x[:, -1], x[:, :-1].transpose(1, 2)

def add_text_encoder(module, text_ctx=128, width=512, layers=16, heads=8, n_vocab=50257, final_ln=True, padding=True):
    """Give `module` GLIDE's text encoder (embeddings, transformer, final LayerNorm), attached to the model itself
    as GLIDE's checkpoints store it beside the UNet's parameters."""
    module.transformer = Transformer(width, layers, heads)
    module.final_ln = LayerNorm(width) if final_ln else None
    module.token_embedding = nn.Embedding(n_vocab, width)
    module.positional_embedding = nn.Parameter(torch.randn(text_ctx, width) * 0.01)
    module.padding_embedding = nn.Parameter(torch.randn(text_ctx, width) * 0.01) if padding else None

def encode_text(module, text, text_mask):
    """Run `add_text_encoder`'s encoder on token ids text (B, text_ctx), text_mask (B, text_ctx) False at padding."""
    x = module.token_embedding(text.long()) + module.positional_embedding[None]
    if module.padding_embedding is not None:
        x = torch.where(text_mask[..., None], x, module.padding_embedding[None])
    x = module.transformer(x)
    if module.final_ln is not None:
        x = module.final_ln(x)
    return x[:, -1], x.transpose(1, 2)
