"""Fused GroupNorm -> FiLM -> SiLU in Triton, forward and backward.

For x of shape (B, C, *spatial), flattened to (B, C, N), with G groups of Cg = C / G channels:

    xhat = (x - mean_bg) * rstd_bg             statistics over the Cg * N elements of group g, in fp32
    h    = xhat * weight_c + bias_c            GroupNorm's affine
    f    = h * (1 + scale_bc) + shift_bc       optional FiLM (GLIDE's scale-shift ResBlock)
    y    = f * sigmoid(f)                      optional SiLU; y is stored in x's dtype

This replaces GLIDE's GroupNorm32 (GroupNorm computed in fp32 and cast back) followed by SiLU,
and in the scale-shift ResBlocks norm -> (1 + scale) * h + shift -> SiLU: eager PyTorch reads and
writes the activation once per op, the kernels here read it twice and write it once.

A row is one (b, c) pair, N contiguous elements. Groups can be large (C = 192 at 256 x 256 gives
6 * 65536 elements per group), so nothing assumes a group fits on chip:

1. `_gn_stats_kernel`: each program reduces a chunk of one row to (mean, M2), M2 being the sum of
   squared deviations; it sums x - x0 (x0 = the chunk's first element) rather than x, so that
   E[x^2] - E[x]^2 does not cancel catastrophically when |mean| >> std.
2. `_gn_apply_kernel`: each program merges its group's partials with Chan's parallel formula,
   folds normalisation, affine and FiLM into one multiply-add per element, f = (x - mean) * a + bf
   with per-row a = rstd * w * (1 + s) and bf = bias * (1 + s) + shift, and applies the SiLU.
   It walks the tensor back to front: the first kernel's last reads are still in L2 when it starts.

Backward, with df = dy * silu'(f) and the per-row sums S1 = sum_n df, S2 = sum_n df * xhat:

    dshift = S1      dscale = w * S2 + bias * S1      dweight = sum_b (1 + s) S2      dbias = sum_b (1 + s) S1
    dx = rstd * (a' df - mean_g(a' df) - xhat * mean_g(a' df xhat)),    a' = w * (1 + s)

3. `_gn_bwd_reduce_kernel` computes S1, S2 per chunk of a row; 4. `_gn_bwd_dx_kernel` merges them
per group and writes dx. The (B, C)-sized parameter gradients are finished in PyTorch.
"""

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

def _plan(N):
    """Elements per program step (BLOCK), steps per reduction chunk (ITERS), chunks per row (SN), programs
    per row (NB), warps."""
    # Under the interpreter small blocks keep numpy fast and make the tests cover several chunks.
    block = min(triton.next_power_of_2(N), 128 if INTERPRET else 2048)
    iters = min(2 if INTERPRET else 4, triton.cdiv(N, block))
    num_warps = min(8, max(1, block // 256))  # 8 elements (16 bytes of bf16) per thread at 2048
    return block, iters, triton.cdiv(N, block * iters), triton.cdiv(N, block), num_warps

@triton.jit
def _row_coefficients(W, Bias, Scale, Shift, b, c, stride_scale, stride_shift,
                      HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr):
    """f = xhat * af + bf for row (b, c): af = w (1 + s), bf = bias (1 + s) + shift."""
    af = tl.load(W + c).to(tl.float32)
    bf = tl.load(Bias + c).to(tl.float32)
    if HAS_SCALE:
        one_plus_s = 1.0 + tl.load(Scale + b * stride_scale + c).to(tl.float32)
        af = af * one_plus_s
        bf = bf * one_plus_s
    if HAS_SHIFT:
        bf = bf + tl.load(Shift + b * stride_shift + c).to(tl.float32)
    return af, bf

@triton.jit
def _load_row(X, row, offs, N):
    """Elements offs of row `row` of a contiguous (rows, N) tensor, in fp32 (zeros past N)."""
    return tl.load(X + row.to(tl.int64) * N + offs, mask=offs < N, other=0.0).to(tl.float32)

@triton.jit
def _gn_stats_kernel(X, PMean, PM2, N, SN, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    pid = tl.program_id(0)
    row = pid // SN
    start = (pid % SN) * BLOCK * ITERS
    x0 = tl.load(X + row.to(tl.int64) * N + start).to(tl.float32)
    s1 = tl.zeros([BLOCK], dtype=tl.float32)
    s2 = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(ITERS):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        d = tl.where(offs < N, _load_row(X, row, offs, N) - x0, 0.0)
        s1 += d
        s2 += d * d
    n = tl.minimum(N - start, BLOCK * ITERS).to(tl.float32)
    s1_total = tl.sum(s1, axis=0)
    tl.store(PMean + pid, x0 + s1_total / n)
    tl.store(PM2 + pid, tl.maximum(tl.sum(s2, axis=0) - s1_total * s1_total / n, 0.0))

@triton.jit
def _group_partials(P, b, g, C, Cg, SN, CG_BLOCK: tl.constexpr, SN_BLOCK: tl.constexpr):
    """The (Cg, SN) per-chunk partials of group g of sample b, zero-padded to (CG_BLOCK, SN_BLOCK)."""
    ch = tl.arange(0, CG_BLOCK)
    k = tl.arange(0, SN_BLOCK)
    mask = (ch < Cg)[:, None] & (k < SN)[None, :]
    rows = b.to(tl.int64) * C + g * Cg + ch
    return tl.load(P + rows[:, None] * SN + k[None, :], mask=mask, other=0.0), mask

@triton.jit
def _program_row(C, Cg, NB):
    """(row, block of the row, b, c, g) of this program; programs walk the tensor back to front for L2 reuse."""
    pid = tl.num_programs(0) - 1 - tl.program_id(0)
    row = pid // NB
    return row, pid % NB, row // C, row % C, (row % C) // Cg

@triton.jit
def _gn_apply_kernel(X, Y, PMean, PM2, Mean, Rstd, W, Bias, Scale, Shift, stride_scale, stride_shift,
                     C, G, Cg, N, SN, NB, eps,
                     BLOCK: tl.constexpr, ITERS: tl.constexpr, CG_BLOCK: tl.constexpr, SN_BLOCK: tl.constexpr,
                     HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, SILU: tl.constexpr):
    row, blk, b, c, g = _program_row(C, Cg, NB)
    # Chan et al.: merging partials (n_k, mean_k, M2_k) gives mean = sum n_k mean_k / n and
    # M2 = sum M2_k + n_k (mean_k - mean)^2. Every chunk holds BLOCK*ITERS elements but a row's last.
    pmean, mask = _group_partials(PMean, b, g, C, Cg, SN, CG_BLOCK, SN_BLOCK)
    pm2, _ = _group_partials(PM2, b, g, C, Cg, SN, CG_BLOCK, SN_BLOCK)
    chunk_start = tl.arange(0, SN_BLOCK)[None, :] * (BLOCK * ITERS)
    cnt = tl.where(mask, tl.minimum(N - chunk_start, BLOCK * ITERS), 0).to(tl.float32)
    n = Cg * N * 1.0
    mean = tl.sum(tl.sum(cnt * pmean, axis=1), axis=0) / n
    dev = pmean - mean
    m2 = tl.sum(tl.sum(pm2 + cnt * dev * dev, axis=1), axis=0)
    rstd = 1.0 / tl.sqrt(m2 / n + eps)
    if (c % Cg == 0) & (blk == 0):  # one program per group keeps the statistics for backward
        tl.store(Mean + b * G + g, mean)
        tl.store(Rstd + b * G + g, rstd)

    af, bf = _row_coefficients(W, Bias, Scale, Shift, b, c, stride_scale, stride_shift, HAS_SCALE, HAS_SHIFT)
    # Normalisation, affine and FiLM in one multiply-add per element. Folding the mean into the
    # offset too (x * a + d) would save a subtraction but cancel badly when |mean| >> std.
    a = rstd * af
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    y = (_load_row(X, row, offs, N) - mean) * a + bf
    if SILU:
        y = y * (1.0 / (1.0 + tl.exp(-y)))
    tl.store(Y + row.to(tl.int64) * N + offs, y.to(Y.dtype.element_ty), mask=offs < N)

@triton.jit
def _xhat_and_dsilu(X, row, offs, N, mean, rstd, af, bf, SILU: tl.constexpr):
    """xhat and d silu / d f = sig (1 + f (1 - sig)) at f = xhat * af + bf (1 without the SiLU)."""
    xhat = (_load_row(X, row, offs, N) - mean) * rstd
    dsilu = 1.0
    if SILU:
        f = xhat * af + bf
        sig = 1.0 / (1.0 + tl.exp(-f))
        dsilu = sig * (1.0 + f * (1.0 - sig))
    return xhat, dsilu

@triton.jit
def _gn_bwd_reduce_kernel(X, DY, Mean, Rstd, W, Bias, Scale, Shift, stride_scale, stride_shift, P1, P2,
                          C, G, Cg, N, SN,
                          BLOCK: tl.constexpr, ITERS: tl.constexpr,
                          HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, SILU: tl.constexpr):
    pid = tl.program_id(0)
    row = pid // SN
    start = (pid % SN) * BLOCK * ITERS
    b = row // C
    c = row % C
    mean = tl.load(Mean + b * G + c // Cg)
    rstd = tl.load(Rstd + b * G + c // Cg)
    af, bf = _row_coefficients(W, Bias, Scale, Shift, b, c, stride_scale, stride_shift, HAS_SCALE, HAS_SHIFT)
    s1 = tl.zeros([BLOCK], dtype=tl.float32)
    s2 = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(ITERS):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        xhat, dsilu = _xhat_and_dsilu(X, row, offs, N, mean, rstd, af, bf, SILU)
        df = _load_row(DY, row, offs, N) * dsilu  # zero past N, since dy loads as 0 there
        s1 += df
        s2 += df * xhat
    tl.store(P1 + pid, tl.sum(s1, axis=0))
    tl.store(P2 + pid, tl.sum(s2, axis=0))

@triton.jit
def _gn_bwd_dx_kernel(X, DY, DX, Mean, Rstd, W, Bias, Scale, Shift, stride_scale, stride_shift, P1, P2,
                      C, G, Cg, N, SN, NB,
                      CG_BLOCK: tl.constexpr, SN_BLOCK: tl.constexpr, BLOCK: tl.constexpr,
                      HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, SILU: tl.constexpr):
    row, blk, b, c, g = _program_row(C, Cg, NB)
    mean = tl.load(Mean + b * G + g)
    rstd = tl.load(Rstd + b * G + g)
    # Group means of dxhat = a' df and of dxhat * xhat, from the per-row sums S1, S2.
    p1, _ = _group_partials(P1, b, g, C, Cg, SN, CG_BLOCK, SN_BLOCK)
    p2, _ = _group_partials(P2, b, g, C, Cg, SN, CG_BLOCK, SN_BLOCK)
    ch = g * Cg + tl.arange(0, CG_BLOCK)
    a_group = tl.load(W + ch, mask=ch < (g + 1) * Cg, other=0.0).to(tl.float32)
    if HAS_SCALE:
        a_group *= 1.0 + tl.load(Scale + b * stride_scale + ch, mask=ch < (g + 1) * Cg, other=0.0).to(tl.float32)
    n = Cg * N * 1.0
    c1 = tl.sum(a_group * tl.sum(p1, axis=1), axis=0) / n
    c2 = tl.sum(a_group * tl.sum(p2, axis=1), axis=0) / n

    af, bf = _row_coefficients(W, Bias, Scale, Shift, b, c, stride_scale, stride_shift, HAS_SCALE, HAS_SHIFT)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    xhat, dsilu = _xhat_and_dsilu(X, row, offs, N, mean, rstd, af, bf, SILU)
    dx = rstd * (af * _load_row(DY, row, offs, N) * dsilu - c1 - xhat * c2)  # af is this row's a' = w (1 + s)
    tl.store(DX + row.to(tl.int64) * N + offs, dx.to(DX.dtype.element_ty), mask=offs < N)

def _film_rows(t, B, C, name):
    """scale/shift of shape (B, C) or (B, C, 1, ...) as a (B, C) view with unit column stride."""
    if t is None:
        return None
    if t.numel() != B * C:
        raise ValueError(f"groupnorm_silu: {name} must have B*C = {B}*{C} elements, got shape {tuple(t.shape)}")
    t = t.reshape(B, C)
    return t if t.stride(1) == 1 else t.contiguous()

class _GroupNormSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, scale, shift, num_groups, eps, silu):
        B, C = x.shape[:2]
        if C % num_groups != 0:
            raise ValueError(f"groupnorm_silu: {C} channels do not split into {num_groups} groups")
        if weight.shape != (C,) or bias.shape != (C,):
            raise ValueError(f"groupnorm_silu: weight and bias must have shape ({C},)")
        if not x.is_cuda and not INTERPRET:
            raise ValueError("groupnorm_silu: Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before import)")
        x3 = x.reshape(B, C, -1).contiguous()
        N, G, Cg = x3.shape[2], num_groups, C // num_groups
        s2, t2 = _film_rows(scale, B, C, "scale"), _film_rows(shift, B, C, "shift")
        block, iters, sn, nb, num_warps = _plan(N)
        part_mean, part_m2 = (x.new_empty(B * C * sn, dtype=torch.float32) for _ in range(2))
        mean, rstd = (x.new_empty(B * G, dtype=torch.float32) for _ in range(2))
        y = torch.empty_like(x3)
        film = (x3 if s2 is None else s2, x3 if t2 is None else t2,  # x3, 0: dummies for an absent one (never read)
                0 if s2 is None else s2.stride(0), 0 if t2 is None else t2.stride(0))
        _gn_stats_kernel[(B * C * sn,)](x3, part_mean, part_m2, N, sn, BLOCK=block, ITERS=iters, num_warps=num_warps)
        _gn_apply_kernel[(B * C * nb,)](
            x3, y, part_mean, part_m2, mean, rstd, weight, bias, *film, C, G, Cg, N, sn, nb, eps,
            BLOCK=block, ITERS=iters, CG_BLOCK=triton.next_power_of_2(Cg), SN_BLOCK=triton.next_power_of_2(sn),
            HAS_SCALE=s2 is not None, HAS_SHIFT=t2 is not None, SILU=silu, num_warps=num_warps)
        ctx.save_for_backward(x3, weight, bias, s2, t2, mean, rstd)
        ctx.meta = (None if scale is None else scale.shape, None if shift is None else shift.shape, G, silu)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x3, weight, bias, s2, t2, mean, rstd = ctx.saved_tensors
        scale_shape, shift_shape, G, silu = ctx.meta
        B, C, N = x3.shape
        Cg = C // G
        dy3 = dy.reshape(B, C, N).contiguous()
        block, iters, sn, nb, num_warps = _plan(N)
        p1, p2 = (x3.new_empty(B * C * sn, dtype=torch.float32) for _ in range(2))
        dx = torch.empty_like(x3)
        film = (x3 if s2 is None else s2, x3 if t2 is None else t2,
                0 if s2 is None else s2.stride(0), 0 if t2 is None else t2.stride(0))
        flags = dict(HAS_SCALE=s2 is not None, HAS_SHIFT=t2 is not None, SILU=silu, num_warps=num_warps)
        _gn_bwd_reduce_kernel[(B * C * sn,)](x3, dy3, mean, rstd, weight, bias, *film, p1, p2,
                                             C, G, Cg, N, sn, BLOCK=block, ITERS=iters, **flags)
        _gn_bwd_dx_kernel[(B * C * nb,)](x3, dy3, dx, mean, rstd, weight, bias, *film, p1, p2, C, G, Cg, N, sn, nb,
                                         CG_BLOCK=triton.next_power_of_2(Cg), SN_BLOCK=triton.next_power_of_2(sn),
                                         BLOCK=block, **flags)

        # Parameter gradients from the per-row sums (small (B, C) tensors).
        need_w, need_b, need_s, need_t = ctx.needs_input_grad[1:5]
        s1_rows, s2_rows = (p.view(B, C, sn).sum(-1) for p in (p1, p2))
        film_factor = 1.0 if s2 is None else 1.0 + s2.float()
        dweight = (film_factor * s2_rows).sum(0).to(weight.dtype) if need_w else None
        dbias = (film_factor * s1_rows).sum(0).to(bias.dtype) if need_b else None
        dscale = (weight.float() * s2_rows + bias.float() * s1_rows).to(s2.dtype).view(scale_shape) if need_s else None
        dshift = s1_rows.to(t2.dtype).view(shift_shape) if need_t else None
        return dx.view(dy.shape), dweight, dbias, dscale, dshift, None, None, None

def groupnorm_silu(x, weight, bias, num_groups, eps=1e-5, scale=None, shift=None, silu=True):
    """SiLU(GroupNorm(x) * (1 + scale) + shift) in one fused Triton pass; differentiable.

    x: (B, C, *spatial) in fp32/fp16/bf16; weight, bias: (C,); scale, shift: optional, (B, C) or
    (B, C, 1, 1); silu=False skips the activation. Statistics and arithmetic are fp32, the output
    has x's dtype and shape.
    """
    return _GroupNormSiLU.apply(x, weight, bias, scale, shift, num_groups, eps, silu)

def groupnorm_silu_reference(x, weight, bias, num_groups, eps=1e-5, scale=None, shift=None, silu=True):
    """The same computation in plain PyTorch, all in fp32 and cast back once, for tests and benchmarks."""
    B, C = x.shape[:2]
    h = torch.nn.functional.group_norm(x.float(), num_groups, weight.float(), bias.float(), eps)
    film_shape = (B, C) + (1,) * (x.dim() - 2)
    if scale is not None:
        h = h * (1 + scale.float().reshape(film_shape))
    if shift is not None:
        h = h + shift.float().reshape(film_shape)
    return (torch.nn.functional.silu(h) if silu else h).to(x.dtype)
