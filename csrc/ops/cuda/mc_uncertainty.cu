// CUDA kernels of sslseg::mc_softmax_accumulate_ and sslseg::mc_entropy_finalize_. One thread
// per (batch element, voxel) loops over the classes (channel stride S: neighbouring threads read
// neighbouring voxels, so every access is coalesced). Checks are shared with the CPU kernels (csrc/ops/mc_uncertainty.cpp).
#include "cuda/launch.h"
#include "ops/mc_uncertainty.h"

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

namespace sslseg {
namespace {

constexpr int kThreads = 256;

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
void launch_accumulate(const Tensor& acc, const Tensor& x, bool overwrite, cudaStream_t stream) {
  const int64_t B = acc.size(0), C = acc.size(1), S = acc.numel() / (B * C), total = B * S;
  A* ap = mut_ptr<A>(acc);
  auto run = [&](auto tag) {
    using L = decltype(tag);
    softmax_accumulate_kernel<L, A><<<blocks_for(total, kThreads), kThreads, 0, stream>>>(ap, const_ptr<L>(x), C, S,
                                                                                 total, overwrite);
    STD_CUDA_KERNEL_LAUNCH_CHECK();
  };
  switch (x.scalar_type()) {
    case ScalarType::Float: return run(float{});
    case ScalarType::Double: return run(double{});
    case ScalarType::Half: return run(torch::headeronly::Half{});
    case ScalarType::BFloat16: return run(torch::headeronly::BFloat16{});
    default: SSLSEG_CHECK(false, "mc_softmax_accumulate_: unexpected logits dtype ", dtype_name(x.scalar_type()));
  }
}

void mc_softmax_accumulate_cuda(Tensor acc, Tensor logits, bool overwrite) {
  mc_accumulate_check(acc, logits, DeviceType::CUDA);
  if (acc.numel() == 0) return;
  const CudaDeviceScope scope(acc);
  const cudaStream_t stream = current_stream(acc);
  const Tensor x = torch::stable::contiguous(logits);
  if (acc.scalar_type() == ScalarType::Double) launch_accumulate<double>(acc, x, overwrite, stream);
  else launch_accumulate<float>(acc, x, overwrite, stream);
}

Tensor mc_entropy_finalize_cuda(Tensor acc, int64_t count, bool normalize, double eps) {
  mc_finalize_check(acc, count, normalize, eps, DeviceType::CUDA);
  const CudaDeviceScope scope(acc);
  Tensor ent = mc_entropy_output(acc);
  if (acc.numel() == 0) return ent;
  const cudaStream_t stream = current_stream(acc);
  const int64_t B = acc.size(0), C = acc.size(1), S = acc.numel() / (B * C), total = B * S;
  const double log_c = std::log(static_cast<double>(C));
  if (acc.scalar_type() == ScalarType::Double) {
    finalize_kernel<double><<<blocks_for(total, kThreads), kThreads, 0, stream>>>(
        mut_ptr<double>(acc), mut_ptr<double>(ent), C, S, total, static_cast<double>(count), eps, normalize, log_c);
  } else {
    finalize_kernel<float><<<blocks_for(total, kThreads), kThreads, 0, stream>>>(
        mut_ptr<float>(acc), mut_ptr<float>(ent), C, S, total, static_cast<float>(count), static_cast<float>(eps),
        normalize, static_cast<float>(log_c));
  }
  STD_CUDA_KERNEL_LAUNCH_CHECK();
  return ent;
}

}  // namespace
}  // namespace sslseg

STABLE_TORCH_LIBRARY_IMPL(sslseg, CUDA, m) {
  m.impl("mc_softmax_accumulate_", TORCH_BOX(&sslseg::mc_softmax_accumulate_cuda));
  m.impl("mc_entropy_finalize_", TORCH_BOX(&sslseg::mc_entropy_finalize_cuda));
}
