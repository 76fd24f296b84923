"""Flash attention in Triton: softmax(q k^T / sqrt(D)) v without the Lq x Lk matrix in memory.

Shapes: q is (B, H, Lq, D), k and v are (B, H, Lk, D); Lq and Lk are arbitrary (the tails of the
last blocks are masked), D is 32, 64 or 128. Inputs are fp32, fp16 or bf16; every matmul
accumulates in fp32. There is no causal mask: the UNet's attention is bidirectional (image tokens
attend to the 256 condition tokens and to each other).

Forward (Dao et al., FlashAttention-2): a program owns BLOCK_M query rows and streams the keys and
values through SRAM in blocks of BLOCK_N, keeping the running row max m, the running denominator l
and the unnormalised output acc ("online softmax"). For a new block of scores s:

    m' = max(m, rowmax(s))      l' = l * 2^(m - m') + rowsum(2^(s - m'))
    acc' = acc * 2^(m - m') + 2^(s - m') v

We work in base 2 (exp2 is one instruction; the scores are pre-multiplied by log2(e)). It stores
o = acc / l and the log-sum-exp lse = m + log2(l) of every row, which is all the backward needs.

Backward: with P = softmax(S) recomputed from lse (P = 2^(S - lse)), dO the incoming gradient and
delta = rowsum(dO * O) (computed by a small preprocessing kernel),

    dV = P^T dO      dP = dO V^T      dS = P * (dP - delta)      dQ = dS K / sqrt(D)      dK = dS^T Q / sqrt(D)

One kernel owns a block of keys and loops over all queries (dK, dV); a second one owns a block of
queries and loops over all keys (dQ). Recomputing P twice costs flops but needs no atomics, so the
gradients are deterministic (the same choice as the Triton tutorial's fused attention).
"""

import math
import os

import torch
import triton
import triton.language as tl

# Under TRITON_INTERPRET=1 (CPU tests) the kernels run in numpy, one program at a time: autotuning
# would multiply that cost, so the interpreter gets one small config per kernel.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
LOG2E = 1.4426950408889634

def _configs(gpu_configs, interpreter_config):
    entries = [interpreter_config] if INTERPRET else gpu_configs
    return [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn), num_warps=w, num_stages=s) for bm, bn, w, s in entries]

# (BLOCK_M, BLOCK_N, num_warps, num_stages), sm_90-oriented. The last, small config of each list is the one
# that fits shared memory for fp32 inputs with D = 128; the autotuner skips configs that do not fit.
_FWD_CONFIGS = _configs([(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 4), (64, 32, 4, 2)],
                        (32, 32, 4, 1))
_BWD_KV_CONFIGS = _configs([(32, 128, 4, 4), (64, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 2)], (32, 32, 4, 1))
_BWD_Q_CONFIGS = _configs([(128, 32, 4, 4), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2)], (32, 32, 4, 1))

# --- Forward ---

@triton.jit
def _head_ptrs(X, H, stride_b, stride_h, rows, stride_row, cols, stride_col):
    """Pointers to rows x cols of a strided (B, H, L, D) tensor, in the head bh = program_id(1) owns."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)  # int64: batch offsets of large tensors overflow int32
    h = (bh % H).to(tl.int64)
    return X + b * stride_b + h * stride_h + rows[:, None] * stride_row + cols[None, :] * stride_col

@triton.jit
def _attn_fwd_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n, Lk, qk_scale, stride_kn, stride_vn,
                    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, MASK: tl.constexpr):
    """Fold one block of BLOCK_N keys/values into the running (acc, l, m) of BLOCK_M query rows."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if MASK:  # only the last, partial block pays for bounds checks
        k = tl.load(k_ptrs + start_n * stride_kn, mask=(offs_n < Lk)[:, None], other=0.0)
        v = tl.load(v_ptrs + start_n * stride_vn, mask=(offs_n < Lk)[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs + start_n * stride_kn)
        v = tl.load(v_ptrs + start_n * stride_vn)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # scores in log2 units
    if MASK:
        s = tl.where((offs_n < Lk)[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)  # rescales what was accumulated under the old max
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, l_i, m_new

@triton.autotune(configs=_FWD_CONFIGS, key=["Lq", "Lk", "HEAD_DIM"])
@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, qk_scale,
                     stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                     stride_vb, stride_vh, stride_vn, stride_vd, H, Lq, Lk,
                     HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    bh = tl.program_id(1).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(_head_ptrs(Q, H, stride_qb, stride_qh, offs_m, stride_qm, offs_d, stride_qd),
                mask=(offs_m < Lq)[:, None], other=0.0)
    k_ptrs = _head_ptrs(K, H, stride_kb, stride_kh, offs_n, stride_kn, offs_d, stride_kd)
    v_ptrs = _head_ptrs(V, H, stride_vb, stride_vh, offs_n, stride_vn, offs_d, stride_vd)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    n_full = (Lk // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, l_i, m_i = _attn_fwd_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n, Lk, qk_scale,
                                        stride_kn, stride_vn, BLOCK_N, DOT_PRECISION, MASK=False)
    if n_full < Lk:
        acc, l_i, m_i = _attn_fwd_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, n_full, Lk, qk_scale,
                                        stride_kn, stride_vn, BLOCK_N, DOT_PRECISION, MASK=True)

    # O is allocated contiguous (B, H, Lq, D) and LSE as (B*H, Lq).
    o_ptrs = O + bh * Lq * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(o_ptrs, (acc / l_i[:, None]).to(O.dtype.element_ty), mask=(offs_m < Lq)[:, None])
    tl.store(LSE + bh * Lq + offs_m, m_i + tl.log2(l_i), mask=offs_m < Lq)

# --- Backward ---

@triton.jit
def _attn_bwd_preprocess_kernel(O, DO, Delta, Lq, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta_i = sum_d dO_id * O_id (both contiguous (B, H, Lq, D)); the softmax backward's row term."""
    bh = tl.program_id(1).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs = bh * Lq * HEAD_DIM + offs_m[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    mask = (offs_m < Lq)[:, None]
    o = tl.load(O + offs, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Delta + bh * Lq + offs_m, tl.sum(o * do, axis=1), mask=offs_m < Lq)

@triton.autotune(configs=_BWD_KV_CONFIGS, key=["Lq", "Lk", "HEAD_DIM"])
@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, Delta, DK, DV, qk_scale, sm_scale,
                          stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                          stride_vb, stride_vh, stride_vn, stride_vd, H, Lq, Lk,
                          HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """A program owns BLOCK_N keys and loops over every query block, accumulating dK and dV."""
    bh = tl.program_id(1).to(tl.int64)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_n = (offs_n < Lk)[:, None]
    k = tl.load(_head_ptrs(K, H, stride_kb, stride_kh, offs_n, stride_kn, offs_d, stride_kd), mask=mask_n, other=0.0)
    v = tl.load(_head_ptrs(V, H, stride_vb, stride_vh, offs_n, stride_vn, offs_d, stride_vd), mask=mask_n, other=0.0)
    q_ptrs = _head_ptrs(Q, H, stride_qb, stride_qh, offs_m, stride_qm, offs_d, stride_qd)
    do_ptrs = DO + bh * Lq * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for start_m in range(0, Lq, BLOCK_M):
        # Query rows past Lq load as zeros (q = dO = 0, lse = delta = 0): their P^T entries are 1,
        # but they multiply dO = 0 and Q = 0 below, so they add nothing to dK and dV.
        mask_m = (start_m + offs_m) < Lq
        q = tl.load(q_ptrs + start_m * stride_qm, mask=mask_m[:, None], other=0.0)
        do = tl.load(do_ptrs + start_m * HEAD_DIM, mask=mask_m[:, None], other=0.0)
        lse = tl.load(LSE + bh * Lq + start_m + offs_m, mask=mask_m, other=0.0)
        delta = tl.load(Delta + bh * Lq + start_m + offs_m, mask=mask_m, other=0.0)
        # Transposed layout (keys x queries) so every product below is a plain matmul.
        p_t = tl.exp2(tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale - lse[None, :])
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)

    # dK, dV are allocated contiguous (B, H, Lk, D).
    out = bh * Lk * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=mask_n)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=mask_n)

@triton.jit
def _attn_bwd_dq_block(dq, q, do, lse, delta, k_ptrs, v_ptrs, start_n, Lk, qk_scale, stride_kn, stride_vn,
                       BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, MASK: tl.constexpr):
    """Add one block of keys' contribution dS K to dq (BLOCK_M rows)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if MASK:
        k = tl.load(k_ptrs + start_n * stride_kn, mask=(offs_n < Lk)[:, None], other=0.0)
        v = tl.load(v_ptrs + start_n * stride_vn, mask=(offs_n < Lk)[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs + start_n * stride_kn)
        v = tl.load(v_ptrs + start_n * stride_vn)
    p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale - lse[:, None])
    if MASK:  # a padded key has score 0, so 2^(0 - lse) could be anything; zero it explicitly
        p = tl.where((offs_n < Lk)[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)

@triton.autotune(configs=_BWD_Q_CONFIGS, key=["Lq", "Lk", "HEAD_DIM"])
@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, Delta, DQ, qk_scale, sm_scale,
                        stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                        stride_vb, stride_vh, stride_vn, stride_vd, H, Lq, Lk,
                        HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """A program owns BLOCK_M queries and loops over every key block, accumulating dQ."""
    bh = tl.program_id(1).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < Lq
    q = tl.load(_head_ptrs(Q, H, stride_qb, stride_qh, offs_m, stride_qm, offs_d, stride_qd),
                mask=mask_m[:, None], other=0.0)
    rows = bh * Lq * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]  # dO, dQ: contiguous
    do = tl.load(DO + rows, mask=mask_m[:, None], other=0.0)
    lse = tl.load(LSE + bh * Lq + offs_m, mask=mask_m, other=0.0)
    delta = tl.load(Delta + bh * Lq + offs_m, mask=mask_m, other=0.0)
    k_ptrs = _head_ptrs(K, H, stride_kb, stride_kh, offs_n, stride_kn, offs_d, stride_kd)
    v_ptrs = _head_ptrs(V, H, stride_vb, stride_vh, offs_n, stride_vn, offs_d, stride_vd)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    n_full = (Lk // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        dq = _attn_bwd_dq_block(dq, q, do, lse, delta, k_ptrs, v_ptrs, start_n, Lk, qk_scale,
                                stride_kn, stride_vn, BLOCK_N, DOT_PRECISION, MASK=False)
    if n_full < Lk:
        dq = _attn_bwd_dq_block(dq, q, do, lse, delta, k_ptrs, v_ptrs, n_full, Lk, qk_scale,
                                stride_kn, stride_vn, BLOCK_N, DOT_PRECISION, MASK=True)
    tl.store(DQ + rows, (dq * sm_scale).to(DQ.dtype.element_ty), mask=mask_m[:, None])

# --- Python side ---

def _check_inputs(q, k, v):
    if q.dim() != 4 or k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3:] != q.shape[3:]:
        raise ValueError(f"attention expects q (B, H, Lq, D) and k, v (B, H, Lk, D), "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[3] not in (32, 64, 128):
        raise ValueError(f"attention: head size D={q.shape[3]} is not supported (use 32, 64 or 128)")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"attention: q, k, v must share one of fp32/fp16/bf16, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.is_cuda and not INTERPRET:
        raise ValueError("attention: Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before import)")

def _launch_args(q, k, v):
    """What every kernel takes after its tensors: (qk_scale, sm_scale), the strides and sizes; the constexprs."""
    sm_scale = 1.0 / math.sqrt(q.shape[3])
    sizes = (*q.stride(), *k.stride(), *v.stride(), q.shape[1], q.shape[2], k.shape[2])
    const = dict(HEAD_DIM=q.shape[3], DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    return (sm_scale * LOG2E, sm_scale), sizes, const

def _grid(length, block, heads):
    """One program per `block` (BLOCK_M or BLOCK_N, the autotuner's choice) rows of each of `heads` heads."""
    return lambda meta: (triton.cdiv(length, meta[block]), heads)

class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):
        _check_inputs(q, k, v)
        B, H, Lq, D = q.shape
        scales, sizes, const = _launch_args(q, k, v)
        o = q.new_empty((B, H, Lq, D))
        lse = q.new_empty((B * H, Lq), dtype=torch.float32)
        _attn_fwd_kernel[_grid(Lq, "BLOCK_M", B * H)](q, k, v, o, lse, scales[0], *sizes, **const)
        ctx.save_for_backward(q, k, v, o, lse)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        B, H, Lq, D = q.shape
        scales, sizes, const = _launch_args(q, k, v)
        do = do.contiguous()
        delta = torch.empty_like(lse)
        pre_block = 32 if INTERPRET else 128
        _attn_bwd_preprocess_kernel[(triton.cdiv(Lq, pre_block), B * H)](o, do, delta, Lq,
                                                                          HEAD_DIM=D, BLOCK_M=pre_block)
        dq, dk, dv = (t.new_empty(t.shape) for t in (q, k, v))
        shared = (*scales, *sizes)
        _attn_bwd_dkdv_kernel[_grid(k.shape[2], "BLOCK_N", B * H)](q, k, v, do, lse, delta, dk, dv, *shared, **const)
        _attn_bwd_dq_kernel[_grid(Lq, "BLOCK_M", B * H)](q, k, v, do, lse, delta, dq, *shared, **const)
        return dq, dk, dv

def attention(q, k, v):
    """softmax(q k^T / sqrt(D)) v for q (B, H, Lq, D) and k, v (B, H, Lk, D); differentiable.

    Returns a contiguous (B, H, Lq, D) tensor of q's dtype. q, k, v may be strided views (e.g. a
    transpose of a fused qkv projection): the kernels read them through their strides.
    """
    return _FlashAttention.apply(q, k, v)

def attention_reference(q, k, v):
    """The same computation in plain PyTorch (fp32 softmax), used by the tests and the benchmark."""
    scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) / math.sqrt(q.shape[-1])
    return torch.einsum("bhqk,bhkd->bhqd", scores.softmax(dim=-1), v.float()).to(q.dtype)
