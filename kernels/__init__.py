"""Triton kernels for the UNet hot paths: flash attention and fused GroupNorm(+FiLM)+SiLU.

    kernels.attention(q, k, v)                            kernels/attention.py
    kernels.groupnorm_silu(x, weight, bias, num_groups, eps=1e-5, scale=None, shift=None, silu=True)
                                                          kernels/groupnorm_silu.py
    kernels.kernels_available(tensor) -> bool             whether to take the kernel path

nanopiti/ops.py, the readable PyTorch reference, dispatches here when `kernels_available(x)` (see there); the
CPU path of NANOPITI_KERNELS=1 needs TRITON_INTERPRET=1 set before `kernels` is imported.
"""

import os

try:
    import triton  # noqa: F401
    _HAVE_TRITON = True
except ImportError:
    _HAVE_TRITON = False

if _HAVE_TRITON:
    from .attention import attention
    from .groupnorm_silu import groupnorm_silu
else:
    def attention(q, k, v):
        raise ImportError("kernels.attention needs Triton (pip install triton); use the PyTorch path instead")

    def groupnorm_silu(x, weight, bias, num_groups, eps=1e-5, scale=None, shift=None, silu=True):
        raise ImportError("kernels.groupnorm_silu needs Triton (pip install triton); use the PyTorch path instead")

def kernels_available(tensor):
    """True when the Triton kernels should handle `tensor` (see the module docstring)."""
    mode = os.environ.get("NANOPITI_KERNELS", "")
    return mode != "0" and _HAVE_TRITON and (tensor.is_cuda or mode == "1")

__all__ = ["attention", "groupnorm_silu", "kernels_available"]
