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

}  // namespace sslseg
