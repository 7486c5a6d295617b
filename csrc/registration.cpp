// Every schema of the sslseg namespace, in one reviewable place. Kernels are bound per backend in
// csrc/ops/cpu/*.cpp and csrc/ops/cuda/*.cu with TORCH_LIBRARY_IMPL; this is the ONLY
// TORCH_LIBRARY(sslseg, ...) (two libraries registering one namespace abort the process).
#include <torch/library.h>
#include <torch/version.h>

#include "ops/ema.h"

#include <string>

namespace {

std::string build_info() {
  return std::string("cuda=") + (SSLSEG_WITH_CUDA ? "1" : "0") + ";torch=" + TORCH_VERSION;
}

}  // namespace

TORCH_LIBRARY(sslseg, m) {
  // Fused EMA: teacher[i] = decay * teacher[i] + (1 - decay) * student[i] for every i, in place,
  // accumulated in fp32 (fp64 for double). sslseg/ops/ema.py.
  m.def("ema_update_(Tensor(a!)[] teacher, Tensor[] student, float decay) -> ()");
  // Cached lists for the module path (one call per update whatever the list length).
  m.class_<sslseg::EmaPlan>("_EmaPlan")
      .def(torch::init<std::vector<at::Tensor>, std::vector<at::Tensor>>())
      .def("update", &sslseg::EmaPlan::update)
      .def("size", &sslseg::EmaPlan::size);

  // Reports whether this binary was compiled with CUDA kernels (sslseg.ops.build_info()).
  m.def("_build_info() -> str", &build_info);
}
