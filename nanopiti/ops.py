"""The networks' two hot paths, each a readable PyTorch reference that dispatches to the fused Triton
kernel of `kernels/` (issue 3):

* `attention(q, k, v)`: softmax(q k^T / sqrt(d)) v, used by the UNet's attention blocks (image
  tokens attending to condition tokens + image tokens) and by the encoders' transformers.
* `group_norm_act(x, norm, scale, shift, silu)`: GroupNorm computed in fp32 as GLIDE does, the
  optional FiLM `h * (1 + scale) + shift` of the scale-shift ResBlocks, the optional SiLU.

The kernels run when the tensor is on CUDA and Triton imports. `NANOPITI_KERNELS=0` forces PyTorch;
`NANOPITI_KERNELS=1` the kernels even on the CPU (with `TRITON_INTERPRET=1`: how the tests check the wiring).
"""

import math

import torch
import torch.nn.functional as F

try:  # the kernels need Triton; without it everything runs on the PyTorch path
    import kernels as _kernels
except ImportError:  # pragma: no cover - depends on the installation
    _kernels = None

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # autocast precisions
KERNEL_HEAD_DIMS = (32, 64, 128)  # what the flash-attention kernel is compiled for

def use_kernels(t: torch.Tensor) -> bool:
    return _kernels is not None and _kernels.kernels_available(t)

def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q (B, H, Lq, D), k and v (B, H, Lk, D) -> (B, H, Lq, D)."""
    if q.shape[-1] in KERNEL_HEAD_DIMS and use_kernels(q):
        return _kernels.attention(q, k, v)
    # GLIDE scales q and k by d^-1/4 each before the product: the same result as dividing the
    # logits by sqrt(d), but the products stay smaller, which fp16 likes.
    scale = 1.0 / math.sqrt(math.sqrt(q.shape[-1]))
    weight = torch.einsum("bhtd,bhsd->bhts", q * scale, k * scale)
    weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
    return torch.einsum("bhts,bhsd->bhtd", weight, v)

def group_norm_act(x, norm, scale=None, shift=None, silu=True):
    """GroupNorm `norm` (an nn.GroupNorm) on x (B, C, ...), then FiLM with scale/shift (B, C), then SiLU."""
    if use_kernels(x):
        return _kernels.groupnorm_silu(x, norm.weight, norm.bias, norm.num_groups, norm.eps,
                                       scale=scale, shift=shift, silu=silu)
    h = F.group_norm(x.float(), norm.num_groups, norm.weight, norm.bias, norm.eps).to(x.dtype)
    if scale is not None:
        extra = (1,) * (x.dim() - 2)
        h = h * (1 + scale.view(*scale.shape, *extra)) + shift.view(*shift.shape, *extra)
    return F.silu(h) if silu else h
