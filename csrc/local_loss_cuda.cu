// CUDA kernels of hptransfer::perceptual_distance and its backward. Schemas and autograd: local_loss.cpp
// (a different base name because both would compile to local_loss.o).
// One kernel, one block per (crop, chunk of its C*h*w slab) on a 1-D grid (distance_launch in local_loss.h
// computes the configuration on the host): vectorised 16-byte loads when aligned, warp shuffles, fp32
// accumulation for bf16/fp16/fp32 (fp64 for fp64), per-chunk partial sums added in a fixed order
// afterwards. perceptual_distance_with_grad also writes the gradient (stored_grad: for fp16 the unscaled
// term) from the same loads, so the autograd backward (local_loss.cpp) is one scale per crop.
#include "local_loss.h"

#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
// not ATen/cuda/CUDAContext.h: it pulls in cuSPARSE/cuBLAS headers that a minimal CUDA toolkit lacks

namespace hptransfer {
namespace {

constexpr int kThreads = static_cast<int>(kDistanceThreads);

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

// Block b = m * chunks + c reduces vectors [c * chunk_vecs, (c + 1) * chunk_vecs) of crop m's slab into
// partial[b] (the last chunk also takes the scalar tail), and with WRITE_GRAD writes
// stored_grad(f-r, scale[m]) for the same elements from the same loads. Enough blocks to fill the GPU even
// at 88 crops; the partial sums are added in a fixed order afterwards, so the result is deterministic (no
// atomics).
template <typename scalar_t, typename acc_t, int P, int VEC, bool WRITE_GRAD>
__global__ void __launch_bounds__(kThreads) distance_kernel(const scalar_t* __restrict__ fake, const scalar_t* __restrict__ real,
                                                            const acc_t* __restrict__ scale, acc_t* __restrict__ partial,
                                                            scalar_t* __restrict__ grad, int64_t K, int64_t chunk_vecs,
                                                            int64_t chunks) {
  const int64_t m = blockIdx.x / chunks;
  const int64_t c = blockIdx.x % chunks;
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
      if (WRITE_GRAD) o.v[j] = stored_grad<scalar_t, acc_t, P>(d, sc);
    }
    if (WRITE_GRAD) gv[i] = o;
  }
  if (c == chunks - 1) {
    for (int64_t i = KV * VEC + threadIdx.x; i < K; i += kThreads) {
      const acc_t d = static_cast<acc_t>(f[i]) - static_cast<acc_t>(r[i]);
      s += term<acc_t, P>(d);
      if (WRITE_GRAD) g[i] = stored_grad<scalar_t, acc_t, P>(d, sc);
    }
  }
  s = block_sum<acc_t>(s);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

template <typename scalar_t, typename acc_t, int P, int VEC>
void launch_distance(bool with_grad, const DistanceLaunch& L, cudaStream_t stream, const scalar_t* f, const scalar_t* r,
                     const acc_t* sc, acc_t* part, scalar_t* g, int64_t K) {
  const dim3 grid(static_cast<unsigned>(L.grid_x), static_cast<unsigned>(L.grid_y), static_cast<unsigned>(L.grid_z));
  if (with_grad)
    distance_kernel<scalar_t, acc_t, P, VEC, true><<<grid, kThreads, 0, stream>>>(f, r, sc, part, g, K, L.chunk_vecs, L.chunks);
  else
    distance_kernel<scalar_t, acc_t, P, VEC, false><<<grid, kThreads, 0, stream>>>(f, r, sc, part, g, K, L.chunk_vecs, L.chunks);
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0; }

}  // namespace

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> distance_cuda(const at::Tensor& fake_in, const at::Tensor& real_in,
                                                             const at::Tensor& mask_in, int64_t p, bool with_grad,
                                                             const char* op) {
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
  if (M == 0) {
    auto none = [&] { return at::empty({0}, fake.options().dtype(acc_dtype)); };
    return {none(), gfake, with_grad ? none() : at::Tensor()};
  }
  TORCH_CHECK(K > 0, op, ": empty crops (C*h*w = 0)");
  // d(mask * mean |d|^p)/df = mask * p / K * (sign(d) | d)
  auto scale = (mask * (static_cast<double>(p) / static_cast<double>(K))).contiguous();
  at::Tensor gscale;
  if (with_grad) gscale = fake.scalar_type() == at::kHalf ? scale : at::ones({M}, scale.options());  // kScaleInBackward
  const bool aligned = aligned16(fake) && aligned16(real) && (!with_grad || aligned16(gfake));
  const DistanceLaunch L = distance_launch(M, K, fake.element_size(), aligned);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto partial = at::empty({M, L.chunks}, fake.options().dtype(acc_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, fake.scalar_type(), "perceptual_distance_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int V = 16 / sizeof(scalar_t);
    const scalar_t* f = fake.const_data_ptr<scalar_t>();
    const scalar_t* r = real.const_data_ptr<scalar_t>();
    const acc_t* sc = scale.const_data_ptr<acc_t>();
    acc_t* part = partial.mutable_data_ptr<acc_t>();
    scalar_t* g = with_grad ? gfake.mutable_data_ptr<scalar_t>() : nullptr;
    if (p == 1) {
      if (L.vec == V) launch_distance<scalar_t, acc_t, 1, V>(with_grad, L, stream, f, r, sc, part, g, K);
      else launch_distance<scalar_t, acc_t, 1, 1>(with_grad, L, stream, f, r, sc, part, g, K);
    } else {
      if (L.vec == V) launch_distance<scalar_t, acc_t, 2, V>(with_grad, L, stream, f, r, sc, part, g, K);
      else launch_distance<scalar_t, acc_t, 2, 1>(with_grad, L, stream, f, r, sc, part, g, K);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // second pass: the chunk sums of each crop in a fixed order (a plain reduction, deterministic)
  auto out = partial.sum(1) / static_cast<double>(K) * mask;
  return {out, gfake, gscale};
}

}  // namespace

at::Tensor perceptual_distance_cuda(const at::Tensor& fake, const at::Tensor& real, const at::Tensor& mask, int64_t p) {
  return std::get<0>(distance_cuda(fake, real, mask, p, false, "hptransfer::perceptual_distance"));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> perceptual_distance_with_grad_cuda(const at::Tensor& fake,
                                                                                  const at::Tensor& real,
                                                                                  const at::Tensor& mask, int64_t p) {
  return distance_cuda(fake, real, mask, p, true, "hptransfer::perceptual_distance_with_grad");
}

}  // namespace hptransfer

TORCH_LIBRARY_IMPL(hptransfer, CUDA, m) {
  m.impl("perceptual_distance", &hptransfer::perceptual_distance_cuda);
  m.impl("perceptual_distance_with_grad", &hptransfer::perceptual_distance_with_grad_cuda);
}
