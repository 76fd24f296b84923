"""Triton kernels for the UNet hot paths (see kernels/attention.py, kernels/groupnorm_silu.py)."""
