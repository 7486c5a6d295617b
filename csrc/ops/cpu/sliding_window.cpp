// CPU kernels of sslseg::sw_gather and sslseg::sw_accumulate_ (checks and grid helpers shared
// with the CUDA kernels: csrc/ops/sliding_window.cpp).
//
// sw_accumulate_ writes the first window that covers a voxel (no zero-fill of the output is
// needed), adds the later ones, and divides by the blending weight when the last window covering
// the voxel is added: one pass over each window's output, the normalisation fused into it (and,
// with softmax=true, the softmax over channels of the window's logits as well).
#include "fastmath.h"
#include "ops/sliding_window.h"

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace sslseg {
namespace {

// ---- gather ------------------------------------------------------------------------------------

template <typename T>
void gather_impl(const Tensor& volume, Tensor& out, const SwGrid& g, int64_t wb, int64_t we, double pad) {
  const Sw5 v = sw_as5(volume);
  const T* src = const_ptr<T>(volume);
  T* dst = mut_ptr<T>(out);
  T padv;
  if constexpr (std::is_same_v<T, double>) padv = pad;
  else padv = static_cast<T>(static_cast<float>(pad));
  std::vector<SwWindow> wins;
  for (int64_t w = wb; w < we; ++w) wins.push_back(sw_window(g, w));
  const int64_t C = v.size[1];
  const int64_t r0 = g.roi[0], r1 = g.roi[1], r2 = g.roi[2];
  const int64_t rows = (we - wb) * C * r0 * r1;
  // Not sslseg::parallel::parallel_for (csrc/parallel.h): one window's gather is 0.1-0.9 ms, under
  // its 1 ms threshold, and running it serially made the sliding-window overhead 1.4-1.55x MONAI's
  // instead of 0.9x on an idle host (bench_sliding_window.py, LA volume). A row grain of ~32k
  // elements keeps it parallel until a split over rows of several windows replaces it.
  const int64_t grain = std::max<int64_t>(1, 32768 / r2);
  torch::stable::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    int64_t i1 = begin % r1, t = begin / r1;
    int64_t i0 = t % r0;
    t /= r0;
    int64_t c = t % C, n = t / C;
    for (int64_t row = begin; row < end; ++row) {
      const SwWindow& win = wins[n];
      T* d = dst + row * r2;
      const int64_t x0 = win.start[0] + i0, x1 = win.start[1] + i1;
      if (x0 < 0 || x0 >= v.size[2] || x1 < 0 || x1 >= v.size[3]) {
        std::fill(d, d + r2, padv);
      } else {
        const int64_t s2 = win.start[2];
        const int64_t lo = std::clamp<int64_t>(-s2, 0, r2);           // first in-volume index
        const int64_t hi = std::clamp<int64_t>(v.size[4] - s2, lo, r2);  // one past the last
        std::fill(d, d + lo, padv);
        const T* s = src + win.b * v.stride[0] + c * v.stride[1] + x0 * v.stride[2] + x1 * v.stride[3] +
                     (s2 + lo) * v.stride[4];
        if (v.stride[4] == 1) {
          std::copy(s, s + (hi - lo), d + lo);
        } else {
          for (int64_t i = lo; i < hi; ++i) d[i] = s[(i - lo) * v.stride[4]];
        }
        std::fill(d + hi, d + r2, padv);
      }
      if (++i1 == r1) {
        i1 = 0;
        if (++i0 == r0) {
          i0 = 0;
          if (++c == C) {
            c = 0;
            ++n;
          }
        }
      }
    }
  });
}

// ---- accumulate --------------------------------------------------------------------------------

// In place softmax over the C rows (stride n) of buf, for each of the n columns; m, s: n scratch.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void softmax_columns(float* __restrict__ buf, int64_t C, int64_t n, float* __restrict__ m, float* __restrict__ s) {
  for (int64_t j = 0; j < n; ++j) m[j] = buf[j];
  for (int64_t c = 1; c < C; ++c) {
    const float* x = buf + c * n;
    for (int64_t j = 0; j < n; ++j) m[j] = __builtin_isgreater(x[j], m[j]) ? x[j] : m[j];
  }
  for (int64_t j = 0; j < n; ++j) s[j] = 0.0f;
  for (int64_t c = 0; c < C; ++c) {
    float* x = buf + c * n;
    for (int64_t j = 0; j < n; ++j) {
      const float d = x[j] - m[j];
      x[j] = __builtin_isless(d, -88.0f) ? -88.0f : d;
    }
    for (int64_t j = 0; j < n; ++j) {
      const float e = fastmath::vexp(x[j]);
      x[j] = e;
      s[j] += e;
    }
  }
  for (int64_t j = 0; j < n; ++j) s[j] = 1.0f / s[j];
  for (int64_t c = 0; c < C; ++c) {
    float* x = buf + c * n;
    for (int64_t j = 0; j < n; ++j) x[j] = x[j] * s[j];
  }
}

void softmax_columns(double* buf, int64_t C, int64_t n, double* m, double* s) {
  for (int64_t j = 0; j < n; ++j) {
    double mx = buf[j];
    for (int64_t c = 1; c < C; ++c) mx = std::max(mx, buf[c * n + j]);
    double sum = 0.0;
    for (int64_t c = 0; c < C; ++c) sum += (buf[c * n + j] = std::exp(buf[c * n + j] - mx));
    const double inv = 1.0 / sum;
    for (int64_t c = 0; c < C; ++c) buf[c * n + j] *= inv;
  }
  (void)m;
  (void)s;
}

// One run of voxels along the last spatial dim: v = pred * importance; v += out unless this is
// the first window covering them; v /= weight if it is the last; out = v.
template <typename P, typename A, bool kFirst, bool kLast, bool kImp, bool kUnit>
inline void acc_run(A* __restrict__ o, int64_t os, const P* __restrict__ p, int64_t ps, const A* __restrict__ imp,
                    const A* __restrict__ wt, int64_t ws, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    A v = static_cast<A>(p[kUnit ? i : i * ps]);
    if constexpr (kImp) v = v * imp[i];
    if constexpr (!kFirst) v = o[kUnit ? i : i * os] + v;
    if constexpr (kLast) v = v / wt[kUnit ? i : i * ws];
    o[kUnit ? i : i * os] = v;
  }
}

template <typename P, typename A, bool kImp, bool kUnit>
inline void acc_segment(bool first, bool last, A* o, int64_t os, const P* p, int64_t ps, const A* imp, const A* wt,
                        int64_t ws, int64_t n) {
  if (first) {
    if (last) acc_run<P, A, true, true, kImp, kUnit>(o, os, p, ps, imp, wt, ws, n);
    else acc_run<P, A, true, false, kImp, kUnit>(o, os, p, ps, imp, wt, ws, n);
  } else {
    if (last) acc_run<P, A, false, true, kImp, kUnit>(o, os, p, ps, imp, wt, ws, n);
    else acc_run<P, A, false, false, kImp, kUnit>(o, os, p, ps, imp, wt, ws, n);
  }
}

// Separable importance (MONAI's Gaussian map without materialising it): per-dimension factors
// f[d] (the dummy leading dim of a 2D problem has none: factor 1) and a floor;
// importance[i] = max((f0[i0] * f1[i1]) * f2[i2], floor), the products rounded in MONAI's order.
template <typename A>
struct SepImp {
  const A* f[3] = {nullptr, nullptr, nullptr};
  A floor = 0;
};

template <typename A>
SepImp<A> sep_imp(const A* p, const SwGrid& g) {
  SepImp<A> r;
  int64_t off = 0;
  for (int d = 3 - g.nd; d < 3; ++d) {
    r.f[d] = p + off;
    off += g.roi[d];
  }
  r.floor = p[off];
  return r;
}

template <typename A>
void sep_row(A* __restrict__ dst, const A* __restrict__ f2, A s01, A floor, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const A v = s01 * f2[j];
    dst[j] = __builtin_isgreater(floor, v) ? floor : v;
  }
}

template <typename P, typename A, bool kImp, bool kUnit>
void accumulate_windows(const Tensor& out, const Tensor& pred, const A* imp, const Tensor* weight,
                        const SwGrid& g, int64_t window_begin, bool softmax, bool separable) {
  const SepImp<A> sep = kImp && separable ? sep_imp(imp, g) : SepImp<A>{};
  const Sw5 o5 = sw_as5(out), p5 = sw_as5(pred);
  A* op = mut_ptr<A>(out);
  const P* pp = const_ptr<P>(pred);
  const A* wp = weight ? const_ptr<A>(*weight) : nullptr;
  std::array<int64_t, 3> wst{0, 0, 0};
  if (weight) {
    const int nd = static_cast<int>(weight->dim());
    for (int d = 0; d < nd; ++d) wst[3 - nd + d] = weight->stride(d);
  }
  const int64_t C = o5.size[1];
  const std::array<int64_t, 3> S{o5.size[2], o5.size[3], o5.size[4]};
  const auto& r = g.roi;
  // The call's windows, clipped to the output (empty ones dropped), in window order.
  struct Win {
    int64_t n;  // index into pred
    SwWindow w;
    std::array<int64_t, 3> lo, hi;
    int64_t cuts[4];
  };
  std::vector<Win> wins;
  for (int64_t n = 0; n < p5.size[0]; ++n) {
    Win v{n, sw_window(g, window_begin + n), {}, {}, {}};
    bool empty = false;
    for (int d = 0; d < 3; ++d) {
      v.lo[d] = std::max<int64_t>(v.w.start[d], 0);
      v.hi[d] = std::min<int64_t>(v.w.start[d] + r[d], S[d]);
      empty = empty || v.lo[d] >= v.hi[d];
    }
    if (empty) continue;
    // Runs along the last dim where the first/last flags are constant: cut at first_from and
    // last_before (clamped into [lo, hi)).
    v.cuts[0] = v.lo[2];
    v.cuts[1] = std::clamp(v.w.first_from[2], v.lo[2], v.hi[2]);
    v.cuts[2] = std::clamp(v.w.last_before[2], v.lo[2], v.hi[2]);
    v.cuts[3] = v.hi[2];
    std::sort(v.cuts + 1, v.cuts + 3);
    wins.push_back(v);
  }
  // One window's contribution to one output row (x0, x1): every channel, in runs of constant
  // first/last flags. The channels are the inner loop, so the row of the importance map and of
  // the weight is read once for all channels. buf/ibuf: per-thread scratch.
  auto add_row = [&](const Win& v, int64_t x0, int64_t x1, std::vector<A>& buf, std::vector<A>& ibuf) {
    const SwWindow& win = v.w;
    const int64_t len = v.hi[2] - v.lo[2];
    const bool outer_first = x0 >= win.first_from[0] && x1 >= win.first_from[1];
    const bool outer_last = wp != nullptr && x0 < win.last_before[0] && x1 < win.last_before[1];
    // Row pointers at x2 = 0 (out, weight) and at i2 = 0 (pred, importance), offset per run.
    A* orow = op + win.b * o5.stride[0] + x0 * o5.stride[2] + x1 * o5.stride[3];
    const P* prow = pp + v.n * p5.stride[0] + (x0 - win.start[0]) * p5.stride[2] + (x1 - win.start[1]) * p5.stride[3];
    const A* irow = nullptr;
    if constexpr (kImp) {
      if (separable) {
        const A f0 = sep.f[0] ? sep.f[0][x0 - win.start[0]] : A(1);
        sep_row(ibuf.data(), sep.f[2], static_cast<A>(f0 * sep.f[1][x1 - win.start[1]]), sep.floor, r[2]);
        irow = ibuf.data();
      } else {
        irow = imp + ((x0 - win.start[0]) * r[1] + (x1 - win.start[1])) * r[2];
      }
    }
    const A* wrow = wp ? wp + x0 * wst[0] + x1 * wst[1] : nullptr;
    if (softmax) {
      // The row's probabilities for all channels, computed once, unit stride.
      if (static_cast<int64_t>(buf.size()) < (C + 2) * len) buf.resize((C + 2) * len);
      const P* p0 = prow + (v.lo[2] - win.start[2]) * p5.stride[4];
      for (int64_t c = 0; c < C; ++c) {
        A* bc = buf.data() + c * len;
        const P* pc = p0 + c * p5.stride[1];
        for (int64_t j = 0; j < len; ++j) bc[j] = static_cast<A>(pc[j * p5.stride[4]]);
      }
      softmax_columns(buf.data(), C, len, buf.data() + C * len, buf.data() + (C + 1) * len);
    }
    for (int64_t c = 0; c < C; ++c) {
      for (int k = 0; k < 3; ++k) {
        const int64_t a = v.cuts[k], z = v.cuts[k + 1];
        if (a >= z) continue;
        const bool first = outer_first && a >= win.first_from[2];
        const bool last = outer_last && a < win.last_before[2];
        const int64_t i2 = a - win.start[2];
        A* o = orow + c * o5.stride[1] + a * o5.stride[4];
        const A* ir = kImp ? irow + i2 : nullptr;
        const A* wr = wrow ? wrow + a * wst[2] : nullptr;
        if (softmax) {
          acc_segment<A, A, kImp, kUnit>(first, last, o, o5.stride[4], buf.data() + c * len + (a - v.lo[2]), 1, ir,
                                         wr, wst[2], z - a);
        } else {
          acc_segment<P, A, kImp, kUnit>(first, last, o, o5.stride[4], prow + c * p5.stride[1] + i2 * p5.stride[4],
                                         p5.stride[4], ir, wr, wst[2], z - a);
        }
      }
    }
  };
  // One parallel region per batch element over the rows (x0, x1) of the box the call's windows
  // span; each row takes its windows in window order, so a voxel still sees "first" before the
  // adds and "last" after them, and the output row stays in cache from one window to the next
  // (overlapping windows of one call read and write it from memory once, not once per window).
  for (size_t g0 = 0; g0 < wins.size();) {
    size_t g1 = g0;
    int64_t lo0 = wins[g0].lo[0], hi0 = wins[g0].hi[0], lo1 = wins[g0].lo[1], hi1 = wins[g0].hi[1];
    int64_t work = 0;
    while (g1 < wins.size() && wins[g1].w.b == wins[g0].w.b) {
      const Win& v = wins[g1++];
      lo0 = std::min(lo0, v.lo[0]), hi0 = std::max(hi0, v.hi[0]);
      lo1 = std::min(lo1, v.lo[1]), hi1 = std::max(hi1, v.hi[1]);
      work += (v.hi[0] - v.lo[0]) * (v.hi[1] - v.lo[1]) * (v.hi[2] - v.lo[2]);
    }
    const int64_t e1 = hi1 - lo1, rows = (hi0 - lo0) * e1;
    const int64_t per_row = std::max<int64_t>(1, C * work / rows);
    const int64_t grain = std::max<int64_t>(1, 32768 / per_row);
    torch::stable::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      std::vector<A> buf;
      std::vector<A> ibuf(kImp && separable ? r[2] : 0);
      int64_t x1 = lo1 + begin % e1, x0 = lo0 + begin / e1;
      for (int64_t row = begin; row < end; ++row) {
        for (size_t i = g0; i < g1; ++i) {
          const Win& v = wins[i];
          if (x0 >= v.lo[0] && x0 < v.hi[0] && x1 >= v.lo[1] && x1 < v.hi[1]) add_row(v, x0, x1, buf, ibuf);
        }
        if (++x1 == hi1) {
          x1 = lo1;
          ++x0;
        }
      }
    });
    g0 = g1;
  }
}

template <typename P, typename A>
void accumulate_dispatch(const Tensor& out, const Tensor& pred, const std::optional<Tensor>& imp,
                         const Tensor* weight, const SwGrid& g, int64_t window_begin, bool softmax) {
  // Unit stride along the last dim for every operand the run loop reads (pred: unless softmax
  // copies it into a unit-stride buffer first).
  const bool unit = out.stride(out.dim() - 1) == 1 && (softmax || pred.stride(pred.dim() - 1) == 1) &&
                    (weight == nullptr || weight->stride(weight->dim() - 1) == 1);
  const A* ip = imp ? const_ptr<A>(*imp) : nullptr;
  const bool sep = imp && imp->dim() == 1;
  if (ip) {
    if (unit) accumulate_windows<P, A, true, true>(out, pred, ip, weight, g, window_begin, softmax, sep);
    else accumulate_windows<P, A, true, false>(out, pred, ip, weight, g, window_begin, softmax, sep);
  } else {
    if (unit) accumulate_windows<P, A, false, true>(out, pred, ip, weight, g, window_begin, softmax, sep);
    else accumulate_windows<P, A, false, false>(out, pred, ip, weight, g, window_begin, softmax, sep);
  }
}

template <typename A>
void accumulate_pred(const Tensor& out, const Tensor& pred, const std::optional<Tensor>& imp, const Tensor* weight,
                     const SwGrid& g, int64_t window_begin, bool softmax) {
  switch (pred.scalar_type()) {
    case ScalarType::Float: return accumulate_dispatch<float, A>(out, pred, imp, weight, g, window_begin, softmax);
    case ScalarType::Double: return accumulate_dispatch<double, A>(out, pred, imp, weight, g, window_begin, softmax);
    case ScalarType::Half: return accumulate_dispatch<torch::headeronly::Half, A>(out, pred, imp, weight, g, window_begin, softmax);
    case ScalarType::BFloat16:
      return accumulate_dispatch<torch::headeronly::BFloat16, A>(out, pred, imp, weight, g, window_begin, softmax);
    default: SSLSEG_CHECK(false, "sw_accumulate_: unexpected pred dtype ", dtype_name(pred.scalar_type()));
  }
}

Tensor sw_gather_cpu(Tensor volume, std::vector<int64_t> roi_size, std::vector<int64_t> starts,
                     std::vector<int64_t> counts, int64_t window_begin, int64_t window_end, double pad_value) {
  const SwGrid g = sw_gather_check(volume, roi_size, starts, counts, window_begin, window_end, DeviceType::CPU);
  Tensor out = sw_gather_output(volume, roi_size, window_begin, window_end);
  if (out.numel() == 0) return out;
  switch (volume.scalar_type()) {
    case ScalarType::Float: gather_impl<float>(volume, out, g, window_begin, window_end, pad_value); break;
    case ScalarType::Double: gather_impl<double>(volume, out, g, window_begin, window_end, pad_value); break;
    case ScalarType::Half: gather_impl<torch::headeronly::Half>(volume, out, g, window_begin, window_end, pad_value); break;
    case ScalarType::BFloat16:
      gather_impl<torch::headeronly::BFloat16>(volume, out, g, window_begin, window_end, pad_value);
      break;
    default: SSLSEG_CHECK(false, "sw_gather: unexpected dtype ", dtype_name(volume.scalar_type()));
  }
  return out;
}

void sw_accumulate_cpu(Tensor out, Tensor pred, std::optional<Tensor> importance, std::optional<Tensor> weight,
                       std::vector<int64_t> starts, std::vector<int64_t> counts, int64_t window_begin, bool softmax) {
  const SwGrid g = sw_accumulate_check(out, pred, importance, weight, starts, counts, window_begin, DeviceType::CPU);
  if (out.numel() == 0 || pred.numel() == 0) return;
  // The importance map is window-sized (small): the kernel reads it as a dense C-order array.
  const std::optional<Tensor> imp =
      importance.has_value() && importance->defined() ? std::optional<Tensor>(torch::stable::contiguous(*importance))
                                                      : std::nullopt;
  const bool has_w = weight.has_value() && weight->defined();
  const Tensor* w = has_w ? &*weight : nullptr;
  if (out.scalar_type() == ScalarType::Double) accumulate_pred<double>(out, pred, imp, w, g, window_begin, softmax);
  else accumulate_pred<float>(out, pred, imp, w, g, window_begin, softmax);
}

}  // namespace
}  // namespace sslseg

STABLE_TORCH_LIBRARY_IMPL(sslseg, CPU, m) {
  m.impl("sw_gather", TORCH_BOX(&sslseg::sw_gather_cpu));
  m.impl("sw_accumulate_", TORCH_BOX(&sslseg::sw_accumulate_cpu));
}
