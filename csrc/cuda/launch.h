// What every CUDA kernel file of sslseg._C_cuda needs: from the stable ABI the current stream of a
// device and the launch check; the grid size of a grid-stride loop; typed loads and exp/log.
#pragma once

#include "checks.h"

#include <cuda_runtime.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/macros.h>
#include <torch/headeronly/util/shim_utils.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace sslseg {

// torch's current CUDA stream on `t`'s device (never the legacy default stream: it would race
// with work torch queued on its own streams). torch::stable::accelerator::Stream::nativeHandle()
// needs a torch 2.13 target; for the 2.10 target the AOTI shim in libtorch_cuda gives the same.
inline cudaStream_t current_stream(const Tensor& t) {
  void* stream = nullptr;
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(static_cast<int32_t>(t.get_device_index()), &stream));
  return static_cast<cudaStream_t>(stream);
}

// Makes `t`'s device current for the scope (allocations and launches go there).
struct CudaDeviceScope {
  explicit CudaDeviceScope(const Tensor& t) : guard(t.get_device_index()) {}
  torch::stable::accelerator::DeviceGuard guard;
};

// Blocks for a grid-stride loop over n items with `threads` per block (capped: the loop covers
// the rest).
inline int64_t blocks_for(int64_t n, int threads) {
  return std::min<int64_t>((n + threads - 1) / threads, int64_t{1} << 20);
}

#if defined(__CUDACC__)
// Loads *p as the accumulation type A (half types through float).
template <typename A, typename T>
__device__ __forceinline__ A load_as(const T* p) {
  if constexpr (std::is_same_v<T, double> || std::is_same_v<T, float>) return static_cast<A>(*p);
  else return static_cast<A>(static_cast<float>(*p));
}

// exp/log in the accumulation type.
__device__ __forceinline__ float dexp(float x) { return expf(x); }
__device__ __forceinline__ double dexp(double x) { return exp(x); }
__device__ __forceinline__ float dlog(float x) { return logf(x); }
__device__ __forceinline__ double dlog(double x) { return log(x); }
#endif

}  // namespace sslseg
