// CUDA kernel of sslseg::ema_update_: multi-tensor apply. Tensor addresses and a block -> (tensor,
// chunk) map travel in the kernel's parameter space, so a whole parameter list is updated by one
// launch (a few for very long lists) with no host-device metadata copy.
#include "cuda/launch.h"
#include "ops/ema.h"

#include <torch/csrc/stable/library.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <cstdint>
#include <map>
#include <type_traits>
#include <utility>
#include <vector>

namespace sslseg {
namespace {

constexpr int kMaxTensors = 48;   // tensors per launch
constexpr int kMaxBlocks = 320;   // blocks per launch; metadata stays under the 4 KB parameter limit
constexpr int kThreads = 512;
constexpr int64_t kChunk = 16384; // elements per block (a multiple of every vector width used)

struct EmaMeta {
  void* t[kMaxTensors];
  const void* s[kMaxTensors];
  int64_t n[kMaxTensors];
  int16_t block_tensor[kMaxBlocks];
  int32_t block_chunk[kMaxBlocks];
};
static_assert(sizeof(EmaMeta) <= 4000, "kernel parameter block too large");

template <typename T> struct Vec;
template <> struct Vec<float> { static constexpr int n = 4; };
template <> struct Vec<double> { static constexpr int n = 2; };
template <> struct Vec<torch::headeronly::Half> { static constexpr int n = 8; };
template <> struct Vec<torch::headeronly::BFloat16> { static constexpr int n = 8; };

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, typename S>
__global__ void ema_kernel(EmaMeta meta, double decay) {
  using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const acc_t d = static_cast<acc_t>(decay);
  const acc_t w = static_cast<acc_t>(1.0 - decay);
  const int ti = meta.block_tensor[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(meta.block_chunk[blockIdx.x]) * kChunk;
  const int64_t end = min(begin + kChunk, meta.n[ti]);
  T* __restrict__ tp = static_cast<T*>(meta.t[ti]);
  const S* __restrict__ sp = static_cast<const S*>(meta.s[ti]);

  // Vector width limited by the narrower access: both pointers must be aligned to it.
  constexpr int V = Vec<T>::n < Vec<S>::n ? Vec<T>::n : Vec<S>::n;
  const bool aligned = (reinterpret_cast<uintptr_t>(tp) % (sizeof(T) * V) == 0) &&
                       (reinterpret_cast<uintptr_t>(sp) % (sizeof(S) * V) == 0);
  int64_t i = begin;
  if (aligned) {
    // begin is a multiple of kChunk, hence of V: every vector access below is aligned.
    const int64_t vec_end = begin + ((end - begin) / V) * V;
    for (int64_t j = begin + static_cast<int64_t>(threadIdx.x) * V; j < vec_end; j += static_cast<int64_t>(blockDim.x) * V) {
      Pack<T, V> tv = *reinterpret_cast<Pack<T, V>*>(tp + j);
      const Pack<S, V> sv = *reinterpret_cast<const Pack<S, V>*>(sp + j);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        tv.v[k] = static_cast<T>(d * static_cast<acc_t>(tv.v[k]) + w * static_cast<acc_t>(sv.v[k]));
      }
      *reinterpret_cast<Pack<T, V>*>(tp + j) = tv;
    }
    i = vec_end;
  }
  for (int64_t j = i + threadIdx.x; j < end; j += blockDim.x) {
    tp[j] = static_cast<T>(d * static_cast<acc_t>(tp[j]) + w * static_cast<acc_t>(sp[j]));
  }
}

using Segment = EmaSegment;

template <typename T, typename S>
void launch_group(const std::vector<Segment>& segs, double decay, cudaStream_t stream) {
  EmaMeta meta;
  int n_tensors = 0;
  int n_blocks = 0;
  auto flush = [&]() {
    if (n_blocks == 0) return;
    ema_kernel<T, S><<<n_blocks, kThreads, 0, stream>>>(meta, decay);
    STD_CUDA_KERNEL_LAUNCH_CHECK();
    n_blocks = 0;
    n_tensors = 0;
  };
  for (const Segment& seg : segs) {
    const int64_t chunks = (seg.n + kChunk - 1) / kChunk;
    for (int64_t c = 0; c < chunks; ++c) {
      if (c == 0 || n_tensors == 0) {
        if (n_tensors == kMaxTensors) flush();
        meta.t[n_tensors] = seg.t;
        meta.s[n_tensors] = seg.s;
        meta.n[n_tensors] = seg.n;
        ++n_tensors;
      }
      meta.block_tensor[n_blocks] = static_cast<int16_t>(n_tensors - 1);
      meta.block_chunk[n_blocks] = static_cast<int32_t>(c);
      ++n_blocks;
      if (n_blocks == kMaxBlocks) flush();  // a tensor spanning launches is re-entered above
    }
  }
  flush();
}

template <typename T>
void dispatch_student(ScalarType s_type, const std::vector<Segment>& segs, double decay, cudaStream_t stream) {
  switch (s_type) {
    case ScalarType::Float: return launch_group<T, float>(segs, decay, stream);
    case ScalarType::Double: return launch_group<T, double>(segs, decay, stream);
    case ScalarType::Half: return launch_group<T, torch::headeronly::Half>(segs, decay, stream);
    case ScalarType::BFloat16: return launch_group<T, torch::headeronly::BFloat16>(segs, decay, stream);
    default: SSLSEG_CHECK(false, "ema_update_: unexpected student dtype ", dtype_name(s_type));
  }
}

void dispatch_pair(ScalarType t_type, ScalarType s_type, const std::vector<Segment>& segs, double decay,
                   cudaStream_t stream) {
  switch (t_type) {
    case ScalarType::Float: return dispatch_student<float>(s_type, segs, decay, stream);
    case ScalarType::Double: return dispatch_student<double>(s_type, segs, decay, stream);
    case ScalarType::Half: return dispatch_student<torch::headeronly::Half>(s_type, segs, decay, stream);
    case ScalarType::BFloat16: return dispatch_student<torch::headeronly::BFloat16>(s_type, segs, decay, stream);
    default: SSLSEG_CHECK(false, "ema_update_: unexpected teacher dtype ", dtype_name(t_type));
  }
}

void ema_update_lists_cuda(const std::vector<Tensor>& teacher, const std::vector<Tensor>& student, double decay) {
  if (teacher.empty()) {
    ema_check_args(teacher, student, decay, DeviceType::CUDA);  // a length mismatch still raises
    return;
  }
  for (size_t i = 1; i < teacher.size(); ++i) {
    SSLSEG_CHECK(same_device(teacher[i], teacher[0]), "ema_update_: every tensor must be on one device; ",
                 item_name("teacher", i), " is on ", device_str(teacher[i]), " but teacher[0] is on ",
                 device_str(teacher[0]));
  }
  EmaWork work = ema_prepare(teacher, student, decay, DeviceType::CUDA);
  const CudaDeviceScope scope(teacher[0]);
  const cudaStream_t stream = current_stream(teacher[0]);
  for (const auto& [types, segs] : work.groups) dispatch_pair(types.first, types.second, segs, decay, stream);
  ema_finish(work);
}

void ema_update_cuda(std::vector<Tensor> teacher, std::vector<Tensor> student, double decay) {
  ema_update_lists_cuda(teacher, student, decay);
}

int64_t ema_plan_new_cuda(std::vector<Tensor> teacher, std::vector<Tensor> student) {
  return ema_plan_new(std::move(teacher), std::move(student), DeviceType::CUDA, &ema_update_lists_cuda);
}

}  // namespace
}  // namespace sslseg

STABLE_TORCH_LIBRARY_IMPL(sslseg, CUDA, m) {
  m.impl("ema_update_", TORCH_BOX(&sslseg::ema_update_cuda));
  m.impl("_ema_plan_new", TORCH_BOX(&sslseg::ema_plan_new_cuda));
}
