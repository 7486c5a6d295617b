// CUDA kernel of sslseg::edt: one thread per line, running the per-line algorithms shared with the
// CPU kernel (csrc/ops/edt.h), after the set-up and checks they share (csrc/ops/edt.cpp), in the same pass order (scan along Y, then envelopes along X, then
// Z), so CPU and CUDA results are bit-identical. Along Y and Z, neighbouring threads own
// neighbouring lines, so every step of the line walk is a coalesced access across the warp. The envelope stacks live in
// a global scratch laid out [k][line] (coalesced too), processed in chunks of lines to bound it.
#include "cuda/launch.h"
#include "ops/edt.h"

#include <torch/csrc/stable/library.h>

#include <algorithm>
#include <cstdint>

namespace sslseg {
namespace {

using edt_detail::envelope_line;
using edt_detail::finalize;
using edt_detail::scan_line;

constexpr int kThreads = 128;
// Stack entries per chunk of lines (v int32 + f, z in W each): <= 8M entries, 96 MB (float) or
// 160 MB (double) of scratch whatever the volume.
constexpr int64_t kScratchEntries = int64_t(1) << 23;

template <typename M>
struct DevMaskLine {
  const M* p;
  int64_t stride;
  __device__ bool get(int64_t q) const { return p[q * stride] != M(0); }
};

template <typename W>
struct DevOutLine {
  W* p;
  int64_t stride;
  __device__ W get(int64_t q) const { return p[q * stride]; }
  __device__ void set(int64_t q, W v) { p[q * stride] = v; }
};

// A strided line of the working buffer. With `fin` set (last pass), results are finalized into
// fin instead; on the float path fin aliases work, and zeros are already 0 there.
template <typename W>
struct DevLine {
  W* work;
  float* fin;
  int64_t base;
  int64_t stride;
  double scale;
  __device__ W get(int64_t q) const { return work[base + q * stride]; }
  __device__ void set(int64_t q, W v) {
    if (fin != nullptr) {
      fin[base + q * stride] = finalize<W>(v, scale);
    } else {
      work[base + q * stride] = v;
    }
  }
  __device__ void set_zero(int64_t q) {
    if (fin != nullptr && static_cast<void*>(fin) != static_cast<void*>(work)) fin[base + q * stride] = 0.0f;
  }
};

template <typename W>
struct DevStack {
  int32_t* vv;
  W* ff;
  W* zz;
  int64_t stride;  // lines in the chunk
  int64_t idx;     // this line
  W h;
  __device__ int64_t v(int64_t k) const { return vv[k * stride + idx]; }
  __device__ W f(int64_t k) const { return ff[k * stride + idx]; }
  __device__ W z(int64_t k) const { return zz[k * stride + idx]; }
  // Recomputed rather than stored (less scratch traffic); the same operations as the CPU's store.
  __device__ W c(int64_t k) const { return edt_detail::mul(static_cast<W>(v(k)), h); }
  __device__ W e(int64_t k) const {
    const W ck = c(k);
    return edt_detail::add(f(k), edt_detail::mul(ck, ck));
  }
  __device__ void set(int64_t k, int64_t q, W f, W z, W /*c*/, W /*e*/) {
    vv[k * stride + idx] = static_cast<int32_t>(q);
    ff[k * stride + idx] = f;
    zz[k * stride + idx] = z;
  }
};

// Pass 1: the scan along Y; mask and work viewed as [outer, n, inner], thread per (o, i) line
// (neighbouring threads own neighbouring columns: coalesced).
template <typename M, typename W>
__global__ void edt_scan_kernel(const M* __restrict__ mask, W* __restrict__ work, int64_t lines, int64_t n,
                                int64_t inner, W h) {
  const int64_t l = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (l >= lines) return;
  const int64_t base = (l / inner) * n * inner + l % inner;
  DevMaskLine<M> m{mask + base, inner};
  DevOutLine<W> out{work + base, inner};
  scan_line<W>(m, out, n, h);
}

// Lines [first, first + count) of `work` viewed as [outer, n, inner]; line l = o * inner + i.
template <typename W>
__global__ void edt_envelope_kernel(W* work, float* fin, int32_t* sv, W* sf, W* sz, int64_t first, int64_t count,
                                    int64_t n, int64_t inner, W h, double scale) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= count) return;
  const int64_t l = first + idx;
  const int64_t o = l / inner;
  const int64_t i = l % inner;
  DevLine<W> line{work, fin, o * n * inner + i, inner, scale};
  DevStack<W> st{sv, sf, sz, count, idx, h};
  envelope_line<W>(line, st, n, h);
}

template <typename W>
void envelope_pass_cuda(W* work, float* fin, int64_t outer, int64_t n, int64_t inner, W h, double scale,
                        const Tensor& like, cudaStream_t stream) {
  const int64_t lines = outer * inner;
  if (lines == 0 || n == 0) return;
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(lines, kScratchEntries / (n + 1)));
  const int64_t entries = chunk * (n + 1);
  const IntList size(&entries, 1);
  const Tensor sv = new_tensor(like, size, ScalarType::Int);
  const auto wtype = std::is_same_v<W, float> ? ScalarType::Float : ScalarType::Double;
  const Tensor sf = new_tensor(like, size, wtype);
  const Tensor sz = new_tensor(like, size, wtype);
  for (int64_t first = 0; first < lines; first += chunk) {
    const int64_t count = std::min(chunk, lines - first);
    const int64_t blocks = (count + kThreads - 1) / kThreads;
    edt_envelope_kernel<W><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
        work, fin, mut_ptr<int32_t>(sv), mut_ptr<W>(sf), mut_ptr<W>(sz), first, count,
        n, inner, h, scale);
    STD_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename M, typename W>
void edt_run_cuda(const EdtProblem& p, cudaStream_t stream) {
  const EdtSteps<W> h = edt_steps<W>(p);
  const Tensor work_t = edt_work(p);
  W* work = mut_ptr<W>(work_t);
  float* result = mut_ptr<float>(p.out);
  // Pass order shared with the CPU kernel and the reference twin: scan along Y, envelopes along
  // X, then along Z.
  const int64_t columns = p.B * p.Z * p.X;
  const int64_t blocks = (columns + kThreads - 1) / kThreads;
  edt_scan_kernel<M, W><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(const_ptr<M>(p.mask), work,
                                                                                     columns, p.Y, p.X, h.hy);
  STD_CUDA_KERNEL_LAUNCH_CHECK();
  if (p.is3d) {
    envelope_pass_cuda<W>(work, nullptr, p.B * p.Z * p.Y, p.X, 1, h.hx, h.scale, p.out, stream);
    envelope_pass_cuda<W>(work, result, p.B, p.Z, p.Y * p.X, h.hz, h.scale, p.out, stream);
  } else {
    envelope_pass_cuda<W>(work, result, p.B * p.Z * p.Y, p.X, 1, h.hx, h.scale, p.out, stream);
  }
}

Tensor edt_cuda(Tensor mask, std::vector<double> spacing) {
  const CudaDeviceScope scope(mask);
  const EdtProblem p = edt_prepare(mask, spacing, DeviceType::CUDA);
  if (p.out.numel() == 0) return p.out;
  SSLSEG_CHECK(std::max({p.X, p.Y, p.Z}) < (int64_t(1) << 31),
               "edt: each spatial size must be < 2^31 on CUDA, got shape ", shape_str(mask));
  const cudaStream_t stream = current_stream(mask);
  edt_dispatch(p, [&](auto m, auto w) { edt_run_cuda<decltype(m), decltype(w)>(p, stream); });
  return p.out;
}

}  // namespace
}  // namespace sslseg

STABLE_TORCH_LIBRARY_IMPL(sslseg, CUDA, m) { m.impl("edt", TORCH_BOX(&sslseg::edt_cuda)); }
