// CUDA kernels of hptransfer::perceptual_distance and its backward. Schemas and autograd: local_loss.cpp
// (a different base name because both would compile to local_loss.o).
// Forward: one block per crop reduces its C*h*w slab (vectorised 16-byte loads when aligned, warp shuffles,
// fp32 accumulation for bf16/fp16/fp32, fp64 for fp64). Backward: one elementwise pass, one read of fake and
// real and one write of grad_fake.
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
__device__ __forceinline__ acc_t term(acc_t f, acc_t r) {
  acc_t d = f - r;
  return P == 1 ? (d < 0 ? -d : d) : d * d;
}

template <typename scalar_t, typename acc_t, int P, int VEC>
__global__ void __launch_bounds__(kThreads) distance_kernel(const scalar_t* __restrict__ fake, const scalar_t* __restrict__ real,
                                                            const acc_t* __restrict__ mask, acc_t* __restrict__ out, int64_t K) {
  const int64_t m = blockIdx.x;
  const scalar_t* f = fake + m * K;
  const scalar_t* r = real + m * K;
  acc_t s = 0;
  // VEC > 1 only when K % VEC == 0 and both base pointers are 16-byte aligned (checked by the launcher)
  const int64_t KV = K / VEC;
  const auto* fv = reinterpret_cast<const Vec<scalar_t, VEC>*>(f);
  const auto* rv = reinterpret_cast<const Vec<scalar_t, VEC>*>(r);
  for (int64_t i = threadIdx.x; i < KV; i += kThreads) {
    Vec<scalar_t, VEC> a = fv[i], b = rv[i];
#pragma unroll
    for (int j = 0; j < VEC; ++j) s += term<acc_t, P>(static_cast<acc_t>(a.v[j]), static_cast<acc_t>(b.v[j]));
  }
  for (int64_t i = KV * VEC + threadIdx.x; i < K; i += kThreads) {
    s += term<acc_t, P>(static_cast<acc_t>(f[i]), static_cast<acc_t>(r[i]));
  }
  s = block_sum<acc_t>(s);
  if (threadIdx.x == 0) out[m] = s / static_cast<acc_t>(K) * mask[m];
}

template <typename scalar_t, typename acc_t, int P, int VEC>
__global__ void __launch_bounds__(kThreads) distance_backward_kernel(const scalar_t* __restrict__ fake,
                                                                     const scalar_t* __restrict__ real,
                                                                     const acc_t* __restrict__ scale,
                                                                     scalar_t* __restrict__ grad, int64_t K, int64_t total_vec) {
  const auto* fv = reinterpret_cast<const Vec<scalar_t, VEC>*>(fake);
  const auto* rv = reinterpret_cast<const Vec<scalar_t, VEC>*>(real);
  auto* gv = reinterpret_cast<Vec<scalar_t, VEC>*>(grad);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < total_vec;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const acc_t s = scale[(i * VEC) / K];  // K % VEC == 0: a vector never straddles two crops
    Vec<scalar_t, VEC> a = fv[i], b = rv[i], o;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      acc_t d = static_cast<acc_t>(a.v[j]) - static_cast<acc_t>(b.v[j]);
      o.v[j] = static_cast<scalar_t>(P == 1 ? s * static_cast<acc_t>((d > 0) - (d < 0)) : s * d);
    }
    gv[i] = o;
  }
}

template <typename scalar_t>
int pick_vec(const at::Tensor& a, const at::Tensor& b, int64_t K, const at::Tensor* c = nullptr) {
  constexpr int v = 16 / sizeof(scalar_t);
  auto aligned = [](const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0; };
  if (K % v == 0 && aligned(a) && aligned(b) && (c == nullptr || aligned(*c))) return v;
  return 1;
}

}  // namespace

at::Tensor perceptual_distance_cuda(const at::Tensor& fake_in, const at::Tensor& real_in, const at::Tensor& mask_in, int64_t p) {
  auto fmt = check_distance_args(fake_in, real_in, mask_in, p);
  TORCH_CHECK(fake_in.is_cuda(), "hptransfer::perceptual_distance (CUDA kernel) got a ", fake_in.device(), " tensor");
  c10::cuda::CUDAGuard guard(fake_in.device());
  auto fake = fake_in.contiguous(fmt);
  auto real = real_in.contiguous(fmt);
  const int64_t M = fake.size(0);
  const int64_t K = M ? fake.numel() / M : 0;
  auto out_dtype = distance_dtype(fake);
  auto mask = mask_in.to(out_dtype).contiguous();
  auto out = at::empty({M}, fake.options().dtype(out_dtype));
  if (M == 0) return out;
  TORCH_CHECK(K > 0, "hptransfer::perceptual_distance: empty crops (C*h*w = 0)");
  TORCH_CHECK(M <= 2147483647LL, "hptransfer::perceptual_distance: too many crops ", M);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, fake.scalar_type(), "perceptual_distance_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int vec = pick_vec<scalar_t>(fake, real, K);
    const scalar_t* f = fake.const_data_ptr<scalar_t>();
    const scalar_t* r = real.const_data_ptr<scalar_t>();
    const acc_t* mk = mask.const_data_ptr<acc_t>();
    acc_t* o = out.mutable_data_ptr<acc_t>();
    constexpr int V = 16 / sizeof(scalar_t);
    const dim3 grid(static_cast<unsigned>(M));
    if (p == 1) {
      if (vec == V) distance_kernel<scalar_t, acc_t, 1, V><<<grid, kThreads, 0, stream>>>(f, r, mk, o, K);
      else distance_kernel<scalar_t, acc_t, 1, 1><<<grid, kThreads, 0, stream>>>(f, r, mk, o, K);
    } else {
      if (vec == V) distance_kernel<scalar_t, acc_t, 2, V><<<grid, kThreads, 0, stream>>>(f, r, mk, o, K);
      else distance_kernel<scalar_t, acc_t, 2, 1><<<grid, kThreads, 0, stream>>>(f, r, mk, o, K);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor perceptual_distance_backward_cuda(const at::Tensor& grad_in, const at::Tensor& fake_in, const at::Tensor& real_in,
                                             const at::Tensor& mask_in, int64_t p) {
  auto fmt = check_distance_args(fake_in, real_in, mask_in, p);
  TORCH_CHECK(fake_in.is_cuda(), "hptransfer::perceptual_distance_backward (CUDA kernel) got a ", fake_in.device(), " tensor");
  TORCH_CHECK(grad_in.dim() == 1 && grad_in.size(0) == fake_in.size(0) && grad_in.device() == fake_in.device(),
              "hptransfer::perceptual_distance_backward: grad must be (M,) on ", fake_in.device(), ", got ", grad_in.sizes());
  c10::cuda::CUDAGuard guard(fake_in.device());
  auto fake = fake_in.contiguous(fmt);
  auto real = real_in.contiguous(fmt);
  const int64_t M = fake.size(0);
  const int64_t K = M ? fake.numel() / M : 0;
  auto acc_dtype = distance_dtype(fake);
  auto scale = (grad_in.to(acc_dtype) * mask_in.to(acc_dtype) * (static_cast<double>(p) / std::max<int64_t>(K, 1))).contiguous();
  auto gfake = at::empty_like(fake);
  if (fake.numel() == 0) return gfake;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, fake.scalar_type(), "perceptual_distance_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int V = 16 / sizeof(scalar_t);
    const int vec = pick_vec<scalar_t>(fake, real, K, &gfake);
    const int64_t total_vec = fake.numel() / vec;
    int sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, fake.get_device()));
    const int64_t blocks = std::min<int64_t>((total_vec + kThreads - 1) / kThreads, static_cast<int64_t>(sms) * 8);
    const scalar_t* f = fake.const_data_ptr<scalar_t>();
    const scalar_t* r = real.const_data_ptr<scalar_t>();
    const acc_t* sc = scale.const_data_ptr<acc_t>();
    scalar_t* g = gfake.mutable_data_ptr<scalar_t>();
    const dim3 grid(static_cast<unsigned>(blocks));
    if (p == 1) {
      if (vec == V) distance_backward_kernel<scalar_t, acc_t, 1, V><<<grid, kThreads, 0, stream>>>(f, r, sc, g, K, total_vec);
      else distance_backward_kernel<scalar_t, acc_t, 1, 1><<<grid, kThreads, 0, stream>>>(f, r, sc, g, K, total_vec);
    } else {
      if (vec == V) distance_backward_kernel<scalar_t, acc_t, 2, V><<<grid, kThreads, 0, stream>>>(f, r, sc, g, K, total_vec);
      else distance_backward_kernel<scalar_t, acc_t, 2, 1><<<grid, kThreads, 0, stream>>>(f, r, sc, g, K, total_vec);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gfake;
}

}  // namespace hptransfer

TORCH_LIBRARY_IMPL(hptransfer, CUDA, m) {
  m.impl("perceptual_distance", &hptransfer::perceptual_distance_cuda);
  m.impl("perceptual_distance_backward", &hptransfer::perceptual_distance_backward_cuda);
}
