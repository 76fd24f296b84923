"""Loader for kernels/groupnorm_silu.cu, the hand-written CUDA twin of the Triton GroupNorm forward.

The extension is compiled with nvcc and ninja the first time it is used (about a minute; the
build is cached under ~/.cache/torch_extensions), which is what torch.utils.cpp_extension.load
is for. It is a lesson and a benchmark baseline, not a dependency: the model uses the Triton path.
"""

import functools
import shutil
from pathlib import Path

import torch


def cuda_ext_available():
    """True where the extension can be built and run: a CUDA build of PyTorch, a GPU, and nvcc."""
    from torch.utils.cpp_extension import CUDA_HOME
    return torch.cuda.is_available() and torch.version.cuda is not None and (
        CUDA_HOME is not None or shutil.which("nvcc") is not None)


@functools.cache
def _extension():
    from torch.utils.cpp_extension import load
    source = Path(__file__).with_name("groupnorm_silu.cu")
    return load(name="nanopiti_groupnorm_silu", sources=[str(source)], extra_cuda_cflags=["-O3"], verbose=False)


def groupnorm_silu_cuda(x, weight, bias, num_groups, eps=1e-5, scale=None, shift=None, silu=True):
    """Forward of kernels.groupnorm_silu (same arguments, no autograd), computed by the CUDA kernels."""
    B, C = x.shape[:2]
    film = [None if t is None else t.reshape(B, C).float().contiguous() for t in (scale, shift)]
    y = _extension().forward(x.reshape(B, C, -1).contiguous(), weight.float().contiguous(),
                             bias.float().contiguous(), film[0], film[1], num_groups, eps, silu)
    return y.view(x.shape)
