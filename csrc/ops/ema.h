// Fused exponential-moving-average update over a list of tensors (mean-teacher EMA): the checks
// and the grouping shared by the CPU (cpu/ema.cpp) and CUDA (cuda/ema.cu) kernels.
#pragma once

#include "checks.h"

#include <map>
#include <utility>
#include <vector>

namespace sslseg {

// Validates the lists (same length, shape, device; floating dtypes). Shared by the CPU and CUDA
// kernels so both raise identical messages.
void ema_check_args(const std::vector<Tensor>& teacher, const std::vector<Tensor>& student, double decay,
                    DeviceType expected_device);

// One contiguous run of elements: teacher/student base pointers and length.
struct EmaSegment {
  void* t;
  const void* s;
  int64_t n;
};

// The flat work of one call, grouped by (teacher dtype, student dtype): usually a single group.
// Pairs the flat kernels cannot take as they are (overlapping or differently strided tensors) are
// run on dense copies (`keep` holds them alive) and copied back by ema_finish.
struct EmaWork {
  std::map<std::pair<ScalarType, ScalarType>, std::vector<EmaSegment>> groups;
  std::vector<Tensor> keep;
  std::vector<std::pair<Tensor, Tensor>> copy_back;  // (teacher, its dense copy)
};

// Checks the lists and builds the work.
EmaWork ema_prepare(const std::vector<Tensor>& teacher, const std::vector<Tensor>& student, double decay,
                    DeviceType device);

// Writes the dense copies back into their teachers (same stream as the kernels on CUDA).
void ema_finish(EmaWork& work);

// A cached pair of tensor lists for repeated updates of one teacher/student (the module path of
// sslseg.ops.ema_update_): the stable ABI has no custom classes, so Python holds the plan as an
// integer handle (_ema_plan_new / _ema_plan_update / _ema_plan_free). One call per update with
// no per-tensor conversion, whatever the list length. `update` is the kernel of the backend
// that created the plan (the CPU one in sslseg._C, the CUDA one in sslseg._C_cuda).
struct EmaPlan {
  std::vector<Tensor> teacher;
  std::vector<Tensor> student;
  void (*update)(const std::vector<Tensor>& teacher, const std::vector<Tensor>& student, double decay);
};

// New plan over the lists (checked now and again on every update: shapes, dtypes and devices may
// change between updates), returned as an integer handle.
int64_t ema_plan_new(std::vector<Tensor> teacher, std::vector<Tensor> student, DeviceType device,
                     void (*update)(const std::vector<Tensor>&, const std::vector<Tensor>&, double));

}  // namespace sslseg
