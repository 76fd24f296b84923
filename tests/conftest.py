"""Test session setup shared by every test file.

Without a GPU, the Triton kernels run in Triton's numpy interpreter. TRITON_INTERPRET is read when
`triton.jit` decorates a kernel, i.e. when `kernels` is first imported, so it is set here, before
any test module is collected. With a GPU it stays unset and the same tests run natively.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
