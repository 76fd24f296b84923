"""Benchmark the Triton kernels against PyTorch at GLIDE's shapes.

    python -m kernels.bench            # fp16 and bf16, every shape
    python -m kernels.bench --quick    # bf16, the two largest shapes of each kernel

Times each implementation's forward and forward+backward with triton.testing.do_bench (L2 flushed
between runs) and prints ms, the speedup over the case's first row, the achieved GB/s (GroupNorm: the
bytes a perfect kernel must move, x and y forward plus x, dy and dx backward) or TFLOP/s (attention:
4 B H Lq Lk D forward, 2.5 times that backward) with the fraction of the GPU's peak; then the targets we
set ourselves. GroupNorm: `eager` (in the input dtype), `eager fp32` (GLIDE's GroupNorm32), `compile`
(of `eager`), `triton`, `cuda` (kernels/groupnorm_silu.cu; forward only, full mode). Attention: `sdpa`,
`glide einsum` (GLIDE's QKVAttention on its (B*H, D, L) layout), `compile` (of it), `triton`.
torch.compile runs only on each kernel's largest case: compiling every shape and dtype would take minutes.
"""

import argparse
import collections
import functools
import math

import torch
import torch._dynamo
import torch.nn.functional as F

# (memory bytes/s, dense fp16/bf16 tensor-core flop/s), by device name.
PEAKS = [("H200", 4.8e12, 989e12), ("H100 PCIe", 2.0e12, 756e12), ("H100", 3.35e12, 989e12)]

# name, (B, C, H=W), FiLM. Base model at 64x64: C = 192, 384, 576, 768 at 64, 32, 16, 8.
GROUPNORM_CASES = [
    ("gn up 256x256", (4, 192, 256), False),
    ("gn base 64x64 film", (16, 192, 64), True),
    ("gn base 64x64", (16, 192, 64), False),
    ("gn base 32x32 film", (16, 384, 32), True),
    ("gn base 16x16 film", (16, 576, 16), True),
    ("gn base 8x8 film", (16, 768, 8), True),
]
# name, (B, heads = C / 64, image tokens, image + 256 condition tokens, D)
ATTENTION_CASES = [
    ("attn 32x32", (16, 6, 1024, 1280, 64)),
    ("attn 16x16", (16, 9, 256, 512, 64)),
    ("attn 8x8", (16, 12, 64, 320, 64)),
]

Row = collections.namedtuple("Row", "case dtype pass_ impl ms rate unit")

def groupnorm_eager(x, weight, bias, scale, shift, fp32=False):
    if fp32:  # GLIDE's GroupNorm32
        h = F.group_norm(x.float(), 32, weight, bias).to(x.dtype)
    else:
        h = F.group_norm(x, 32, weight.to(x.dtype), bias.to(x.dtype))
    if scale is not None:
        h = h * (1 + scale) + shift
    return F.silu(h)

def attention_glide(q, k, v):
    """GLIDE's QKVAttention on (B*H, D, L) tensors."""
    scale = 1 / math.sqrt(math.sqrt(q.shape[1]))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
    weight = torch.softmax(weight.float(), dim=-1).to(weight.dtype)
    return torch.einsum("bts,bcs->bct", weight, v)

def _time(fn, inputs, backward):
    """Milliseconds per call of fn(), or of its forward and its backward with respect to inputs."""
    from triton.testing import do_bench
    if not backward:
        with torch.no_grad():
            return do_bench(fn)
    grad_out = torch.randn_like(fn())
    return do_bench(lambda: torch.autograd.grad(fn(), inputs, grad_out))

def bench_groupnorm(name, shape, film, dtype, impls):
    import kernels
    B, C, S = shape
    x = torch.randn(B, C, S, S, device="cuda", dtype=dtype).requires_grad_()
    weight, bias = (torch.randn(C, device="cuda").requires_grad_() for _ in range(2))
    scale, shift = (torch.randn(B, C, 1, 1, device="cuda", dtype=dtype).requires_grad_() if film else None
                    for _ in range(2))
    inputs = [t for t in (x, weight, bias, scale, shift) if t is not None]
    fns = {"eager": groupnorm_eager, "eager fp32": functools.partial(groupnorm_eager, fp32=True),
           "compile": torch.compile(groupnorm_eager, dynamic=False),
           "triton": lambda x, w, b, s, t: kernels.groupnorm_silu(x, w, b, 32, scale=s, shift=t)}
    if "cuda" in impls:
        from kernels.cuda_ext import groupnorm_silu_cuda
        fns["cuda"] = lambda x, w, b, s, t: groupnorm_silu_cuda(x, w, b, 32, scale=s, shift=t)
    rows = []
    for backward in (False, True):
        minimum_bytes = x.numel() * x.element_size() * (5 if backward else 2)
        for impl in [i for i in fns if i in impls and not (backward and i == "cuda")]:
            ms = _time(functools.partial(fns[impl], x, weight, bias, scale, shift), inputs, backward)
            rows.append(Row(name, dtype, "fwd+bwd" if backward else "fwd", impl, ms, minimum_bytes / ms / 1e6, "GB/s"))
    return rows

def bench_attention(name, shape, dtype, impls):
    import kernels
    B, H, Lq, Lk, D = shape
    ours = [torch.randn(B, H, L, D, device="cuda", dtype=dtype) for L in (Lq, Lk, Lk)]
    glide = [t.reshape(B * H, -1, D).transpose(1, 2).contiguous().requires_grad_() for t in ours]
    ours = [t.requires_grad_() for t in ours]
    cases = {"sdpa": (F.scaled_dot_product_attention, ours), "glide einsum": (attention_glide, glide),
             "compile": (torch.compile(attention_glide, dynamic=False), glide), "triton": (kernels.attention, ours)}
    rows = []
    for backward in (False, True):
        flops = 4 * B * H * Lq * Lk * D * (3.5 if backward else 1.0)
        for impl in [i for i in cases if i in impls]:
            fn, inputs = cases[impl]
            ms = _time(functools.partial(fn, *inputs), inputs, backward)
            rows.append(Row(name, dtype, "fwd+bwd" if backward else "fwd", impl, ms, flops / ms / 1e9, "TFLOP/s"))
    return rows

def _peaks():
    """(bytes/s, flop/s) of this GPU, or (0, 0) for one not in PEAKS (printed as n/a)."""
    name = torch.cuda.get_device_name()
    return next(((bw, fl) for key, bw, fl in PEAKS if key in name), (0, 0))

def print_rows(rows, baseline):
    """Print rows as they are measured (a run cut short still shows its table so far); returns them."""
    bw_peak, flop_peak = _peaks()
    for r in rows:
        base_ms = baseline.setdefault((r.case, r.dtype, r.pass_), r.ms)
        peak = bw_peak / 1e9 if r.unit == "GB/s" else flop_peak / 1e12
        frac = f"{100 * r.rate / peak:6.1f}%" if peak else "    n/a"
        dtype = {torch.float16: "fp16", torch.bfloat16: "bf16"}[r.dtype]
        print(f"{r.case:<20} {dtype:<6} {r.pass_:<8} {r.impl:<13} {r.ms:8.3f} "
              f"{base_ms / r.ms:7.2f}x {r.rate:8.1f} {r.unit:<7} {frac}", flush=True)
    return rows

def print_targets(rows):
    """Our bf16 targets (not the issue's), checked on the largest GroupNorm and attention cases."""
    bf16 = {(r.case, r.pass_, r.impl): r for r in rows if r.dtype == torch.bfloat16}

    speedup = lambda case, p, base: bf16[case, p, base].ms / bf16[case, p, "triton"].ms  # noqa: E731
    bw_peak, _ = _peaks()
    checks = []
    for case, _, _ in GROUPNORM_CASES[:2]:
        if (case, "fwd", "triton") in bf16:
            for p in ("fwd", "fwd+bwd"):
                checks.append((f"{case}: triton >= 1.5x eager ({p})", speedup(case, p, "eager"), 1.5))
            if bw_peak:
                bandwidth = bf16[case, "fwd", "triton"].rate * 1e9 / bw_peak
                checks.append((f"{case}: triton >= 80% of bandwidth (fwd)", bandwidth, 0.8))
    case = ATTENTION_CASES[0][0]
    if (case, "fwd", "triton") in bf16:
        checks += [(f"{case}: fwd >= sdpa", speedup(case, "fwd", "sdpa"), 1.0),
                   (f"{case}: fwd >= 3x glide einsum", speedup(case, "fwd", "glide einsum"), 3.0),
                   (f"{case}: fwd+bwd >= 0.8x sdpa", speedup(case, "fwd+bwd", "sdpa"), 0.8)]
    print("\ntargets (bf16):")
    for text, value, target in checks:
        print(f"  {'PASS' if value >= target else 'FAIL'}  {text}: {value:.2f} (target {target})")

def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="bf16 only, the two largest cases of each kernel")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("kernels/bench.py: no CUDA GPU here, nothing to benchmark")
        return
    torch._dynamo.config.cache_size_limit = 64  # one compiled graph per case, dtype and grad mode
    dtypes = [torch.bfloat16] if args.quick else [torch.float16, torch.bfloat16]
    gn_cases = GROUPNORM_CASES[:2] if args.quick else GROUPNORM_CASES
    attn_cases = ATTENTION_CASES[:2] if args.quick else ATTENTION_CASES
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    rows, baseline = [], {}
    print(f"{'case':<20} {'dtype':<6} {'pass':<8} {'impl':<13} {'ms':>8} {'speedup':>8} {'achieved':>16} {'% peak':>7}")
    for dtype in dtypes:
        for i, (name, shape, film) in enumerate(gn_cases):
            impls = ["eager", "eager fp32", "triton"] + (["compile"] if i < 2 else []) + ([] if args.quick else ["cuda"])
            rows += print_rows(bench_groupnorm(name, shape, film, dtype, impls), baseline)
        for i, (name, shape) in enumerate(attn_cases):
            impls = ["sdpa", "glide einsum", "triton"] + (["compile"] if i == 0 else [])
            rows += print_rows(bench_attention(name, shape, dtype, impls), baseline)
    print_targets(rows)

if __name__ == "__main__":
    main()
