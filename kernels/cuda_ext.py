"""Loader for kernels/groupnorm_silu.cu, the hand-written CUDA twin of the Triton GroupNorm forward.

The extension is compiled with nvcc and ninja the first time it is used (about a minute; the
build is cached under ~/.cache/torch_extensions), which is what torch.utils.cpp_extension.load
is for. It is a lesson and a benchmark baseline, not a dependency: the model uses the Triton path.
"""

import functools
import shutil
import subprocess
import sysconfig
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("groupnorm_silu.cu")
# Generated when PyTorch is built with CUDA, so a CPU wheel lacks it; the one definition it holds:
CUDA_CMAKE_MACROS = "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n"

def find_nvcc():
    """The path of nvcc (on PATH, or under PyTorch's idea of CUDA_HOME), or None."""
    from torch.utils.cpp_extension import CUDA_HOME
    in_cuda_home = CUDA_HOME and Path(CUDA_HOME) / "bin" / "nvcc"
    return shutil.which("nvcc") or (str(in_cuda_home) if in_cuda_home and in_cuda_home.exists() else None)

def cuda_ext_available():
    """True where the extension can be built and run: a CUDA build of PyTorch, a GPU, and nvcc."""
    return torch.cuda.is_available() and torch.version.cuda is not None and find_nvcc() is not None

@functools.cache
def _extension():
    from torch.utils.cpp_extension import load
    return load(name="nanopiti_groupnorm_silu", sources=[str(SOURCE)], extra_cuda_cflags=["-O3"], verbose=False)

def groupnorm_silu_cuda(x, weight, bias, num_groups, eps=1e-5, scale=None, shift=None, silu=True):
    """Forward of kernels.groupnorm_silu (same arguments, no autograd), computed by the CUDA kernels."""
    B, C = x.shape[:2]
    film = [None if t is None else t.reshape(B, C).float().contiguous() for t in (scale, shift)]
    y = _extension().forward(x.reshape(B, C, -1).contiguous(), weight.float().contiguous(),
                             bias.float().contiguous(), film[0], film[1], num_groups, eps, silu)
    return y.view(x.shape)

def nvcc_compile(output, arch="sm_90"):
    """Compile groupnorm_silu.cu into the object file `output` with nvcc alone: no GPU, no linking.

    This checks the CUDA source against this PyTorch's headers on any machine with nvcc, CPU-only
    ones included. A CPU build of PyTorch lacks one generated header; a stand-in is written next to
    `output`. Returns the finished subprocess (returncode, stdout, stderr).
    """
    from torch.utils.cpp_extension import include_paths
    includes = include_paths() + [sysconfig.get_paths()["include"]]
    if not (Path(includes[0]) / "c10/cuda/impl/cuda_cmake_macros.h").exists():
        stub = Path(output).parent / "include"
        (stub / "c10/cuda/impl").mkdir(parents=True, exist_ok=True)
        (stub / "c10/cuda/impl/cuda_cmake_macros.h").write_text(CUDA_CMAKE_MACROS)
        includes.insert(0, str(stub))
    command = [find_nvcc(), "-c", str(SOURCE), "-o", str(output), f"-arch={arch}", "-std=c++20", "--expt-relaxed-constexpr",
               "-Xcompiler", "-fPIC", "-DTORCH_EXTENSION_NAME=nanopiti_groupnorm_silu",
               f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", *(f"-I{p}" for p in includes)]
    return subprocess.run(command, capture_output=True, text=True)
