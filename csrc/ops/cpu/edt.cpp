// CPU kernel of sslseg::edt (set-up and checks shared with the CUDA kernel: csrc/ops/edt.cpp).
//
// Layout: the mask is viewed as (B, Z, Y, X) (Z = 1 for 2D), X contiguous. Pass 1 works plane by
// plane while the plane is in cache: the 1D scan along Y for all X at once (vectorised), then the
// envelope of each contiguous row along X. Pass 2 (3D) solves the lines along Z: they are gathered
// 64 at a time (256 contiguous bytes per plane, few pages per tile) into a transposed local tile,
// solved and scattered back. The last pass writes the float32 result (sqrt, and the spacing on
// the float path). Planes and tiles are split over threads when the volume holds enough work for
// it (csrc/parallel.h).
#include "ops/edt.h"
#include "parallel.h"

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace sslseg {

namespace {

using edt_detail::envelope_line;

// Serial cost per voxel of each pass (csrc/parallel.h), measured with one thread on the
// development host: 2D (4, 256, 256), plane pass with the final write, 9.4 ns per voxel; 3D
// (64^3, 128 x 128 x 96), both passes, 16.5-17.5 ns per voxel. A volume under ~110K voxels (2D)
// or ~60K (3D) runs on one thread, with no parallel region.
constexpr double kPlaneVoxelNs = 9.0;
constexpr double kDepthVoxelNs = 8.0;

template <typename W>
struct LocalLine {
  W* p;
  W get(int64_t q) const { return p[q]; }
  void set(int64_t q, W v) { p[q] = v; }
  void set_zero(int64_t q) {}  // already 0
};

template <typename W>
struct LocalStack {
  int64_t* vv;
  W* ff;
  W* zz;
  W* cc;
  W* ee;
  int64_t v(int64_t k) const { return vv[k]; }
  W f(int64_t k) const { return ff[k]; }
  W z(int64_t k) const { return zz[k]; }
  W c(int64_t k) const { return cc[k]; }
  W e(int64_t k) const { return ee[k]; }
  void set(int64_t k, int64_t q, W f, W z, W c, W e) {
    vv[k] = q;
    ff[k] = f;
    zz[k] = z;
    cc[k] = c;
    ee[k] = e;
  }
};

// Storage of one LocalStack for lines of up to n values.
template <typename W>
struct StackStorage {
  std::vector<int64_t> v;
  std::vector<W> w;  // f, z, c, e
  int64_t cap;
  explicit StackStorage(int64_t n) : v(static_cast<size_t>(n) + 1), w(static_cast<size_t>(4 * (n + 1))), cap(n + 1) {}
  LocalStack<W> view() { return {v.data(), w.data(), w.data() + cap, w.data() + 2 * cap, w.data() + 3 * cap}; }
};

// Solves lines of a slab viewed as [n, inner] (line i = elements i, i + inner, ...): lines are
// gathered `width` at a time into a transposed local tile (contiguous per line), solved, and
// scattered back; with `fin` set, the finalized float32 result is written there instead.
template <typename W>
struct TileSolver {
  std::vector<W> tile;
  StackStorage<W> stack;

  TileSolver(int64_t n, int64_t width) : tile(static_cast<size_t>(n * width)), stack(n) {}

  // Lines [i0, i0 + w) of the slab at `base` (and `fbase` for the final output).
  void solve(W* base, float* fbase, int64_t n, int64_t inner, int64_t i0, int64_t w, W h, double scale) {
    W* t = tile.data();
    // OR of the bit patterns: nonzero iff some value is nonzero (values are +0, > 0 or +inf).
    using Bits = std::conditional_t<std::is_same_v<W, float>, uint32_t, uint64_t>;
    Bits any = 0;
    for (int64_t q = 0; q < n; ++q) {
      const W* src = base + q * inner + i0;
      for (int64_t l = 0; l < w; ++l) {
        t[l * n + q] = src[l];
        Bits b;
        std::memcpy(&b, src + l, sizeof(b));
        any |= b;
      }
    }
    if (any == 0) {  // all background: zeros stay zeros
      if (fbase != nullptr && static_cast<void*>(fbase) != static_cast<void*>(base)) {
        for (int64_t q = 0; q < n; ++q) std::memset(fbase + q * inner + i0, 0, sizeof(float) * w);
      }
      return;
    }
    LocalStack<W> st = stack.view();
    for (int64_t l = 0; l < w; ++l) {
      LocalLine<W> line{t + l * n};
      envelope_line<W>(line, st, n, h);
    }
    if (fbase == nullptr) {
      for (int64_t q = 0; q < n; ++q) {
        W* dst = base + q * inner + i0;
        for (int64_t l = 0; l < w; ++l) dst[l] = t[l * n + q];
      }
    } else if (std::is_same_v<W, float> && scale == 1.0) {  // see finalize_run
      for (int64_t q = 0; q < n; ++q) {
        float* dst = fbase + q * inner + i0;
        for (int64_t l = 0; l < w; ++l) dst[l] = std::sqrt(static_cast<float>(t[l * n + q]));
      }
    } else {
      for (int64_t q = 0; q < n; ++q) {
        float* dst = fbase + q * inner + i0;
        for (int64_t l = 0; l < w; ++l) dst[l] = edt_detail::finalize<W>(t[l * n + q], scale);
      }
    }
  }
};

// Writes the finalized float32 values of `n` working values (in place when out aliases in).
template <typename W>
void finalize_run(const W* in, float* out, int64_t n, double scale) {
  if (std::is_same_v<W, float> && scale == 1.0) {
    // Unit spacing: the float sqrt of an integer < 2^24 equals the float rounding of its double
    // sqrt (no double-rounding case exists there), and is several times cheaper.
    for (int64_t i = 0; i < n; ++i) out[i] = std::sqrt(static_cast<float>(in[i]));
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = edt_detail::finalize<W>(in[i], scale);
  }
}

constexpr int32_t kNone = int32_t(1) << 30;  // "no zero yet": > any distance, no overflow

// Masks are read through their raw storage type (bool as uint8_t) so the scans stay branch-free.
template <typename M>
using RawMask = std::conditional_t<std::is_same_v<M, bool>, uint8_t, M>;

// One row of the column scans along Y, written branch-free (integer masks and selects) so that the
// compiler vectorises them over X. Forward: c = count since the last zero above (kNone if none).
template <typename M>
void scan_forward(const M* __restrict__ mask, int32_t* __restrict__ c, int32_t* __restrict__ fwd, int64_t n) {
  const RawMask<M>* m = reinterpret_cast<const RawMask<M>*>(mask);
  for (int64_t x = 0; x < n; ++x) {
    const int32_t keep = -static_cast<int32_t>(m[x] != 0);
    const int32_t v = (c[x] + 1) & keep;
    c[x] = v;
    fwd[x] = v;
  }
}

// Backward: c = count since the next zero below; the row's value is (min(fwd, c) * h)^2, or +inf
// when the column has no zero (selected on the bit patterns: a floating select would not be
// vectorised under -ftrapping-math).
template <typename M, typename W>
void scan_backward(const M* __restrict__ mask, int32_t* __restrict__ c, const int32_t* __restrict__ fwd,
                   W* __restrict__ out, int64_t n, W h) {
  using Bits = std::conditional_t<std::is_same_v<W, float>, uint32_t, uint64_t>;
  using SBits = std::make_signed_t<Bits>;
  const RawMask<M>* m = reinterpret_cast<const RawMask<M>*>(mask);
  const Bits inf_bits = std::bit_cast<Bits>(edt_detail::inf<W>());
  for (int64_t x = 0; x < n; ++x) {
    const int32_t keep = -static_cast<int32_t>(m[x] != 0);
    const int32_t v = (c[x] + 1) & keep;
    c[x] = v;
    const int32_t f = fwd[x];
    const int32_t d = v < f ? v : f;
    const W step = static_cast<W>(d) * h;  // == edt_detail::sq_step(d, h)
    const Bits none = static_cast<Bits>(-static_cast<SBits>(d >= kNone));
    out[x] = std::bit_cast<W>((std::bit_cast<Bits>(step * step) & ~none) | (inf_bits & none));
  }
}

// Pass 1 (fused, per (Y, X) plane, cache-resident): the 1D scan along Y for all columns at once
// (vectorised over X: forward counts, then backward min and square), then the envelope of every
// row along X, in place on contiguous memory. `fin` set: the rows are the last pass (2D).
template <typename M, typename W>
void plane_pass(const M* mask, W* work, float* fin, int64_t planes, int64_t Y, int64_t X, W hy, W hx, double scale) {
  parallel::parallel_for(0, planes, kPlaneVoxelNs * static_cast<double>(Y * X), [&](int64_t p0, int64_t p1) {
    std::vector<int32_t> fwd(static_cast<size_t>(Y * X));
    std::vector<int32_t> cnt(static_cast<size_t>(X));
    StackStorage<W> stack(X);
    LocalStack<W> st = stack.view();
    int32_t* c = cnt.data();
    for (int64_t p = p0; p < p1; ++p) {
      const M* mp = mask + p * Y * X;
      W* wp = work + p * Y * X;
      std::fill(cnt.begin(), cnt.end(), kNone);
      for (int64_t y = 0; y < Y; ++y) {
        scan_forward<M>(mp + y * X, c, fwd.data() + y * X, X);
      }
      std::fill(cnt.begin(), cnt.end(), kNone);
      for (int64_t y = Y - 1; y >= 0; --y) {
        scan_backward<M, W>(mp + y * X, c, fwd.data() + y * X, wp + y * X, X, hy);
      }
      for (int64_t y = 0; y < Y; ++y) {
        W* wr = wp + y * X;
        LocalLine<W> line{wr};
        envelope_line<W>(line, st, X, hx);
        if (fin != nullptr) finalize_run<W>(wr, fin + p * Y * X + y * X, X, scale);
      }
    }
  });
}

// Pass 2 (3D): the lines along Z of each batch element, [Z, Y * X] slabs, wide tiles (fewer pages
// touched per gathered line), final.
template <typename W>
void depth_pass(W* work, float* fin, int64_t B, int64_t Z, int64_t inner, W hz, double scale) {
  constexpr int64_t kTile = 64;
  const int64_t tiles_per_b = (inner + kTile - 1) / kTile;
  parallel::parallel_for(0, B * tiles_per_b, kDepthVoxelNs * static_cast<double>(Z * kTile), [&](int64_t t0, int64_t t1) {
    TileSolver<W> solver(Z, kTile);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / tiles_per_b;
      const int64_t i0 = (t % tiles_per_b) * kTile;
      solver.solve(work + b * Z * inner, fin + b * Z * inner, Z, inner, i0, std::min(kTile, inner - i0), hz, scale);
    }
  });
}

template <typename M, typename W>
void edt_run(const EdtProblem& p) {
  const EdtSteps<W> h = edt_steps<W>(p);
  const Tensor work_t = edt_work(p);
  W* work = mut_ptr<W>(work_t);
  float* result = mut_ptr<float>(p.out);
  const M* m = const_ptr<M>(p.mask);
  // Pass order (shared with the CUDA kernel and the reference twin): scan along Y, envelopes
  // along X, then along Z.
  if (p.is3d) {
    plane_pass<M, W>(m, work, nullptr, p.B * p.Z, p.Y, p.X, h.hy, h.hx, h.scale);
    depth_pass<W>(work, result, p.B, p.Z, p.Y * p.X, h.hz, h.scale);
  } else {
    plane_pass<M, W>(m, work, result, p.B, p.Y, p.X, h.hy, h.hx, h.scale);
  }
}

Tensor edt_cpu(Tensor mask, std::vector<double> spacing) {
  const EdtProblem p = edt_prepare(mask, spacing, DeviceType::CPU);
  if (p.out.numel() == 0) return p.out;
  edt_dispatch(p, [&](auto m, auto w) { edt_run<decltype(m), decltype(w)>(p); });
  return p.out;
}

}  // namespace
}  // namespace sslseg

STABLE_TORCH_LIBRARY_IMPL(sslseg, CPU, m) { m.impl("edt", TORCH_BOX(&sslseg::edt_cpu)); }
