// CUDA kernels of sslseg::sw_gather and sslseg::sw_accumulate_. The checks, the grid and the
// first/last rules are shared with the CPU kernels (csrc/ops/sliding_window.cpp).
//
// One launch per window: windows of one call may overlap in the output, and a launch per window
// keeps the accumulation order (and so the rounding) of the CPU kernel and of MONAI without
// atomics. A window is ~1e5-1e6 voxels, so launches are not the cost. In sw_accumulate_ a thread
// owns one voxel and loops over the channels (coalesced: neighbouring threads, neighbouring x2).
#include "cuda/launch.h"
#include "ops/sliding_window.h"

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

namespace sslseg {
namespace {

constexpr int kThreads = 256;

// Rounded products: keep nvcc from contracting `out + pred * importance` into one FMA, so the
// result rounds like the CPU kernel (and MONAI's separate mul_ and add_).
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

struct GatherArgs {
  int64_t vsize[3];
  int64_t vstride[5];
  int64_t roi[3];
  int64_t start[3];
  int64_t b;
  int64_t channels;
};

template <typename T>
__global__ void gather_kernel(const T* __restrict__ src, T* __restrict__ dst, GatherArgs a, int64_t total, T pad) {
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t t = idx;
    const int64_t i2 = t % a.roi[2];
    t /= a.roi[2];
    const int64_t i1 = t % a.roi[1];
    t /= a.roi[1];
    const int64_t i0 = t % a.roi[0];
    const int64_t c = t / a.roi[0];
    const int64_t x0 = a.start[0] + i0, x1 = a.start[1] + i1, x2 = a.start[2] + i2;
    const bool inside = x0 >= 0 && x0 < a.vsize[0] && x1 >= 0 && x1 < a.vsize[1] && x2 >= 0 && x2 < a.vsize[2];
    dst[idx] = inside ? src[a.b * a.vstride[0] + c * a.vstride[1] + x0 * a.vstride[2] + x1 * a.vstride[3] +
                            x2 * a.vstride[4]]
                      : pad;
  }
}

struct AccArgs {
  int64_t ostride[5];
  int64_t pstride[5];
  int64_t wstride[3];
  int64_t roi[3];
  int64_t lo[3];
  int64_t ext[3];
  int64_t start[3];
  int64_t first_from[3];
  int64_t last_before[3];
  int64_t b;
  int64_t n;
  int64_t channels;
  // Separable importance (imp is 1-D): offsets of the per-dim factors in imp (-1: the dummy
  // leading dim of a 2D problem, factor 1) and of the floor.
  bool separable;
  int64_t f_off[3];
  int64_t floor_off;
};

template <typename A>
__device__ __forceinline__ A importance_at(const A* __restrict__ imp, const AccArgs& a, int64_t i0, int64_t i1,
                                           int64_t i2) {
  if (!a.separable) return imp[(i0 * a.roi[1] + i1) * a.roi[2] + i2];
  const A f0 = a.f_off[0] >= 0 ? imp[a.f_off[0] + i0] : A(1);
  const A v = mul_rn(mul_rn(f0, imp[a.f_off[1] + i1]), imp[a.f_off[2] + i2]);
  const A floor = imp[a.floor_off];
  return v < floor ? floor : v;
}

// One thread per voxel of the (clipped) window, looping over the channels: the importance and
// weight are read once per voxel, and the softmax over channels needs every channel anyway.
template <typename P, typename A>
__global__ void accumulate_kernel(A* __restrict__ out, const P* __restrict__ pred, const A* __restrict__ imp,
                                  const A* __restrict__ wt, AccArgs a, int64_t total, bool softmax) {
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t t = idx;
    const int64_t x2 = a.lo[2] + t % a.ext[2];
    t /= a.ext[2];
    const int64_t x1 = a.lo[1] + t % a.ext[1];
    const int64_t x0 = a.lo[0] + t / a.ext[1];
    const int64_t i0 = x0 - a.start[0], i1 = x1 - a.start[1], i2 = x2 - a.start[2];
    const P* pv = pred + a.n * a.pstride[0] + i0 * a.pstride[2] + i1 * a.pstride[3] + i2 * a.pstride[4];
    A* ov = out + a.b * a.ostride[0] + x0 * a.ostride[2] + x1 * a.ostride[3] + x2 * a.ostride[4];
    const bool first = x0 >= a.first_from[0] && x1 >= a.first_from[1] && x2 >= a.first_from[2];
    const bool last = wt != nullptr && x0 < a.last_before[0] && x1 < a.last_before[1] && x2 < a.last_before[2];
    const A iw = imp != nullptr ? importance_at(imp, a, i0, i1, i2) : A(1);
    const A wv = last ? wt[x0 * a.wstride[0] + x1 * a.wstride[1] + x2 * a.wstride[2]] : A(1);
    A m = 0, inv = 1;
    if (softmax) {
      m = load_as<A>(pv);
      for (int64_t c = 1; c < a.channels; ++c) {
        const A v = load_as<A>(pv + c * a.pstride[1]);
        m = v > m ? v : m;
      }
      A sum = 0;
      for (int64_t c = 0; c < a.channels; ++c) sum += dexp(load_as<A>(pv + c * a.pstride[1]) - m);
      inv = A(1) / sum;
    }
    for (int64_t c = 0; c < a.channels; ++c) {
      A v = load_as<A>(pv + c * a.pstride[1]);
      if (softmax) v = mul_rn(dexp(v - m), inv);
      if (imp != nullptr) v = mul_rn(v, iw);
      A* o = ov + c * a.ostride[1];
      if (!first) v = *o + v;
      if (last) v = v / wv;
      *o = v;
    }
  }
}

template <typename T>
void launch_gather(const Tensor& volume, Tensor& out, const SwGrid& g, int64_t wb, int64_t we, double pad,
                   cudaStream_t stream) {
  const Sw5 v = sw_as5(volume);
  GatherArgs a;
  for (int d = 0; d < 3; ++d) {
    a.vsize[d] = v.size[2 + d];
    a.roi[d] = g.roi[d];
  }
  for (int d = 0; d < 5; ++d) a.vstride[d] = v.stride[d];
  a.channels = v.size[1];
  const int64_t per_window = a.channels * g.roi[0] * g.roi[1] * g.roi[2];
  T padv;
  if constexpr (std::is_same_v<T, double>) padv = pad;
  else padv = static_cast<T>(static_cast<float>(pad));
  const T* src = const_ptr<T>(volume);
  T* dst = mut_ptr<T>(out);
  for (int64_t w = wb; w < we; ++w) {
    const SwWindow win = sw_window(g, w);
    a.b = win.b;
    for (int d = 0; d < 3; ++d) a.start[d] = win.start[d];
    gather_kernel<T><<<blocks_for(per_window, kThreads), kThreads, 0, stream>>>(src, dst + (w - wb) * per_window, a, per_window,
                                                                        padv);
    STD_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename P, typename A>
void launch_accumulate(const Tensor& out, const Tensor& pred, const std::optional<Tensor>& imp, const Tensor* weight,
                       const SwGrid& g, int64_t window_begin, bool softmax, cudaStream_t stream) {
  const Sw5 o5 = sw_as5(out), p5 = sw_as5(pred);
  AccArgs a;
  for (int d = 0; d < 5; ++d) {
    a.ostride[d] = o5.stride[d];
    a.pstride[d] = p5.stride[d];
  }
  for (int d = 0; d < 3; ++d) {
    a.wstride[d] = 0;
    a.roi[d] = g.roi[d];
  }
  if (weight) {
    const int nd = static_cast<int>(weight->dim());
    for (int d = 0; d < nd; ++d) a.wstride[3 - nd + d] = weight->stride(d);
  }
  A* op = mut_ptr<A>(out);
  const P* pp = const_ptr<P>(pred);
  const A* ip = imp ? const_ptr<A>(*imp) : nullptr;
  a.separable = imp && imp->dim() == 1;
  a.f_off[0] = -1;
  int64_t off = 0;
  for (int d = 3 - g.nd; d < 3; ++d) {
    a.f_off[d] = off;
    off += g.roi[d];
  }
  a.floor_off = off;
  const A* wp = weight ? const_ptr<A>(*weight) : nullptr;
  a.channels = o5.size[1];
  for (int64_t n = 0; n < p5.size[0]; ++n) {
    const SwWindow win = sw_window(g, window_begin + n);
    int64_t total = 1;  // voxels of the clipped window
    for (int d = 0; d < 3; ++d) {
      a.lo[d] = std::max<int64_t>(win.start[d], 0);
      const int64_t hi = std::min<int64_t>(win.start[d] + g.roi[d], o5.size[2 + d]);
      a.ext[d] = std::max<int64_t>(hi - a.lo[d], 0);
      a.start[d] = win.start[d];
      a.first_from[d] = win.first_from[d];
      a.last_before[d] = win.last_before[d];
      total *= a.ext[d];
    }
    if (total == 0) continue;
    a.b = win.b;
    a.n = n;
    accumulate_kernel<P, A><<<blocks_for(total, kThreads), kThreads, 0, stream>>>(op, pp, ip, wp, a, total, softmax);
    STD_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename A>
void accumulate_pred(const Tensor& out, const Tensor& pred, const std::optional<Tensor>& imp, const Tensor* weight,
                     const SwGrid& g, int64_t window_begin, bool softmax, cudaStream_t stream) {
  switch (pred.scalar_type()) {
    case ScalarType::Float: return launch_accumulate<float, A>(out, pred, imp, weight, g, window_begin, softmax, stream);
    case ScalarType::Double: return launch_accumulate<double, A>(out, pred, imp, weight, g, window_begin, softmax, stream);
    case ScalarType::Half: return launch_accumulate<torch::headeronly::Half, A>(out, pred, imp, weight, g, window_begin, softmax, stream);
    case ScalarType::BFloat16:
      return launch_accumulate<torch::headeronly::BFloat16, A>(out, pred, imp, weight, g, window_begin, softmax, stream);
    default: SSLSEG_CHECK(false, "sw_accumulate_: unexpected pred dtype ", dtype_name(pred.scalar_type()));
  }
}

Tensor sw_gather_cuda(Tensor volume, std::vector<int64_t> roi_size, std::vector<int64_t> starts,
                      std::vector<int64_t> counts, int64_t window_begin, int64_t window_end, double pad_value) {
  const SwGrid g = sw_gather_check(volume, roi_size, starts, counts, window_begin, window_end, DeviceType::CUDA);
  const CudaDeviceScope scope(volume);
  Tensor out = sw_gather_output(volume, roi_size, window_begin, window_end);
  if (out.numel() == 0) return out;
  const cudaStream_t stream = current_stream(volume);
  switch (volume.scalar_type()) {
    case ScalarType::Float: launch_gather<float>(volume, out, g, window_begin, window_end, pad_value, stream); break;
    case ScalarType::Double: launch_gather<double>(volume, out, g, window_begin, window_end, pad_value, stream); break;
    case ScalarType::Half:
      launch_gather<torch::headeronly::Half>(volume, out, g, window_begin, window_end, pad_value, stream);
      break;
    case ScalarType::BFloat16:
      launch_gather<torch::headeronly::BFloat16>(volume, out, g, window_begin, window_end, pad_value, stream);
      break;
    default: SSLSEG_CHECK(false, "sw_gather: unexpected dtype ", dtype_name(volume.scalar_type()));
  }
  return out;
}

void sw_accumulate_cuda(Tensor out, Tensor pred, std::optional<Tensor> importance, std::optional<Tensor> weight,
                        std::vector<int64_t> starts, std::vector<int64_t> counts, int64_t window_begin, bool softmax) {
  const SwGrid g = sw_accumulate_check(out, pred, importance, weight, starts, counts, window_begin, DeviceType::CUDA);
  if (out.numel() == 0 || pred.numel() == 0) return;
  const CudaDeviceScope scope(out);
  const cudaStream_t stream = current_stream(out);
  const std::optional<Tensor> imp =
      importance.has_value() && importance->defined() ? std::optional<Tensor>(torch::stable::contiguous(*importance))
                                                      : std::nullopt;
  const bool has_w = weight.has_value() && weight->defined();
  const Tensor* w = has_w ? &*weight : nullptr;
  if (out.scalar_type() == ScalarType::Double) accumulate_pred<double>(out, pred, imp, w, g, window_begin, softmax, stream);
  else accumulate_pred<float>(out, pred, imp, w, g, window_begin, softmax, stream);
}

}  // namespace
}  // namespace sslseg

STABLE_TORCH_LIBRARY_IMPL(sslseg, CUDA, m) {
  m.impl("sw_gather", TORCH_BOX(&sslseg::sw_gather_cuda));
  m.impl("sw_accumulate_", TORCH_BOX(&sslseg::sw_accumulate_cuda));
}
