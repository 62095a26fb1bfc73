// CUDA kernels of hptransfer::perceptual_distance and its backward. Schemas and autograd: local_loss.cpp
// (a different base name because both would compile to local_loss.o).
// One kernel, a 2-D grid (crop x chunk of its C*h*w slab): vectorised 16-byte loads when aligned, warp
// shuffles, fp32 accumulation for bf16/fp16/fp32 (fp64 for fp64), per-chunk partial sums added in a fixed
// order afterwards. perceptual_distance_with_grad also writes d distance/d fake from the same loads, so
// the autograd backward (local_loss.cpp) is one scale per crop.
#include "local_loss.h"

#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
// not ATen/cuda/CUDAContext.h: it pulls in cuSPARSE/cuBLAS headers that a minimal CUDA toolkit lacks

namespace hptransfer {
namespace {

constexpr int kThreads = 256;

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t x) {
  __shared__ acc_t warp_sums[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = x;
  __syncthreads();
  x = threadIdx.x < kThreads / 32 ? warp_sums[threadIdx.x] : acc_t(0);
  if (warp == 0) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
  }
  return x;
}

template <typename acc_t, int P>
__device__ __forceinline__ acc_t term(acc_t d) {
  return P == 1 ? (d < 0 ? -d : d) : d * d;
}

template <typename acc_t, int P>
__device__ __forceinline__ acc_t grad_term(acc_t d, acc_t scale) {
  return P == 1 ? scale * static_cast<acc_t>((d > 0) - (d < 0)) : scale * d;
}

// Grid (crop m, chunk c): block (m, c) reduces vectors [c * chunk_vecs, (c + 1) * chunk_vecs) of crop m's
// slab into partial[m * chunks + c] (the last chunk also takes the scalar tail), and with WRITE_GRAD writes
// d distance/d fake = scale[m] * (sign(f-r) | (f-r)) for the same elements from the same loads. Enough
// blocks to fill the GPU even at 88 crops; the partial sums are added in a fixed order afterwards, so the
// result is deterministic (no atomics).
template <typename scalar_t, typename acc_t, int P, int VEC, bool WRITE_GRAD>
__global__ void __launch_bounds__(kThreads) distance_kernel(const scalar_t* __restrict__ fake, const scalar_t* __restrict__ real,
                                                            const acc_t* __restrict__ scale, acc_t* __restrict__ partial,
                                                            scalar_t* __restrict__ grad, int64_t K, int64_t chunk_vecs) {
  const int64_t m = blockIdx.x;
  const int64_t c = blockIdx.y;
  const int64_t chunks = gridDim.y;
  const scalar_t* f = fake + m * K;
  const scalar_t* r = real + m * K;
  scalar_t* g = WRITE_GRAD ? grad + m * K : nullptr;
  const acc_t sc = WRITE_GRAD ? scale[m] : acc_t(0);
  acc_t s = 0;
  // VEC > 1 only when K % VEC == 0 and every base pointer is 16-byte aligned (checked by the launcher)
  const int64_t KV = K / VEC;
  const int64_t begin = c * chunk_vecs;
  const int64_t end = begin + chunk_vecs < KV ? begin + chunk_vecs : KV;
  const auto* fv = reinterpret_cast<const Vec<scalar_t, VEC>*>(f);
  const auto* rv = reinterpret_cast<const Vec<scalar_t, VEC>*>(r);
  auto* gv = reinterpret_cast<Vec<scalar_t, VEC>*>(g);
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    Vec<scalar_t, VEC> a = fv[i], b = rv[i];
    Vec<scalar_t, VEC> o;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const acc_t d = static_cast<acc_t>(a.v[j]) - static_cast<acc_t>(b.v[j]);
      s += term<acc_t, P>(d);
      if (WRITE_GRAD) o.v[j] = static_cast<scalar_t>(grad_term<acc_t, P>(d, sc));
    }
    if (WRITE_GRAD) gv[i] = o;
  }
  if (c == chunks - 1) {
    for (int64_t i = KV * VEC + threadIdx.x; i < K; i += kThreads) {
      const acc_t d = static_cast<acc_t>(f[i]) - static_cast<acc_t>(r[i]);
      s += term<acc_t, P>(d);
      if (WRITE_GRAD) g[i] = static_cast<scalar_t>(grad_term<acc_t, P>(d, sc));
    }
  }
  s = block_sum<acc_t>(s);
  if (threadIdx.x == 0) partial[m * chunks + c] = s;
}

template <typename scalar_t, typename acc_t, int P, int VEC>
void launch_distance(bool with_grad, dim3 grid, cudaStream_t stream, const scalar_t* f, const scalar_t* r, const acc_t* sc,
                     acc_t* part, scalar_t* g, int64_t K, int64_t chunk_vecs) {
  if (with_grad) distance_kernel<scalar_t, acc_t, P, VEC, true><<<grid, kThreads, 0, stream>>>(f, r, sc, part, g, K, chunk_vecs);
  else distance_kernel<scalar_t, acc_t, P, VEC, false><<<grid, kThreads, 0, stream>>>(f, r, sc, part, g, K, chunk_vecs);
}

template <typename scalar_t>
int pick_vec(const at::Tensor& a, const at::Tensor& b, int64_t K, const at::Tensor* c = nullptr) {
  constexpr int v = 16 / sizeof(scalar_t);
  auto aligned = [](const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0; };
  if (K % v == 0 && aligned(a) && aligned(b) && (c == nullptr || aligned(*c))) return v;
  return 1;
}

}  // namespace

namespace {

constexpr int64_t kVecsPerThread = 4;  // vector loads per thread per block: a chunk is kThreads * 4 vectors

std::tuple<at::Tensor, at::Tensor> distance_cuda(const at::Tensor& fake_in, const at::Tensor& real_in,
                                                 const at::Tensor& mask_in, int64_t p, bool with_grad, const char* op) {
  auto fmt = check_distance_args(fake_in, real_in, mask_in, p);
  TORCH_CHECK(fake_in.is_cuda(), op, " (CUDA kernel) got a ", fake_in.device(), " tensor");
  c10::cuda::CUDAGuard guard(fake_in.device());
  auto fake = fake_in.contiguous(fmt);
  auto real = real_in.contiguous(fmt);
  const int64_t M = fake.size(0);
  const int64_t K = M ? fake.numel() / M : 0;
  auto acc_dtype = distance_dtype(fake);
  auto mask = mask_in.to(acc_dtype).contiguous();
  at::Tensor gfake = with_grad ? at::empty_like(fake) : at::Tensor();
  if (M == 0) return {at::empty({0}, fake.options().dtype(acc_dtype)), gfake};
  TORCH_CHECK(K > 0, op, ": empty crops (C*h*w = 0)");
  TORCH_CHECK(M <= 2147483647LL, op, ": too many crops ", M);
  // d(mask * mean |d|^p)/df = mask * p / K * (sign(d) | d)
  auto scale = (mask * (static_cast<double>(p) / static_cast<double>(K))).contiguous();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor partial;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, fake.scalar_type(), "perceptual_distance_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int V = 16 / sizeof(scalar_t);
    const int vec = pick_vec<scalar_t>(fake, real, K, with_grad ? &gfake : nullptr);
    const int64_t chunk_vecs = kThreads * kVecsPerThread;
    const int64_t chunks = std::max<int64_t>(1, (K / vec + chunk_vecs - 1) / chunk_vecs);
    TORCH_CHECK(chunks <= 65535, op, ": crops of ", K, " elements are too large");
    partial = at::empty({M, chunks}, fake.options().dtype(acc_dtype));
    const scalar_t* f = fake.const_data_ptr<scalar_t>();
    const scalar_t* r = real.const_data_ptr<scalar_t>();
    const acc_t* sc = scale.const_data_ptr<acc_t>();
    acc_t* part = partial.mutable_data_ptr<acc_t>();
    scalar_t* g = with_grad ? gfake.mutable_data_ptr<scalar_t>() : nullptr;
    const dim3 grid(static_cast<unsigned>(M), static_cast<unsigned>(chunks));
    if (p == 1) {
      if (vec == V) launch_distance<scalar_t, acc_t, 1, V>(with_grad, grid, stream, f, r, sc, part, g, K, chunk_vecs);
      else launch_distance<scalar_t, acc_t, 1, 1>(with_grad, grid, stream, f, r, sc, part, g, K, chunk_vecs);
    } else {
      if (vec == V) launch_distance<scalar_t, acc_t, 2, V>(with_grad, grid, stream, f, r, sc, part, g, K, chunk_vecs);
      else launch_distance<scalar_t, acc_t, 2, 1>(with_grad, grid, stream, f, r, sc, part, g, K, chunk_vecs);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // second pass: the chunk sums of each crop in a fixed order (a plain reduction, deterministic)
  auto out = partial.sum(1) / static_cast<double>(K) * mask;
  return {out, gfake};
}

}  // namespace

at::Tensor perceptual_distance_cuda(const at::Tensor& fake, const at::Tensor& real, const at::Tensor& mask, int64_t p) {
  return std::get<0>(distance_cuda(fake, real, mask, p, false, "hptransfer::perceptual_distance"));
}

std::tuple<at::Tensor, at::Tensor> perceptual_distance_with_grad_cuda(const at::Tensor& fake, const at::Tensor& real,
                                                                      const at::Tensor& mask, int64_t p) {
  return distance_cuda(fake, real, mask, p, true, "hptransfer::perceptual_distance_with_grad");
}

}  // namespace hptransfer

TORCH_LIBRARY_IMPL(hptransfer, CUDA, m) {
  m.impl("perceptual_distance", &hptransfer::perceptual_distance_cuda);
  m.impl("perceptual_distance_with_grad", &hptransfer::perceptual_distance_with_grad_cuda);
}
