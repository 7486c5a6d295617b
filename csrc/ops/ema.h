// Fused exponential-moving-average update over a list of tensors (mean-teacher EMA).
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/custom_class.h>

#include <map>
#include <utility>
#include <vector>

namespace sslseg {

// Validates the lists (same length, shape, device; floating dtypes) and returns nothing on success.
// Shared by the CPU and CUDA kernels so both raise identical messages.
void ema_check_args(at::TensorList teacher, at::TensorList student, double decay,
                    c10::DeviceType expected_device);

// True when teacher and student can be processed as flat memory (dense, equal strides).
bool ema_flat_compatible(const at::Tensor& t, const at::Tensor& s);

// Per-tensor fallback for layouts the flat kernels do not cover (overlapping or differently
// strided tensors): t = decay * t + (1 - decay) * s through ATen, accumulated in fp32/fp64.
void ema_update_strided(const at::Tensor& t, const at::Tensor& s, double decay);

// One contiguous run of elements: teacher/student base pointers and length.
struct EmaSegment {
  void* t;
  const void* s;
  int64_t n;
};
using EmaGroups = std::map<std::pair<at::ScalarType, at::ScalarType>, std::vector<EmaSegment>>;

// Checks the lists, updates the pairs the flat kernels cannot take (ema_update_strided), and groups
// the rest by (teacher dtype, student dtype): usually a single group.
EmaGroups ema_prepare(at::TensorList teacher, at::TensorList student, double decay, c10::DeviceType device);

void ema_update_cpu(at::TensorList teacher, at::TensorList student, double decay);
#if SSLSEG_WITH_CUDA
void ema_update_cuda(at::TensorList teacher, at::TensorList student, double decay);
#endif

// A cached pair of tensor lists for repeated updates of the same teacher/student (the module path
// of sslseg.ops.ema_update_). One Python call per update, whatever the number of tensors: the lists
// are converted once, and update() calls the ema_update_ op from C++ through the dispatcher (so
// the CPU/CUDA kernel is picked as usual), below the autograd layer, which never applies: EMA
// updates are not differentiable and the wrapper runs them under no_grad.
struct EmaPlan : torch::CustomClassHolder {
  EmaPlan(std::vector<at::Tensor> teacher, std::vector<at::Tensor> student);
  void update(double decay);
  int64_t size() const { return static_cast<int64_t>(teacher_.size()); }

  std::vector<at::Tensor> teacher_;
  std::vector<at::Tensor> student_;
};

}  // namespace sslseg
