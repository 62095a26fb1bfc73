// hptransfer._C module: build facts, and the CUDA distance kernel's launch configuration (computed on the
// host, so tests check it on machines without a GPU). Ops register themselves with TORCH_LIBRARY in their
// own files.
#include <torch/extension.h>

#include "local_loss.h"

namespace {
bool with_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::string cuda_version() {
#ifdef WITH_CUDA
  return HPTRANSFER_CUDA_VERSION;  // torch.version.cuda at build time, passed by setup.py
#else
  return "";
#endif
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hptransfer C++/CUDA ops (registered under torch.ops.hptransfer)";
  m.def("with_cuda", &with_cuda, "True when the CUDA kernels were compiled in");
  m.def("cuda_version", &cuda_version, "CUDA version the extension was compiled with");
  m.def(
      "distance_launch_config",
      [](int64_t M, int64_t K, int64_t element_size, bool aligned) {
        const auto L = hptransfer::distance_launch(M, K, element_size, aligned);
        pybind11::dict d;
        d["vec"] = L.vec;
        d["chunk_vecs"] = L.chunk_vecs;
        d["chunks"] = L.chunks;
        d["grid"] = pybind11::make_tuple(L.grid_x, L.grid_y, L.grid_z);
        d["threads"] = L.threads;
        return d;
      },
      pybind11::arg("M"), pybind11::arg("K"), pybind11::arg("element_size"), pybind11::arg("aligned"),
      "Launch configuration of the CUDA perceptual_distance kernel for M crops of K elements "
      "(element_size bytes; aligned: every base pointer 16-byte aligned): vec, chunk_vecs, chunks, grid, threads");
}
