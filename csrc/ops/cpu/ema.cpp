// CPU kernel of sslseg::ema_update_. The whole tensor list is one work range, split across threads
// only when it holds enough work (csrc/parallel.h): a list of many small tensors costs one serial
// pass, a big list one parallel region, never one dispatch per tensor.
#include "ops/ema.h"
#include "parallel.h"

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace sslseg {
namespace {

using Half = torch::headeronly::Half;
using BFloat16 = torch::headeronly::BFloat16;

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
void ema_segments_cpu(const std::vector<EmaSegment>& segs, double decay) {
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
  // One element reads teacher and student and writes teacher: a streaming loop (csrc/parallel.h).
  // Lists up to ~4M float32 elements run serially, with no parallel region.
  parallel::parallel_for(0, total, parallel::stream_ns(2.0 * sizeof(T) + sizeof(S)), body);
}

template <typename T>
void dispatch_student(ScalarType s_type, const std::vector<EmaSegment>& segs, double decay) {
  switch (s_type) {
    case ScalarType::Float: return ema_segments_cpu<T, float>(segs, decay);
    case ScalarType::Double: return ema_segments_cpu<T, double>(segs, decay);
    case ScalarType::Half: return ema_segments_cpu<T, Half>(segs, decay);
    case ScalarType::BFloat16: return ema_segments_cpu<T, BFloat16>(segs, decay);
    default: SSLSEG_CHECK(false, "ema_update_: unexpected student dtype ", dtype_name(s_type));
  }
}

void dispatch_pair(ScalarType t_type, ScalarType s_type, const std::vector<EmaSegment>& segs, double decay) {
  switch (t_type) {
    case ScalarType::Float: return dispatch_student<float>(s_type, segs, decay);
    case ScalarType::Double: return dispatch_student<double>(s_type, segs, decay);
    case ScalarType::Half: return dispatch_student<Half>(s_type, segs, decay);
    case ScalarType::BFloat16: return dispatch_student<BFloat16>(s_type, segs, decay);
    default: SSLSEG_CHECK(false, "ema_update_: unexpected teacher dtype ", dtype_name(t_type));
  }
}

void ema_update_lists_cpu(const std::vector<Tensor>& teacher, const std::vector<Tensor>& student, double decay) {
  EmaWork work = ema_prepare(teacher, student, decay, DeviceType::CPU);
  for (const auto& [types, segs] : work.groups) dispatch_pair(types.first, types.second, segs, decay);
  ema_finish(work);
}

void ema_update_cpu(std::vector<Tensor> teacher, std::vector<Tensor> student, double decay) {
  ema_update_lists_cpu(teacher, student, decay);
}

int64_t ema_plan_new_cpu(std::vector<Tensor> teacher, std::vector<Tensor> student) {
  return ema_plan_new(std::move(teacher), std::move(student), DeviceType::CPU, &ema_update_lists_cpu);
}

// The handle ops take no tensor (nothing to dispatch on): one kernel for every backend, here.
EmaPlan* plan_of(int64_t handle) {
  SSLSEG_CHECK(handle != 0, "ema plan: the handle is null (freed or never created)");
  return reinterpret_cast<EmaPlan*>(static_cast<intptr_t>(handle));
}

void ema_plan_update(int64_t handle, double decay) {
  const EmaPlan* plan = plan_of(handle);
  plan->update(plan->teacher, plan->student, decay);
}

void ema_plan_free(int64_t handle) { delete plan_of(handle); }

}  // namespace
}  // namespace sslseg

STABLE_TORCH_LIBRARY_IMPL(sslseg, CPU, m) {
  m.impl("ema_update_", TORCH_BOX(&sslseg::ema_update_cpu));
  m.impl("_ema_plan_new", TORCH_BOX(&sslseg::ema_plan_new_cpu));
}

STABLE_TORCH_LIBRARY_IMPL(sslseg, CompositeExplicitAutograd, m) {
  m.impl("_ema_plan_update", TORCH_BOX(&sslseg::ema_plan_update));
  m.impl("_ema_plan_free", TORCH_BOX(&sslseg::ema_plan_free));
}
