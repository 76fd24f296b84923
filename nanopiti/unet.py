"""The GLIDE UNet: the decoder of PITI (paper section 3.2-3.3, Figure 2).

A guided-diffusion UNet whose attention blocks also attend to condition tokens. The condition
(GLIDE: text tokens from its transformer; PITI: the task encoder's tokens) enters in two ways:
  * the pooled token, projected by `transformer_proj`, is added to the timestep embedding, and
    so modulates every ResBlock through its scale-shift norm (FiLM);
  * the token sequence, projected by each attention block's `encoder_kv`, is prepended to the
    image tokens as extra keys and values.
The super-resolution variant concatenates the bilinearly upsampled low-res image to x_t.
The output has 6 channels: epsilon (eq. 3) and the learned-range variance values.
Parameter names equal those of the released GLIDE and PITI checkpoints.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .ops import attention, group_norm_act

def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: [cos(t f_i), sin(t f_i)]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

def zero_module(module):
    """Zero a layer's parameters (guided-diffusion's zero_module): a new block starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module

class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32, with the following FiLM and SiLU fused in (`ops.group_norm_act`)."""

    def __init__(self, channels: int, silu: bool, groups: int = 32):
        super().__init__(groups, channels)
        self.silu = silu

    def forward(self, x, scale=None, shift=None):
        return group_norm_act(x, self, scale, shift, self.silu)

class ResBlock(nn.Module):
    """norm-SiLU-conv, then norm with the timestep/condition FiLM (scale-shift), SiLU, conv; plus skip. `up`/`down`
    resample (nearest x2 / average-pool /2) both paths after the first norm (GLIDE's resblock_updown)."""

    def __init__(self, channels, emb_channels, out_channels, up=False, down=False, norm_groups=32):
        super().__init__()
        # GLIDE's module indices (in_layers.0/.2, out_layers.0/.3), for its checkpoints; the slots of the SiLUs
        # (fused into the norms) and of dropout (0 in every released model) hold Identity.
        self.in_layers = nn.Sequential(GroupNorm32(channels, True, norm_groups), nn.Identity(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.up, self.down = up, down
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels))  # scale and shift
        self.out_layers = nn.Sequential(GroupNorm32(out_channels, True, norm_groups), nn.Identity(), nn.Identity(),
                                        zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb):
        h = self.in_layers[0](x)
        if self.up:
            h, x = F.interpolate(h, scale_factor=2, mode="nearest"), F.interpolate(x, scale_factor=2, mode="nearest")
        elif self.down:
            h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
        h = self.in_layers[2](h)
        scale, shift = self.emb_layers(emb).type(h.dtype).chunk(2, dim=1)
        h = self.out_layers[3](self.out_layers[0](h, scale, shift))
        return self.skip_connection(x) + h

class AttentionBlock(nn.Module):
    """Self-attention over the image tokens, the condition tokens prepended to keys and values. GLIDE's layout:
    qkv's channels grouped per head as [q | k | v], `encoder_kv`'s as [k | v]."""

    def __init__(self, channels, num_head_channels, encoder_channels, norm_groups):
        super().__init__()
        self.num_heads = channels // num_head_channels
        self.norm = GroupNorm32(channels, False, norm_groups)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.encoder_kv = nn.Conv1d(encoder_channels, 2 * channels, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x, tokens):
        b, c, *spatial = x.shape
        heads, d = self.num_heads, c // self.num_heads
        qkv = self.qkv(self.norm(x).view(b, c, -1))  # (B, 3C, L)
        q, k, v = qkv.view(b, heads, 3 * d, -1).split(d, dim=2)  # each (B, H, D, L)
        ek, ev = self.encoder_kv(tokens).view(b, heads, 2 * d, -1).split(d, dim=2)
        k, v = torch.cat([ek, k], dim=-1), torch.cat([ev, v], dim=-1)
        h = attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))  # (B, H, L, D)
        h = h.transpose(-1, -2).reshape(b, c, -1)
        return x + self.proj_out(h).view(b, c, *spatial)

class TimestepSequential(nn.Sequential):
    """A sequence of layers, each given what it needs: ResBlocks the embedding, attention the tokens."""

    def forward(self, h, emb, tokens):
        for layer in self:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            elif isinstance(layer, AttentionBlock):
                h = layer(h, tokens)
            else:
                h = layer(h)
        return h

class UNet(nn.Module):
    """GLIDE's UNetModel with use_scale_shift_norm, resblock_updown and dropout 0, as every released model.
    cond_width: the condition's width (`transformer_proj`, `encoder_kv`); attention_ds: downsampling factors with
    attention ((2, 4, 8): at 32, 16, 8 in a 64x64 model); super_res: x_t comes with a low-res image."""

    def __init__(self, cond_width, super_res=False, model_channels=192, num_res_blocks=3, attention_ds=(2, 4, 8),
                 channel_mult=(1, 2, 3, 4), num_head_channels=64, grad_checkpointing=False, norm_groups=32):
        super().__init__()
        self.model_channels, self.super_res, self.grad_checkpointing = model_channels, super_res, grad_checkpointing
        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        def res(ch_in, ch_out, **kw):
            return ResBlock(ch_in, emb_dim, ch_out, norm_groups=norm_groups, **kw)
        def attn(ch):
            return AttentionBlock(ch, num_head_channels, cond_width, norm_groups)
        ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([TimestepSequential(nn.Conv2d(6 if super_res else 3, ch, 3, padding=1))])
        skip_chans, ds = [ch], 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attention_ds:
                    layers.append(attn(ch))
                self.input_blocks.append(TimestepSequential(*layers))
                skip_chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepSequential(res(ch, ch, down=True)))
                skip_chans.append(ch)
                ds *= 2
        self.middle_block = TimestepSequential(res(ch, ch), attn(ch), res(ch, ch))
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), int(model_channels * mult))]
                ch = int(model_channels * mult)
                if ds in attention_ds:
                    layers.append(attn(ch))
                if level and i == num_res_blocks:
                    layers.append(res(ch, ch, up=True))
                    ds //= 2
                self.output_blocks.append(TimestepSequential(*layers))
        self.out = nn.Sequential(GroupNorm32(ch, True, norm_groups), nn.Identity(),
                                 zero_module(nn.Conv2d(ch, 6, 3, padding=1)))  # epsilon, variance values
        self.transformer_proj = nn.Linear(cond_width, emb_dim)

    def _run(self, block, h, emb, tokens):
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, emb, tokens, use_reentrant=False)
        return block(h, emb, tokens)

    def forward(self, x, timesteps, pooled, tokens, low_res=None):
        """x (B, 3, H, W) noisy image, timesteps (B,) as the network sees them, the encoder's output
        pooled (B, W) and tokens (B, W, L), low_res (B, 3, h, w) for super-res."""
        if self.super_res:
            x = torch.cat([x, F.interpolate(low_res, x.shape[-2:], mode="bilinear", align_corners=False)], dim=1)
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        emb = emb + self.transformer_proj(pooled).to(emb)
        h, skips = x, []
        for block in self.input_blocks:
            h = self._run(block, h, emb, tokens)
            skips.append(h)
        h = self._run(self.middle_block, h, emb, tokens)
        for block in self.output_blocks:
            h = self._run(block, torch.cat([h, skips.pop()], dim=1), emb, tokens)
        return self.out[2](self.out[0](h))
