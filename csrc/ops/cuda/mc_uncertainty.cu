// CUDA kernels of sslseg::mc_softmax_accumulate_ and sslseg::mc_entropy_finalize_. One thread
// per (batch element, voxel) loops over the classes (channel stride S: neighbouring threads read
// neighbouring voxels, so every access is coalesced). Checks are shared with the CPU kernels.
#include "checks.h"
#include "ops/mc_uncertainty.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace sslseg {
namespace {

constexpr int kThreads = 256;

int64_t blocks_for(int64_t n) { return std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t{1} << 20); }

template <typename A, typename L>
__device__ __forceinline__ A load_as(const L* p) {
  if constexpr (std::is_same_v<L, double> || std::is_same_v<L, float>) return static_cast<A>(*p);
  else return static_cast<A>(static_cast<float>(*p));
}

__device__ __forceinline__ float dexp(float x) { return expf(x); }
__device__ __forceinline__ double dexp(double x) { return exp(x); }
__device__ __forceinline__ float dlog(float x) { return logf(x); }
__device__ __forceinline__ double dlog(double x) { return log(x); }

template <typename L, typename A>
__global__ void softmax_accumulate_kernel(A* __restrict__ acc, const L* __restrict__ x, int64_t C, int64_t S,
                                          int64_t total, bool overwrite) {
  for (int64_t v = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; v < total;
       v += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = v / S, j = v % S;
    const L* xv = x + b * C * S + j;
    A* av = acc + b * C * S + j;
    A m = load_as<A>(xv);
    for (int64_t c = 1; c < C; ++c) {
      const A t = load_as<A>(xv + c * S);
      m = t > m ? t : m;
    }
    A sum = 0;
    for (int64_t c = 0; c < C; ++c) sum += dexp(load_as<A>(xv + c * S) - m);
    const A inv = A(1) / sum;
    for (int64_t c = 0; c < C; ++c) {
      const A p = dexp(load_as<A>(xv + c * S) - m) * inv;
      av[c * S] = overwrite ? p : av[c * S] + p;
    }
  }
}

template <typename A>
__global__ void finalize_kernel(A* __restrict__ acc, A* __restrict__ ent, int64_t C, int64_t S, int64_t total,
                                A count, A eps, bool normalize, A log_c) {
  for (int64_t v = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; v < total;
       v += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = v / S, j = v % S;
    A* av = acc + b * C * S + j;
    A h = 0;
    for (int64_t c = 0; c < C; ++c) {
      const A p = av[c * S] / count;
      av[c * S] = p;
      h -= p > A(0) ? p * dlog(p + eps) : A(0);
    }
    ent[v] = normalize ? h / log_c : h;
  }
}

template <typename A>
void launch_accumulate(const at::Tensor& acc, const at::Tensor& x, bool overwrite, cudaStream_t stream) {
  const int64_t B = acc.size(0), C = acc.size(1), S = acc.numel() / (B * C), total = B * S;
  A* ap = acc.data_ptr<A>();
  auto run = [&](auto tag) {
    using L = decltype(tag);
    softmax_accumulate_kernel<L, A><<<blocks_for(total), kThreads, 0, stream>>>(ap, x.const_data_ptr<L>(), C, S,
                                                                                 total, overwrite);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  switch (x.scalar_type()) {
    case at::kFloat: return run(float{});
    case at::kDouble: return run(double{});
    case at::kHalf: return run(c10::Half{});
    case at::kBFloat16: return run(c10::BFloat16{});
    default: TORCH_INTERNAL_ASSERT(false, "mc_softmax_accumulate_: unexpected logits dtype ", x.scalar_type());
  }
}

}  // namespace

void mc_softmax_accumulate_cuda(const at::Tensor& acc, const at::Tensor& logits, bool overwrite) {
  mc_accumulate_check(acc, logits, c10::DeviceType::CUDA);
  if (acc.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(acc.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor x = logits.contiguous();
  if (acc.scalar_type() == at::kDouble) launch_accumulate<double>(acc, x, overwrite, stream);
  else launch_accumulate<float>(acc, x, overwrite, stream);
}

at::Tensor mc_entropy_finalize_cuda(const at::Tensor& acc, int64_t count, bool normalize, double eps) {
  mc_finalize_check(acc, count, normalize, eps, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(acc.device());
  std::vector<int64_t> shape(acc.sizes().begin(), acc.sizes().end());
  shape[1] = 1;
  at::Tensor ent = at::empty(shape, acc.options());
  if (acc.numel() == 0) return ent;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t B = acc.size(0), C = acc.size(1), S = acc.numel() / (B * C), total = B * S;
  const double log_c = std::log(static_cast<double>(C));
  if (acc.scalar_type() == at::kDouble) {
    finalize_kernel<double><<<blocks_for(total), kThreads, 0, stream>>>(
        acc.data_ptr<double>(), ent.data_ptr<double>(), C, S, total, static_cast<double>(count), eps, normalize, log_c);
  } else {
    finalize_kernel<float><<<blocks_for(total), kThreads, 0, stream>>>(
        acc.data_ptr<float>(), ent.data_ptr<float>(), C, S, total, static_cast<float>(count), static_cast<float>(eps),
        normalize, static_cast<float>(log_c));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return ent;
}

TORCH_LIBRARY_IMPL(sslseg, CUDA, m) {
  m.impl("mc_softmax_accumulate_", &mc_softmax_accumulate_cuda);
  m.impl("mc_entropy_finalize_", &mc_entropy_finalize_cuda);
}

}  // namespace sslseg
