// Fused GroupNorm -> FiLM -> SiLU forward in CUDA C++: the same algorithm as the Triton kernels of
// groupnorm_silu.py, written out by hand as a side-by-side lesson in what Triton does for you.
//
// A row is one (b, c) pair of N contiguous elements; a group is Cg = C / G consecutive rows.
//   1. gn_stats_kernel: one thread block per (row, chunk of CHUNK elements) reduces it to
//      (count, mean, M2) with Welford's algorithm per thread and Chan's merge across threads.
//   2. gn_apply_kernel: one thread block per (row, tile of TILE elements) merges the partials of
//      its group, folds normalisation, affine and FiLM into f = (x - mean) * a + d and applies SiLU.
//
// What Triton wrote for us, visible here: the thread index arithmetic (Triton: tl.arange over a
// block), the warp-shuffle + shared-memory tree for every reduction (Triton: tl.sum), the bounds
// checks on every access (Triton: mask=), the per-dtype instantiation (Triton: specialisation on
// the pointer types), and the choice of threads per block (Triton: num_warps).
// Built on first use by kernels/cuda_ext.py with torch.utils.cpp_extension.load.

#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

constexpr int THREADS = 256;     // 8 warps per block
constexpr int64_t CHUNK = 8192;  // elements per statistics block (Triton: BLOCK * ITERS)
constexpr int64_t TILE = 2048;   // elements per apply block (Triton: BLOCK)

struct Welford {
  float n, mean, m2;  // count, running mean, sum of squared deviations from the mean
};

// Chan et al.'s parallel merge of two partial (n, mean, M2).
__device__ Welford merge(Welford a, Welford b) {
  float n = a.n + b.n;
  if (n == 0.f) return {0.f, 0.f, 0.f};
  float delta = b.mean - a.mean;
  float wb = b.n / n;
  return {n, a.mean + delta * wb, a.m2 + b.m2 + delta * delta * a.n * wb};
}

__device__ Welford warp_merge(Welford w) {
  for (int offset = 16; offset > 0; offset /= 2) {
    Welford other{__shfl_down_sync(0xffffffff, w.n, offset), __shfl_down_sync(0xffffffff, w.mean, offset),
                  __shfl_down_sync(0xffffffff, w.m2, offset)};
    w = merge(w, other);
  }
  return w;
}

// Merge the partials of all THREADS threads; every thread gets the result.
__device__ Welford block_merge(Welford w) {
  __shared__ Welford per_warp[THREADS / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  w = warp_merge(w);
  if (lane == 0) per_warp[warp] = w;
  __syncthreads();
  if (warp == 0) {
    w = lane < THREADS / 32 ? per_warp[lane] : Welford{0.f, 0.f, 0.f};
    w = warp_merge(w);
    if (lane == 0) per_warp[0] = w;
  }
  __syncthreads();
  return per_warp[0];
}

template <typename scalar_t>
__global__ void gn_stats_kernel(const scalar_t* __restrict__ x, float* __restrict__ part_mean,
                                float* __restrict__ part_m2, int64_t N, int64_t num_chunks) {
  const int64_t row = blockIdx.x / num_chunks, chunk = blockIdx.x % num_chunks;
  const int64_t end = min(N, (chunk + 1) * CHUNK);
  Welford w{0.f, 0.f, 0.f};
  for (int64_t i = chunk * CHUNK + threadIdx.x; i < end; i += THREADS) {
    const float v = static_cast<float>(x[row * N + i]);
    w.n += 1.f;
    const float delta = v - w.mean;
    w.mean += delta / w.n;
    w.m2 += delta * (v - w.mean);
  }
  w = block_merge(w);
  if (threadIdx.x == 0) {
    part_mean[blockIdx.x] = w.mean;
    part_m2[blockIdx.x] = w.m2;
  }
}

template <typename scalar_t>
__global__ void gn_apply_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y,
                                const float* __restrict__ part_mean, const float* __restrict__ part_m2,
                                const float* __restrict__ weight, const float* __restrict__ bias,
                                const float* __restrict__ scale, const float* __restrict__ shift,
                                int64_t C, int64_t Cg, int64_t N, int64_t num_chunks, int64_t num_tiles,
                                float eps, bool silu) {
  const int64_t row = blockIdx.x / num_tiles, tile = blockIdx.x % num_tiles;
  const int64_t b = row / C, c = row % C, first_row = b * C + (c / Cg) * Cg;

  // The group's Cg * num_chunks partials, merged cooperatively by the block.
  Welford w{0.f, 0.f, 0.f};
  for (int64_t p = threadIdx.x; p < Cg * num_chunks; p += THREADS) {
    const int64_t chunk = p % num_chunks;
    const float count = static_cast<float>(min(CHUNK, N - chunk * CHUNK));
    const int64_t idx = (first_row + p / num_chunks) * num_chunks + chunk;
    w = merge(w, Welford{count, part_mean[idx], part_m2[idx]});
  }
  w = block_merge(w);
  const float rstd = rsqrtf(w.m2 / w.n + eps);

  const float one_plus_s = 1.f + (scale ? scale[b * C + c] : 0.f);
  const float a = rstd * weight[c] * one_plus_s;
  const float d = bias[c] * one_plus_s + (shift ? shift[b * C + c] : 0.f);
  const int64_t end = min(N, (tile + 1) * TILE);
  for (int64_t i = tile * TILE + threadIdx.x; i < end; i += THREADS) {
    float f = (static_cast<float>(x[row * N + i]) - w.mean) * a + d;
    if (silu) f = f / (1.f + __expf(-f));
    y[row * N + i] = static_cast<scalar_t>(f);
  }
}

// x: (B, C, N) contiguous; weight, bias: (C,) fp32; scale, shift: optional (B, C) fp32.
torch::Tensor groupnorm_silu_forward(torch::Tensor x, torch::Tensor weight, torch::Tensor bias,
                                     std::optional<torch::Tensor> scale, std::optional<torch::Tensor> shift,
                                     int64_t num_groups, double eps, bool silu) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 3 && x.is_contiguous(), "x must be a contiguous CUDA (B, C, N) tensor");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && bias.scalar_type() == at::kFloat, "weight, bias must be fp32");
  const int64_t B = x.size(0), C = x.size(1), N = x.size(2);
  TORCH_CHECK(C % num_groups == 0, "channels must split into num_groups");
  for (const auto& t : {scale, shift})
    TORCH_CHECK(!t || (t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == B * C),
                "scale, shift must be contiguous fp32 (B, C)");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();

  const int64_t num_chunks = (N + CHUNK - 1) / CHUNK, num_tiles = (N + TILE - 1) / TILE;
  auto part_mean = torch::empty({B * C * num_chunks}, x.options().dtype(at::kFloat));
  auto part_m2 = torch::empty_like(part_mean);
  auto y = torch::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "groupnorm_silu_forward", [&] {
    gn_stats_kernel<scalar_t><<<B * C * num_chunks, THREADS, 0, stream>>>(
        x.data_ptr<scalar_t>(), part_mean.data_ptr<float>(), part_m2.data_ptr<float>(), N, num_chunks);
    gn_apply_kernel<scalar_t><<<B * C * num_tiles, THREADS, 0, stream>>>(
        x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), part_mean.data_ptr<float>(), part_m2.data_ptr<float>(),
        weight.data_ptr<float>(), bias.data_ptr<float>(), scale ? scale->data_ptr<float>() : nullptr,
        shift ? shift->data_ptr<float>() : nullptr, C, C / num_groups, N, num_chunks, num_tiles,
        static_cast<float>(eps), silu);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &groupnorm_silu_forward, "fused GroupNorm -> FiLM -> SiLU forward (CUDA)");
}
