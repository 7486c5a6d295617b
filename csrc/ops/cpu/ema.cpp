// CPU kernel of sslseg::ema_update_, plus the argument checks and strided fallback shared with
// the CUDA kernel. The whole tensor list is one work range split across threads, so a list of
// many small tensors costs one parallel region instead of one dispatch per tensor.
#include "checks.h"
#include "ops/ema.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <utility>
#include <vector>

namespace sslseg {

void ema_check_args(at::TensorList teacher, at::TensorList student, double decay,
                    c10::DeviceType expected_device) {
  SSLSEG_CHECK(teacher.size() == student.size(), "ema_update_: teacher and student must have the same number of tensors, got ",
               teacher.size(), " teacher tensors and ", student.size(), " student tensors");
  SSLSEG_CHECK(decay >= 0.0 && decay <= 1.0, "ema_update_: decay must be in [0, 1], got ", decay);
  for (size_t i = 0; i < teacher.size(); ++i) {
    const at::Tensor& t = teacher[i];
    const at::Tensor& s = student[i];
    SSLSEG_CHECK(t.defined() && s.defined(), "ema_update_: ", item_name("teacher", i), " / ", item_name("student", i),
                 " must be defined tensors");
    SSLSEG_CHECK(t.sizes() == s.sizes(), "ema_update_: ", item_name("student", i), " must have the shape of ",
                 item_name("teacher", i), " ", shape_str(t), ", got ", shape_str(s));
    SSLSEG_CHECK(t.device() == s.device(), "ema_update_: ", item_name("student", i), " must be on the device of ",
                 item_name("teacher", i), " (", t.device(), "), got ", s.device());
    SSLSEG_CHECK(t.device().type() == expected_device, "ema_update_: ", item_name("teacher", i), " must be a ",
                 c10::DeviceTypeName(expected_device), " tensor like the rest of the list, got ", t.device());
    SSLSEG_CHECK(is_supported_float(t.scalar_type()), "ema_update_: ", item_name("teacher", i),
                 " must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
    SSLSEG_CHECK(is_supported_float(s.scalar_type()), "ema_update_: ", item_name("student", i),
                 " must be float16, bfloat16, float32 or float64, got ", s.scalar_type());
  }
}

bool ema_flat_compatible(const at::Tensor& t, const at::Tensor& s) {
  return t.is_non_overlapping_and_dense() && s.is_non_overlapping_and_dense() && t.strides() == s.strides();
}

void ema_update_strided(const at::Tensor& t, const at::Tensor& s, double decay) {
  const auto acc = t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor tt = t.to(acc);
  tt.mul_(decay).add_(s.to(acc), 1.0 - decay);
  t.copy_(tt);
}

EmaGroups ema_prepare(at::TensorList teacher, at::TensorList student, double decay, c10::DeviceType device) {
  ema_check_args(teacher, student, decay, device);
  EmaGroups groups;
  for (size_t i = 0; i < teacher.size(); ++i) {
    const at::Tensor& t = teacher[i];
    const at::Tensor& s = student[i];
    if (t.numel() == 0) continue;
    if (!ema_flat_compatible(t, s)) {
      ema_update_strided(t, s, decay);
      continue;
    }
    groups[{t.scalar_type(), s.scalar_type()}].push_back(EmaSegment{t.data_ptr(), s.const_data_ptr(), t.numel()});
  }
  return groups;
}

namespace {

using Segment = EmaSegment;

template <typename T, typename S, typename A>
void ema_run(T* __restrict__ t, const S* __restrict__ s, int64_t n, A d, A w) {
  for (int64_t i = 0; i < n; ++i) t[i] = static_cast<T>(d * static_cast<A>(t[i]) + w * static_cast<A>(s[i]));
}

// The common float32/float32 case, compiled for AVX2 as well as the baseline ISA and picked at
// load time: when the lists fit in cache the update is compute-bound, not memory-bound.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void ema_run_f32(float* __restrict__ t, const float* __restrict__ s, int64_t n, float d, float w) {
  for (int64_t i = 0; i < n; ++i) t[i] = d * t[i] + w * s[i];
}

template <typename T, typename S>
void ema_segments_cpu(const std::vector<Segment>& segs, double decay) {
  using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const acc_t d = static_cast<acc_t>(decay);
  const acc_t w = static_cast<acc_t>(1.0 - decay);

  // Prefix offsets into the concatenation of all segments.
  std::vector<int64_t> start(segs.size() + 1, 0);
  for (size_t i = 0; i < segs.size(); ++i) start[i + 1] = start[i] + segs[i].n;
  const int64_t total = start.back();
  if (total == 0) return;

  auto body = [&](int64_t begin, int64_t end) {
    // First segment holding `begin`.
    size_t k = std::upper_bound(start.begin(), start.end(), begin) - start.begin() - 1;
    for (; k < segs.size() && start[k] < end; ++k) {
      const int64_t lo = std::max(begin, start[k]) - start[k];
      const int64_t hi = std::min(end, start[k + 1]) - start[k];
      T* tp = static_cast<T*>(segs[k].t);
      const S* sp = static_cast<const S*>(segs[k].s);
      if (k + 1 < segs.size()) {
        // Hardware prefetchers stop at page boundaries and small tensors are scattered over
        // the heap: start fetching the next segment's first lines while this one is processed.
        const char* nt = static_cast<const char*>(segs[k + 1].t);
        const char* ns = static_cast<const char*>(segs[k + 1].s);
        for (int line = 0; line < 4; ++line) {
          __builtin_prefetch(nt + 64 * line, 1);
          __builtin_prefetch(ns + 64 * line, 0);
        }
      }
      if constexpr (std::is_same_v<T, float> && std::is_same_v<S, float>) {
        ema_run_f32(tp + lo, sp + lo, hi - lo, d, w);
      } else {
        ema_run(tp + lo, sp + lo, hi - lo, d, w);
      }
    }
  };
  // Below ~64K elements the update is a few microseconds: threads would cost more than they save.
  constexpr int64_t kGrain = 1 << 16;
  at::parallel_for(0, total, kGrain, body);
}

template <typename T>
void dispatch_student(at::ScalarType s_type, const std::vector<Segment>& segs, double decay) {
  switch (s_type) {
    case at::kFloat: return ema_segments_cpu<T, float>(segs, decay);
    case at::kDouble: return ema_segments_cpu<T, double>(segs, decay);
    case at::kHalf: return ema_segments_cpu<T, c10::Half>(segs, decay);
    case at::kBFloat16: return ema_segments_cpu<T, c10::BFloat16>(segs, decay);
    default: TORCH_INTERNAL_ASSERT(false, "ema_update_: unexpected student dtype ", s_type);
  }
}

void dispatch_pair(at::ScalarType t_type, at::ScalarType s_type, const std::vector<Segment>& segs, double decay) {
  switch (t_type) {
    case at::kFloat: return dispatch_student<float>(s_type, segs, decay);
    case at::kDouble: return dispatch_student<double>(s_type, segs, decay);
    case at::kHalf: return dispatch_student<c10::Half>(s_type, segs, decay);
    case at::kBFloat16: return dispatch_student<c10::BFloat16>(s_type, segs, decay);
    default: TORCH_INTERNAL_ASSERT(false, "ema_update_: unexpected teacher dtype ", t_type);
  }
}

}  // namespace

void ema_update_cpu(at::TensorList teacher, at::TensorList student, double decay) {
  for (const auto& [types, segs] : ema_prepare(teacher, student, decay, c10::DeviceType::CPU)) {
    dispatch_pair(types.first, types.second, segs, decay);
  }
}

EmaPlan::EmaPlan(std::vector<at::Tensor> teacher, std::vector<at::Tensor> student)
    : teacher_(std::move(teacher)), student_(std::move(student)) {
  SSLSEG_CHECK(teacher_.size() == student_.size(), "EmaPlan: teacher and student must have the same number of tensors, got ",
               teacher_.size(), " and ", student_.size());
}

void EmaPlan::update(double decay) {
  if (teacher_.empty()) return;  // no tensor to pick a backend by, and nothing to do
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("sslseg::ema_update_", "")
                             .typed<void(at::TensorList, at::TensorList, double)>();
  // The kernels re-check every pair on each call (shapes, dtypes and devices may have changed
  // since the plan was made), so a stale plan raises instead of writing out of bounds.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  op.call(teacher_, student_, decay);
}

TORCH_LIBRARY_IMPL(sslseg, CPU, m) { m.impl("ema_update_", &ema_update_cpu); }

}  // namespace sslseg
