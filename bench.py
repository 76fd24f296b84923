"""Time the sampling pipeline of sample.py (base model with guidance, then the upsampler) with
random weights: seconds per image, no checkpoints needed (the kernel benchmark: kernels/bench.py).

    python bench.py --steps 250 --sr-steps fast27 --batch-size 16    # the released sizes, on a GPU
    python bench.py --config toy --steps 2 --sr-steps 2 --device cpu  # a smoke test
"""

import argparse
import os
import sys
import time

import torch

import sample
from nanopiti import base_config, build_model, toy_config
from nanopiti.diffusion import DiffusionError
from nanopiti.guidance import GUIDANCES
from nanopiti.ops import DTYPES, use_kernels
from nanopiti.pictures import quantize

def randomize_untrained_(model, seed=0):
    """Fill the parameters that start at zero (GLIDE zero-initializes every block's last layer) with
    small noise, so that random weights give a non-trivial network, as a trained one is."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    return model

def bench(args, device, dtype):
    """Seconds per image of the whole pipeline (base + upsampler) with random PITI mask models."""
    make = base_config if args.config == "full" else toy_config
    base = randomize_untrained_(build_model(make("piti", False, "mask")), 0).eval().to(device)
    sr = randomize_untrained_(build_model(make("piti", True, "mask")), 1).eval().to(device)
    n, cond_size = args.batch_size, base.config["cond_size"]
    gen = torch.Generator(device).manual_seed(args.seed)
    cond = torch.rand(n, 3, cond_size, cond_size, generator=gen, device=device) * 2 - 1
    opts = dict(generator=gen, dtype=dtype, cuda_graph=device.type == "cuda" and not args.no_cuda_graph)
    sync = torch.get_device_module(device).synchronize  # torch.cuda's, or torch.cpu's (a no-op)

    def timed(fn, **kwargs):  # the GPU runs ahead of Python: wait for it before reading the clock
        sync(device)
        t0 = time.perf_counter()
        x = fn(**kwargs)
        sync(device)
        return x, time.perf_counter() - t0

    with torch.inference_mode():
        # A two-step warm-up compiles the Triton kernels and fills the caching allocator.
        low = sample.sample_base(base, cond, steps="2", progress=False, **opts)
        sample.sample_upsampler(sr, cond, quantize(low), steps="2", progress=False, **opts)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        low, t_base = timed(sample.sample_base, model=base, cond=cond, w=args.w, guidance=args.guidance,
                            steps=args.steps, sampler=args.sampler, **opts)
        _, t_sr = timed(sample.sample_upsampler, model=sr, cond=cond, low_res=quantize(low), steps=args.sr_steps, **opts)
    kernels = "on" if use_kernels(torch.empty(1, device=device)) else "off"
    graph = ", CUDA graph" if opts["cuda_graph"] else ""
    memory = f", peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else ""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    size = sr.config["image_size"]
    print(f"bench {args.config} PITI mask, batch {n}, {args.steps}+{args.sr_steps} steps, "
          f"{str(dtype).replace('torch.', '')}, kernels {kernels}{graph}, {args.guidance}, {name}: "
          f"{(t_base + t_sr) / n:.3f} s per {size}x{size} image "
          f"(base {t_base / n:.3f} s, upsampler {t_sr / n:.3f} s){memory}")

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", choices=["full", "toy"], default="full", help="the released model sizes or the toy ones")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", default="250", help="base model steps (sample.py's forms)")
    p.add_argument("--sr-steps", default="fast27", help="upsampler steps")
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm")
    p.add_argument("--w", type=float, default=sample.DEFAULT_W, help="guidance strength")
    p.add_argument("--guidance", choices=GUIDANCES, default="ncf")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cuda:1, cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="autocast dtype on GPU (default bf16; CPU: fp32)")
    p.add_argument("--no-kernels", action="store_true", help="PyTorch ops instead of the Triton kernels")
    p.add_argument("--no-cuda-graph", action="store_true", help="launch the decoder's kernels one by one")
    args = p.parse_args(argv)
    if args.no_kernels:
        os.environ["NANOPITI_KERNELS"] = "0"
    try:
        bench(args, *sample.resolve_device(args.device, args.dtype))
    except (sample.SampleError, DiffusionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0

if __name__ == "__main__":
    sys.exit(main())
