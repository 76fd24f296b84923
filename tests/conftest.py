"""Test session setup shared by every test file.

The tests' tensors are small: one intra-op thread computes them as fast as two, and on a busy
machine OpenMP threads that wait on each other make small convolutions tens of times slower.

Without a GPU, the Triton kernels run in Triton's numpy interpreter. TRITON_INTERPRET is read when
`triton.jit` decorates a kernel, i.e. when `kernels` is first imported, so it is set here, before
any test module is collected. With a GPU it stays unset and the same tests run natively.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(1)
