// Shared declarations and argument checks for the local-loss ops (local_loss.cpp, local_loss_cuda.cu).
#pragma once
#include <ATen/ATen.h>
#include <torch/library.h>

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

at::Tensor perceptual_distance_cpu(const at::Tensor& fake, const at::Tensor& real, const at::Tensor& mask, int64_t p);
std::tuple<at::Tensor, at::Tensor> perceptual_distance_with_grad_cpu(const at::Tensor& fake, const at::Tensor& real,
                                                                     const at::Tensor& mask, int64_t p);

}  // namespace hptransfer
