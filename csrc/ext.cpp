// hptransfer._C module: build facts. Ops register themselves with TORCH_LIBRARY in their own files.
#include <torch/extension.h>

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
}
