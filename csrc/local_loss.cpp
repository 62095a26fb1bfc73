// Local-loss ops of hptransfer._C, registered under torch.ops.hptransfer:
//   perceptual_distance(fake, real, mask, p) -> (M,)  mean over (C,h,w) of |f-r|^p per crop, times mask
//   perceptual_distance_with_grad(fake, real, mask, p) -> (distance (M,), grad, grad_scale (M,)) with
//     d distance[m] / d fake[m] = grad[m] * grad_scale[m] (grad in fake's dtype and layout; see
//     kScaleInBackward in local_loss.h: grad_scale is 1 except for fp16, where it is mask * p / K in fp32)
// Under autograd the gradient is computed in the forward pass, in the same read of fake and real as the
// sum: backward is then one scale per crop, and neither fake nor real features need to be kept for it.
//   distance_launch_config (hptransfer._C, ext.cpp): the CUDA kernel's launch configuration, for tests.
//   gather_crops(images, centers, size, normalize) -> (B*N, C, s, s)      (CPU; CUDA uses the Triton kernel)
//   gather_crops_backward(grad, centers, height, width, size, normalize) -> grad_images
// CPU kernels here, CUDA kernels in local_loss_cuda.cu; autograd (Autograd key) here for both devices.
#include "local_loss.h"

#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <torch/autograd.h>

#include <cmath>

namespace hptransfer {
namespace {

constexpr float kMean[3] = {0.485f, 0.456f, 0.406f};
constexpr float kStd[3] = {0.229f, 0.224f, 0.225f};

// Sum over one slab of |f-r|^p in acc_t with 8 independent partial sums (lets the compiler vectorise).
template <typename scalar_t, typename acc_t, int P>
acc_t slab_sum(const scalar_t* f, const scalar_t* r, int64_t K) {
  acc_t part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= K; i += 8) {
    for (int j = 0; j < 8; ++j) {
      acc_t d = static_cast<acc_t>(f[i + j]) - static_cast<acc_t>(r[i + j]);
      part[j] += P == 1 ? std::abs(d) : d * d;
    }
  }
  for (; i < K; ++i) {
    acc_t d = static_cast<acc_t>(f[i]) - static_cast<acc_t>(r[i]);
    part[0] += P == 1 ? std::abs(d) : d * d;
  }
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

}  // namespace

namespace {

// One pass over each crop's slab: the distance and, when gfake is given, its gradient
// d(mask[m] * mean |f-r|^p)/df = mask[m] * p/K * (sign(f-r) | (f-r)), written beside the sum as
// stored_grad (local_loss.h) with the per-crop factor left to gscale where the dtype needs it.
template <typename scalar_t>
void distance_pass_cpu(const at::Tensor& fake, const at::Tensor& real, const at::Tensor& mask, int64_t p, at::Tensor& out,
                       at::Tensor* gfake, at::Tensor* gscale) {
  using acc_t = at::opmath_type<scalar_t>;
  using out_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t M = fake.size(0);
  const int64_t K = M ? fake.numel() / M : 0;
  const scalar_t* f = fake.const_data_ptr<scalar_t>();
  const scalar_t* r = real.const_data_ptr<scalar_t>();
  const out_t* mk = mask.const_data_ptr<out_t>();
  out_t* o = out.mutable_data_ptr<out_t>();
  scalar_t* g = gfake ? gfake->mutable_data_ptr<scalar_t>() : nullptr;
  out_t* gs = gscale ? gscale->mutable_data_ptr<out_t>() : nullptr;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(K, 1));
  at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const scalar_t* fm = f + m * K;
      const scalar_t* rm = r + m * K;
      acc_t s = p == 1 ? slab_sum<scalar_t, acc_t, 1>(fm, rm, K) : slab_sum<scalar_t, acc_t, 2>(fm, rm, K);
      o[m] = static_cast<out_t>(s / static_cast<acc_t>(K)) * mk[m];
      if (g == nullptr) continue;
      const acc_t scale = static_cast<acc_t>(mk[m]) * static_cast<acc_t>(p) / static_cast<acc_t>(K);
      gs[m] = kScaleInBackward<scalar_t> ? static_cast<out_t>(scale) : out_t(1);
      scalar_t* gm = g + m * K;
      for (int64_t i = 0; i < K; ++i) {
        acc_t d = static_cast<acc_t>(fm[i]) - static_cast<acc_t>(rm[i]);
        gm[i] = p == 1 ? stored_grad<scalar_t, acc_t, 1>(d, scale) : stored_grad<scalar_t, acc_t, 2>(d, scale);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> distance_cpu(const at::Tensor& fake_in, const at::Tensor& real_in,
                                                            const at::Tensor& mask_in, int64_t p, bool with_grad,
                                                            const char* op) {
  auto fmt = check_distance_args(fake_in, real_in, mask_in, p);
  TORCH_CHECK(fake_in.device().is_cpu(), op, " (CPU kernel) got a ", fake_in.device(), " tensor");
  auto fake = fake_in.contiguous(fmt);
  auto real = real_in.contiguous(fmt);
  const int64_t M = fake.size(0);
  auto out_dtype = distance_dtype(fake);
  auto mask = mask_in.to(out_dtype).contiguous();
  auto out = at::empty({M}, fake.options().dtype(out_dtype));
  at::Tensor gfake = with_grad ? at::empty_like(fake) : at::Tensor();  // same dense layout: slab m is slab m
  at::Tensor gscale = with_grad ? at::ones({M}, out.options()) : at::Tensor();
  if (M == 0 || fake.numel() == 0) {
    if (M) out.zero_();
    return {out, gfake, gscale};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, fake.scalar_type(), "perceptual_distance_cpu", [&] {
    distance_pass_cpu<scalar_t>(fake, real, mask, p, out, with_grad ? &gfake : nullptr, with_grad ? &gscale : nullptr);
  });
  return {out, gfake, gscale};
}

}  // namespace

at::Tensor perceptual_distance_cpu(const at::Tensor& fake, const at::Tensor& real, const at::Tensor& mask, int64_t p) {
  return std::get<0>(distance_cpu(fake, real, mask, p, false, "hptransfer::perceptual_distance"));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> perceptual_distance_with_grad_cpu(const at::Tensor& fake,
                                                                                 const at::Tensor& real,
                                                                                 const at::Tensor& mask, int64_t p) {
  return distance_cpu(fake, real, mask, p, true, "hptransfer::perceptual_distance_with_grad");
}

namespace {

struct CropGeom {
  int64_t y0, x0;
  bool valid;
};

// Same rule as hptransfer.ops.gather_crops.crop_origins: floor(float32(c) + 0.5) - size // 2; any negative -> invalid.
std::vector<CropGeom> crop_geometry(const at::Tensor& centers, int64_t size) {
  auto c = centers.to(at::kFloat).contiguous();
  const float* cp = c.const_data_ptr<float>();
  const int64_t BN = c.numel() / 2;
  std::vector<CropGeom> g(BN);
  for (int64_t i = 0; i < BN; ++i) {
    float cy = cp[2 * i], cx = cp[2 * i + 1];
    g[i].valid = !(cy < 0 || cx < 0);
    g[i].y0 = static_cast<int64_t>(std::floor(cy + 0.5f)) - size / 2;
    g[i].x0 = static_cast<int64_t>(std::floor(cx + 0.5f)) - size / 2;
  }
  return g;
}

void check_gather_args(const at::Tensor& centers, int64_t B, int64_t C, int64_t size, bool normalize, const char* op) {
  TORCH_CHECK(centers.dim() == 3 && centers.size(0) == B && centers.size(2) == 2, op, ": centers must be (B, N, 2) with B=", B,
              ", got ", centers.sizes());
  TORCH_CHECK(centers.device().is_cpu(), op, ": this is the CPU op; centers are on ", centers.device());
  TORCH_CHECK(size >= 1, op, ": crop size must be >= 1, got ", size);
  TORCH_CHECK(!normalize || C == 3, op, ": normalize=True needs 3-channel images, got ", C);
}

}  // namespace

at::Tensor gather_crops_cpu(const at::Tensor& images_in, const at::Tensor& centers, int64_t size, bool normalize) {
  TORCH_CHECK(images_in.dim() == 4, "hptransfer::gather_crops: images must be (B, C, H, W), got ", images_in.sizes());
  TORCH_CHECK(images_in.device().is_cpu(), "hptransfer::gather_crops: this is the CPU op (CUDA uses the Triton kernel); got ",
              images_in.device());
  TORCH_CHECK(images_in.is_floating_point(), "hptransfer::gather_crops: images must be floating point, got ",
              images_in.scalar_type());
  const int64_t B = images_in.size(0), C = images_in.size(1), H = images_in.size(2), W = images_in.size(3);
  check_gather_args(centers, B, C, size, normalize, "hptransfer::gather_crops");
  const int64_t N = centers.size(1);
  auto images = images_in.contiguous();
  auto geom = crop_geometry(centers, size);
  auto out = at::zeros({B * N, C, size, size}, images.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, images.scalar_type(), "gather_crops_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = images.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * N * C, 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t bn = i / C, c = i % C, b = bn / N;
        const CropGeom& g = geom[bn];
        if (!g.valid) continue;
        const acc_t a = normalize ? acc_t(0.5) / acc_t(kStd[c]) : acc_t(1);
        const acc_t k = normalize ? (acc_t(0.5) - acc_t(kMean[c])) / acc_t(kStd[c]) : acc_t(0);
        const scalar_t* plane = src + (b * C + c) * H * W;
        scalar_t* o = dst + i * size * size;
        const int64_t xs = std::max<int64_t>(0, -g.x0), xe = std::min<int64_t>(size, W - g.x0);
        for (int64_t dy = 0; dy < size; ++dy) {
          const int64_t y = g.y0 + dy;
          if (y < 0 || y >= H) continue;
          const scalar_t* row = plane + y * W + g.x0;
          for (int64_t dx = xs; dx < xe; ++dx) {
            o[dy * size + dx] = normalize ? static_cast<scalar_t>(static_cast<acc_t>(row[dx]) * a + k) : row[dx];
          }
        }
      }
    });
  });
  return out;
}

at::Tensor gather_crops_backward_cpu(const at::Tensor& grad_in, const at::Tensor& centers, int64_t height, int64_t width,
                                     int64_t size, bool normalize) {
  TORCH_CHECK(grad_in.dim() == 4 && grad_in.size(2) == size && grad_in.size(3) == size,
              "hptransfer::gather_crops_backward: grad must be (B*N, C, ", size, ", ", size, "), got ", grad_in.sizes());
  TORCH_CHECK(grad_in.device().is_cpu(), "hptransfer::gather_crops_backward: this is the CPU op; got ", grad_in.device());
  const int64_t B = centers.dim() == 3 ? centers.size(0) : -1, C = grad_in.size(1);
  check_gather_args(centers, B, C, size, normalize, "hptransfer::gather_crops_backward");
  const int64_t N = centers.size(1), H = height, W = width;
  TORCH_CHECK(grad_in.size(0) == B * N, "hptransfer::gather_crops_backward: grad has ", grad_in.size(0), " crops, expected B*N=",
              B * N);
  auto grad = grad_in.contiguous();
  auto geom = crop_geometry(centers, size);
  // Accumulate overlapping crops in fp32 (fp64 for fp64) and cast once at the end.
  auto acc_type = grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto gimg = at::zeros({B, C, H, W}, grad.options().dtype(acc_type));
  if (gimg.numel() == 0 || grad.numel() == 0) return gimg.to(grad.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "gather_crops_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gsrc = grad.const_data_ptr<scalar_t>();
    acc_t* dst = gimg.mutable_data_ptr<acc_t>();
    // one (b, c) plane per task: no two threads write the same pixel
    at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / C, c = i % C;
        const acc_t a = normalize ? acc_t(0.5) / acc_t(kStd[c]) : acc_t(1);
        acc_t* plane = dst + i * H * W;
        for (int64_t n = 0; n < N; ++n) {
          const CropGeom& g = geom[b * N + n];
          if (!g.valid) continue;
          const scalar_t* gc = gsrc + ((b * N + n) * C + c) * size * size;
          const int64_t xs = std::max<int64_t>(0, -g.x0), xe = std::min<int64_t>(size, W - g.x0);
          for (int64_t dy = 0; dy < size; ++dy) {
            const int64_t y = g.y0 + dy;
            if (y < 0 || y >= H) continue;
            acc_t* row = plane + y * W + g.x0;
            for (int64_t dx = xs; dx < xe; ++dx) row[dx] += a * static_cast<acc_t>(gc[dy * size + dx]);
          }
        }
      }
    });
  });
  return gimg.to(grad.scalar_type());
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

at::Tensor call_distance(const at::Tensor& f, const at::Tensor& r, const at::Tensor& m, int64_t p) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("hptransfer::perceptual_distance", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t)>();
  return op.call(f, r, m, p);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_distance_with_grad(const at::Tensor& f, const at::Tensor& r,
                                                                      const at::Tensor& m, int64_t p) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("hptransfer::perceptual_distance_with_grad", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                             const at::Tensor&, int64_t)>();
  return op.call(f, r, m, p);
}

at::Tensor call_gather(const at::Tensor& images, const at::Tensor& centers, int64_t size, bool normalize) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("hptransfer::gather_crops", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, bool)>();
  return op.call(images, centers, size, normalize);
}

at::Tensor call_gather_backward(const at::Tensor& g, const at::Tensor& centers, int64_t h, int64_t w, int64_t size, bool normalize) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("hptransfer::gather_crops_backward", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, int64_t, int64_t, bool)>();
  return op.call(g, centers, h, w, size, normalize);
}

class PerceptualDistance : public torch::autograd::Function<PerceptualDistance> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& fake, const at::Tensor& real, const at::Tensor& mask,
                            int64_t p) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [distance, dfake, gscale] = call_distance_with_grad(fake, real, mask, p);
    ctx->save_for_backward({dfake, gscale});  // what backward needs: not fake, not real
    return distance;
  }
  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& dfake = saved[0];
    // grad_fake[m] = grad[m] * dfake[m] * gscale[m]; one elementwise product, layout of dfake kept
    std::vector<int64_t> shape(dfake.dim(), 1);
    shape[0] = dfake.size(0);
    at::Tensor gf;
    if (dfake.scalar_type() == at::kHalf) {
      // fp16: the per-crop factor in fp32 (a loss-scaled gradient of 65536 is beyond fp16), the product
      // computed in fp32 and rounded once into fp16 (mul_out casts at the store: no fp32 copy of dfake)
      const at::Tensor factor = (grads[0].to(at::kFloat) * saved[1]).view(shape);
      gf = at::empty_like(dfake);
      at::mul_out(gf, dfake, factor);
    } else {
      gf = dfake * grads[0].to(dfake.scalar_type()).view(shape);  // gscale is 1: as before issue 24, bit for bit
    }
    at::Tensor gr = ctx->needs_input_grad(1) ? -gf : at::Tensor();  // d/dr |f-r|^p = -d/df |f-r|^p
    if (!ctx->needs_input_grad(0)) gf = at::Tensor();
    return {gf, gr, at::Tensor(), at::Tensor()};
  }
};

class GatherCrops : public torch::autograd::Function<GatherCrops> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& images, const at::Tensor& centers, int64_t size,
                            bool normalize) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({centers});
    ctx->saved_data["h"] = images.size(2);
    ctx->saved_data["w"] = images.size(3);
    ctx->saved_data["size"] = size;
    ctx->saved_data["normalize"] = normalize;
    return call_gather(images, centers, size, normalize);
  }
  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    auto saved = ctx->get_saved_variables();
    auto g = call_gather_backward(grads[0], saved[0], ctx->saved_data["h"].toInt(), ctx->saved_data["w"].toInt(),
                                  ctx->saved_data["size"].toInt(), ctx->saved_data["normalize"].toBool());
    return {g, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor distance_autograd(const at::Tensor& fake, const at::Tensor& real, const at::Tensor& mask, int64_t p) {
  if (!at::GradMode::is_enabled() || !(fake.requires_grad() || real.requires_grad())) {
    at::AutoDispatchBelowADInplaceOrView guard;  // no gradient wanted: the plain (forward-only) kernel
    return call_distance(fake, real, mask, p);
  }
  return PerceptualDistance::apply(fake, real, mask, p);
}

at::Tensor gather_autograd(const at::Tensor& images, const at::Tensor& centers, int64_t size, bool normalize) {
  return GatherCrops::apply(images, centers, size, normalize);
}

}  // namespace
}  // namespace hptransfer

TORCH_LIBRARY(hptransfer, m) {
  m.def("perceptual_distance(Tensor fake, Tensor real, Tensor mask, int p) -> Tensor");
  m.def("perceptual_distance_with_grad(Tensor fake, Tensor real, Tensor mask, int p) -> (Tensor, Tensor, Tensor)");
  m.def("gather_crops(Tensor images, Tensor centers, int size, bool normalize) -> Tensor");
  m.def("gather_crops_backward(Tensor grad, Tensor centers, int height, int width, int size, bool normalize) -> Tensor");
}

TORCH_LIBRARY_IMPL(hptransfer, CPU, m) {
  m.impl("perceptual_distance", &hptransfer::perceptual_distance_cpu);
  m.impl("perceptual_distance_with_grad", &hptransfer::perceptual_distance_with_grad_cpu);
  m.impl("gather_crops", &hptransfer::gather_crops_cpu);
  m.impl("gather_crops_backward", &hptransfer::gather_crops_backward_cpu);
}

TORCH_LIBRARY_IMPL(hptransfer, Autograd, m) {
  m.impl("perceptual_distance", &hptransfer::distance_autograd);
  m.impl("gather_crops", &hptransfer::gather_autograd);
}
