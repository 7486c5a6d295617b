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

#include "checks.h"

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

// The set-up shared by the CPU (cpu/edt.cpp) and CUDA (cuda/edt.cu) kernels (csrc/ops/edt.cpp):
// checks (identical messages on both backends), the (B, Z, Y, X) view, the working precision and
// the float32 output.
struct EdtProblem {
  Tensor mask;  // contiguous
  Tensor out;   // float32, the shape of mask
  int64_t B = 1, Z = 1, Y = 1, X = 1;
  bool is3d = false;
  // The working precision: float32 is exact when every spacing is equal (distances are computed
  // in voxel units, squared distances are integers < 2^24, every envelope intersection is resolved
  // correctly; see edt_detail::envelope_line) and each spatial size is <= 2048. Otherwise float64.
  bool use_float = true;
  double sx = 1.0, sy = 1.0, sz = 1.0;  // spacing along X, Y, Z (sz = 1 in 2D)
};

// Checks mask and spacing and allocates the output (out.numel() == 0: nothing to do).
EdtProblem edt_prepare(const Tensor& mask, const std::vector<double>& spacing, DeviceType expected_device);

// Per-axis steps of working precision W: voxel units (1) on the float path, where the common
// spacing is applied at the end (`scale`); physical units on the float64 path (scale 1).
template <typename W>
struct EdtSteps {
  W hx, hy, hz;
  double scale;
};

template <typename W>
EdtSteps<W> edt_steps(const EdtProblem& p) {
  constexpr bool fp = std::is_same_v<W, float>;
  return {fp ? W(1) : static_cast<W>(p.sx), fp ? W(1) : static_cast<W>(p.sy), fp ? W(1) : static_cast<W>(p.sz),
          fp ? p.sx : 1.0};
}

// The working buffer: the output itself on the float path, a float64 scratch otherwise.
Tensor edt_work(const EdtProblem& p);

// Calls f(M{}, W{}) with M the C++ type of the mask dtype and W the working precision.
template <typename F>
void edt_dispatch(const EdtProblem& p, F&& f) {
  auto with_w = [&](auto m) {
    if (p.use_float) f(m, float{});
    else f(m, double{});
  };
  switch (p.mask.scalar_type()) {
    case ScalarType::Bool: return with_w(bool{});
    case ScalarType::Byte: return with_w(uint8_t{});
    case ScalarType::Char: return with_w(int8_t{});
    case ScalarType::Short: return with_w(int16_t{});
    case ScalarType::Int: return with_w(int32_t{});
    case ScalarType::Long: return with_w(int64_t{});
    default: SSLSEG_CHECK(false, "edt: unexpected mask dtype ", dtype_name(p.mask.scalar_type()));
  }
}

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
