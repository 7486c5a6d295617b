// Exact Euclidean distance transform (sslseg::edt): for every nonzero voxel of a mask, the distance
// (in spacing units) to the nearest zero voxel; 0 on zeros. Separable (Saito-Toriwaki): a linear scan
// along one axis (Y) gives squared 1D distances, then Felzenszwalb-Huttenlocher lower envelopes of
// parabolas along each other axis (X, then Z). Linear time per line, lines independent (parallel).
//
// The per-line algorithms below are shared by the CPU (csrc/ops/cpu/edt.cpp) and CUDA
// (csrc/ops/cuda/edt.cu) kernels, so both execute the same arithmetic in the same order and give
// bit-identical results. Arithmetic goes through mul()/add()/sub()/div(), which on the device are
// the round-to-nearest intrinsics: nvcc would otherwise contract a*b+c into an FMA and round
// differently from the CPU.
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__CUDACC__)
#define SSLSEG_HD __host__ __device__ __forceinline__
#else
#define SSLSEG_HD inline
#endif

namespace sslseg {

// Validates mask and spacing (shared by both backends, so messages are identical).
void edt_check_args(const at::Tensor& mask, at::ArrayRef<double> spacing, c10::DeviceType expected_device);

// The working precision: float32 is exact when every spacing is equal (distances are computed in
// voxel units, squared distances are integers < 2^24, every envelope intersection is resolved
// correctly; see edt_detail::envelope_line) and each spatial size is <= 2048. Otherwise float64.
bool edt_use_float(at::IntArrayRef spatial_sizes, at::ArrayRef<double> spacing);

at::Tensor edt_cpu(const at::Tensor& mask, at::ArrayRef<double> spacing);
#if SSLSEG_WITH_CUDA
at::Tensor edt_cuda(const at::Tensor& mask, at::ArrayRef<double> spacing);
#endif

namespace edt_detail {

constexpr int64_t kMaxFloatSize = 2048;

// Round-to-nearest arithmetic without contraction on the device; plain operators on the host
// (x86-64 baseline code has no FMA, so the host never contracts).
template <typename W>
SSLSEG_HD W mul(W a, W b) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<W, float>) return __fmul_rn(a, b); else return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
template <typename W>
SSLSEG_HD W add(W a, W b) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<W, float>) return __fadd_rn(a, b); else return __dadd_rn(a, b);
#else
  return a + b;
#endif
}
template <typename W>
SSLSEG_HD W sub(W a, W b) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<W, float>) return __fsub_rn(a, b); else return __dsub_rn(a, b);
#else
  return a - b;
#endif
}
template <typename W>
SSLSEG_HD W div(W a, W b) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<W, float>) return __fdiv_rn(a, b); else return __ddiv_rn(a, b);
#else
  return a / b;
#endif
}

template <typename W>
SSLSEG_HD W inf() {
  return std::numeric_limits<W>::infinity();
}

// Squared distance contribution of an offset of `d` voxels along an axis of step `h`:
// (d * h)^2, written as scipy writes it (h is 1 on the float path, where this is exact).
template <typename W>
SSLSEG_HD W sq_step(int64_t d, W h) {
  const W x = mul(static_cast<W>(d), h);
  return mul(x, x);
}

// Final value of a voxel: on the float path the working value is an integer number of squared
// voxel steps and `scale` is the (common) spacing; on the float64 path it is already in squared
// physical units and scale is 1. sqrt is correctly rounded in double on host and device.
template <typename W>
SSLSEG_HD float finalize(W f, double scale) {
#if defined(__CUDA_ARCH__)
  return static_cast<float>(__dmul_rn(__dsqrt_rn(static_cast<double>(f)), scale));
#else
  return static_cast<float>(std::sqrt(static_cast<double>(f)) * scale);
#endif
}

// First pass along one line of the mask: squared distance to the nearest zero of the line,
// (d * h)^2, or +inf when the line has no zero. `Mask` and `Out` are strided accessors
// (get(q) -> bool "nonzero"; set(q, W)).
template <typename W, typename Mask, typename Out>
SSLSEG_HD void scan_line(const Mask& m, Out& out, int64_t n, W h) {
  // Forward: distance to the last zero on the left (stored as a count in W, exact: n <= 2^24
  // on the float path); backward: min with the next zero on the right, then square.
  int64_t last = -1;
  for (int64_t q = 0; q < n; ++q) {
    if (!m.get(q)) {
      last = q;
      out.set(q, W(0));
    } else {
      out.set(q, last >= 0 ? static_cast<W>(q - last) : inf<W>());
    }
  }
  int64_t next = -1;
  for (int64_t q = n - 1; q >= 0; --q) {
    if (!m.get(q)) {
      next = q;
      continue;
    }
    const W left = out.get(q);
    int64_t d;
    if (next >= 0) {
      const int64_t right = next - q;
      d = (left == inf<W>() || static_cast<W>(right) < left) ? right : static_cast<int64_t>(left);
    } else if (left != inf<W>()) {
      d = static_cast<int64_t>(left);
    } else {
      continue;  // no zero in the line: stays +inf
    }
    out.set(q, sq_step<W>(d, h));
  }
}

// Lower envelope of the parabolas y -> f(p) + ((y - p) h)^2 over one line (Felzenszwalb &
// Huttenlocher 2012), computed independently on each maximal run of nonzero f with the zeros that
// bound it: a voxel never has a nearer candidate beyond a zero of its own line (that zero is
// nearer), so runs of background cost nothing and each run is solved alone. +inf entries (no zero
// on the earlier axes) are not parabolas. The result overwrites `line` in place (through set(),
// which may also finalize); the stack keeps f(v[k]) so in-place writes never feed back.
//
// Exactness on the float path (h = 1, integer f < 2^24, n <= 2048): each intersection abscissa
// s = ((f_q + q^2) - (f_p + p^2)) / (2 (q - p)) has an exact numerator and one rounding; a
// rational with denominator <= 2n that is not an integer lies >= 1/(2n) from every integer, far
// more than the rounding error, so every comparison that decides the value at an integer sample
// is decided correctly, and ties (s an integer) are exact.
template <typename W, typename Line, typename Stack>
SSLSEG_HD void envelope_line(Line& line, Stack& st, int64_t n, W h) {
  int64_t q0 = 0;
  while (q0 < n) {
    if (line.get(q0) == W(0)) {
      line.set_zero(q0);
      ++q0;
      continue;
    }
    const int64_t a = q0;  // run [a, b) of nonzero f
    int64_t b = a + 1;
    while (b < n && line.get(b) != W(0)) ++b;
    const int64_t lo = a > 0 ? a - 1 : a;
    const int64_t hi = b < n ? b + 1 : b;

    int64_t k = -1;
    for (int64_t q = lo; q < hi; ++q) {
      const W fq = line.get(q);
      if (fq == inf<W>()) continue;
      const W cq = mul(static_cast<W>(q), h);
      const W eq = add(fq, mul(cq, cq));
      if (k < 0) {
        k = 0;
        st.set(0, q, fq, -inf<W>(), cq, eq);
        continue;
      }
      W s;
      while (true) {
        // c(k) = v(k) h and e(k) = f(k) + c(k)^2: stored (CPU) or recomputed (CUDA), same values.
        s = div(sub(eq, st.e(k)), mul(W(2), sub(cq, st.c(k))));
        if (k > 0 && s <= st.z(k)) {
          --k;
        } else {
          break;
        }
      }
      ++k;
      st.set(k, q, fq, s, cq, eq);
    }
    if (k < 0) {  // no finite value around this run: +inf throughout
      for (int64_t y = a; y < b; ++y) line.set(y, inf<W>());
    } else {
      int64_t j = 0;
      for (int64_t y = a; y < b; ++y) {
        const W cy = mul(static_cast<W>(y), h);
        while (j < k && st.z(j + 1) < cy) ++j;
        const int64_t p = st.v(j);
        line.set(y, add(st.f(j), sq_step<W>(y - p, h)));
      }
    }
    q0 = b;
  }
}

}  // namespace edt_detail
}  // namespace sslseg
