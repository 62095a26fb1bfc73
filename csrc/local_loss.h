// Shared declarations and argument checks for the local-loss ops (local_loss.cpp, local_loss_cuda.cu).
#pragma once
#include <ATen/ATen.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace hptransfer {

// Checks shapes/dtypes/devices of perceptual_distance's inputs and returns the common dense layout
// (contiguous or channels_last) in which each crop is one contiguous slab of C*h*w elements.
inline at::MemoryFormat check_distance_args(const at::Tensor& fake, const at::Tensor& real, const at::Tensor& mask,
                                           int64_t p) {
  TORCH_CHECK(p == 1 || p == 2, "hptransfer::perceptual_distance: p must be 1 (l1) or 2 (l2), got ", p);
  TORCH_CHECK(fake.dim() == 4, "hptransfer::perceptual_distance: fake must be (M, C, h, w), got ", fake.sizes());
  TORCH_CHECK(real.sizes() == fake.sizes(), "hptransfer::perceptual_distance: real ", real.sizes(),
              " must have the shape of fake ", fake.sizes());
  TORCH_CHECK(real.scalar_type() == fake.scalar_type(), "hptransfer::perceptual_distance: real dtype ",
              real.scalar_type(), " differs from fake dtype ", fake.scalar_type());
  auto st = fake.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf,
              "hptransfer::perceptual_distance: features must be float32/float64/bfloat16/float16, got ", st);
  TORCH_CHECK(mask.dim() == 1 && mask.size(0) == fake.size(0), "hptransfer::perceptual_distance: mask must be (M,) with M=",
              fake.size(0), ", got ", mask.sizes());
  TORCH_CHECK(mask.is_floating_point() || mask.scalar_type() == at::kBool,
              "hptransfer::perceptual_distance: mask must be floating or bool, got ", mask.scalar_type());
  TORCH_CHECK(real.device() == fake.device() && mask.device() == fake.device(),
              "hptransfer::perceptual_distance: fake, real and mask must be on one device, got ", fake.device(), ", ",
              real.device(), ", ", mask.device());
  // channels_last only when fake is channels_last-dense and not plain-dense (ambiguous size-1 cases read the same)
  return (fake.is_contiguous(at::MemoryFormat::ChannelsLast) && !fake.is_contiguous()) ? at::MemoryFormat::ChannelsLast
                                                                                        : at::MemoryFormat::Contiguous;
}

// Output dtype of the per-crop distance: float64 for float64 features, float32 otherwise.
inline at::ScalarType distance_dtype(const at::Tensor& fake) {
  return fake.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// What perceptual_distance_with_grad stores per element of fake, with d = f - r in the accumulation type
// and scale = mask[m] * p / K: bf16, fp32 and fp64 store the gradient itself, scale * (sign(d) | d), and
// return grad_scale = 1. fp16 stores the unscaled term sign(d) | d and returns grad_scale = scale (fp32):
// for relu1_2 features at 1024 px, K = 2^26 puts p / K below fp16's smallest subnormal, so the scaled
// gradient would round to 0; the backward multiplies term, scale and the (loss-scaled) upstream gradient
// in fp32 and rounds once. bf16 has fp32's exponent range: its stored gradient does not underflow.
template <typename scalar_t>
inline constexpr bool kScaleInBackward = std::is_same_v<scalar_t, c10::Half>;

template <typename scalar_t, typename acc_t, int P>
C10_HOST_DEVICE inline scalar_t stored_grad(acc_t d, acc_t scale) {
  const acc_t term = P == 1 ? static_cast<acc_t>((d > 0) - (d < 0)) : d;
  return static_cast<scalar_t>(kScaleInBackward<scalar_t> ? term : scale * term);
}

// Launch configuration of the CUDA distance kernel (local_loss_cuda.cu), on the host so that the CPU part of
// _C can export it (hptransfer._C.distance_launch_config) and a test can check it for every shape. Each crop's
// slab of K elements is read as K / vec vectors (vec = 16 bytes when K is a multiple and every base pointer
// is 16-byte aligned, else 1), cut into chunks of chunk_vecs vectors; one block per (crop, chunk) on a 1-D
// grid (grid.x allows 2^31 - 1 blocks; grid.y, 65535, would not hold a 1024-px unaligned crop's 65536 chunks).
struct DistanceLaunch {
  int64_t vec, chunk_vecs, chunks, grid_x, grid_y, grid_z, threads;
};

constexpr int64_t kDistanceThreads = 256;
constexpr int64_t kDistanceVecsPerThread = 4;  // a chunk is kDistanceThreads * 4 vector loads

inline DistanceLaunch distance_launch(int64_t M, int64_t K, int64_t element_size, bool aligned) {
  TORCH_CHECK(element_size == 2 || element_size == 4 || element_size == 8, "distance_launch: element size ",
              element_size);
  TORCH_CHECK(M >= 0 && K >= 0, "distance_launch: M=", M, ", K=", K);
  const int64_t v = 16 / element_size;
  DistanceLaunch L{};
  L.threads = kDistanceThreads;
  L.vec = aligned && K % v == 0 ? v : 1;
  L.chunk_vecs = kDistanceThreads * kDistanceVecsPerThread;
  L.chunks = std::max<int64_t>(1, (K / L.vec + L.chunk_vecs - 1) / L.chunk_vecs);
  L.grid_x = M * L.chunks;  // block b: crop b / chunks, chunk b % chunks
  L.grid_y = 1;
  L.grid_z = 1;
  TORCH_CHECK(L.grid_x <= std::numeric_limits<int32_t>::max() && L.grid_y <= 65535 && L.grid_z <= 65535,
              "hptransfer::perceptual_distance: ", M, " crops of ", K, " elements need a grid of (", L.grid_x, ", ",
              L.grid_y, ", ", L.grid_z, ") blocks, more than CUDA allows");
  return L;
}

at::Tensor perceptual_distance_cpu(const at::Tensor& fake, const at::Tensor& real, const at::Tensor& mask, int64_t p);
std::tuple<at::Tensor, at::Tensor, at::Tensor> perceptual_distance_with_grad_cpu(const at::Tensor& fake,
                                                                                 const at::Tensor& real,
                                                                                 const at::Tensor& mask, int64_t p);

}  // namespace hptransfer
