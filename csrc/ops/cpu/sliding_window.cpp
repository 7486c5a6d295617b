// CPU kernels of sslseg::sw_gather and sslseg::sw_accumulate_, plus the argument checks and grid
// helpers shared with the CUDA kernels (csrc/ops/cuda/sliding_window.cu).
//
// sw_accumulate_ writes the first window that covers a voxel (no zero-fill of the output is
// needed), adds the later ones, and divides by the blending weight when the last window covering
// the voxel is added: one pass over each window's output, the normalisation fused into it (and,
// with softmax=true, the softmax over channels of the window's logits as well).
#include "checks.h"
#include "ops/mc_uncertainty.h"  // fastmath::vexp
#include "ops/sliding_window.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

namespace sslseg {
namespace {

std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kLong: return "int64";
    case at::kInt: return "int32";
    case at::kShort: return "int16";
    case at::kByte: return "uint8";
    case at::kChar: return "int8";
    case at::kBool: return "bool";
    default: return c10::toString(t);
  }
}

std::string list_str(c10::IntArrayRef v) {
  std::ostringstream os;
  os << v;
  return os.str();
}

// Shared checks of the grid arguments; fills g.count, g.starts (normalised to 3 dims by the caller).
void check_grid(const char* op, int nd, c10::IntArrayRef starts, c10::IntArrayRef counts, int64_t batch,
                SwGrid& g) {
  SSLSEG_CHECK(static_cast<int>(counts.size()) == nd, op, ": counts must have ", nd,
               " entries (one per spatial dim), got ", counts.size());
  int64_t total = 0;
  for (int64_t c : counts) {
    SSLSEG_CHECK(c >= 1, op, ": counts must be >= 1, got ", list_str(counts));
    total += c;
  }
  SSLSEG_CHECK(static_cast<int64_t>(starts.size()) == total, op, ": starts must hold sum(counts) = ", total,
               " entries, got ", starts.size());
  const int off = 3 - nd;
  g.per_batch = 1;
  int64_t pos = 0;
  for (int d = 0; d < nd; ++d) {
    std::vector<int64_t> s(starts.begin() + pos, starts.begin() + pos + counts[d]);
    pos += counts[d];
    for (size_t i = 1; i < s.size(); ++i) {
      SSLSEG_CHECK(s[i] > s[i - 1], op, ": starts of spatial dim ", d, " must be strictly increasing, got ",
                   list_str(s));
    }
    g.count[off + d] = counts[d];
    g.starts[off + d] = std::move(s);
    g.per_batch *= counts[d];
  }
  for (int d = 0; d < off; ++d) {
    g.count[d] = 1;
    g.starts[d] = {0};
  }
  (void)batch;
}

}  // namespace

Sw5 sw_as5(const at::Tensor& t) {
  Sw5 r;
  if (t.dim() == 5) {
    for (int i = 0; i < 5; ++i) {
      r.size[i] = t.size(i);
      r.stride[i] = t.stride(i);
    }
  } else {
    r.size = {t.size(0), t.size(1), 1, t.size(2), t.size(3)};
    r.stride = {t.stride(0), t.stride(1), 0, t.stride(2), t.stride(3)};
  }
  return r;
}

SwWindow sw_window(const SwGrid& g, int64_t w) {
  SwWindow win;
  win.b = w / g.per_batch;
  int64_t r = w % g.per_batch;
  std::array<int64_t, 3> k{};
  for (int d = 2; d >= 0; --d) {
    k[d] = r % g.count[d];
    r /= g.count[d];
  }
  for (int d = 0; d < 3; ++d) {
    const auto& s = g.starts[d];
    win.start[d] = s[k[d]];
    win.first_from[d] = k[d] > 0 ? s[k[d] - 1] + g.roi[d] : std::numeric_limits<int64_t>::min();
    win.last_before[d] = k[d] + 1 < g.count[d] ? s[k[d] + 1] : std::numeric_limits<int64_t>::max();
  }
  return win;
}

SwGrid sw_gather_check(const at::Tensor& volume, c10::IntArrayRef roi_size, c10::IntArrayRef starts,
                       c10::IntArrayRef counts, int64_t window_begin, int64_t window_end,
                       c10::DeviceType expected_device) {
  SSLSEG_CHECK(volume.defined(), "sw_gather: volume must be a defined tensor");
  SSLSEG_CHECK(volume.dim() == 4 || volume.dim() == 5,
               "sw_gather: volume must be (B, C, *spatial) with 2 or 3 spatial dims, got shape ", shape_str(volume));
  SSLSEG_CHECK(volume.device().type() == expected_device, "sw_gather: volume must be a ",
               c10::DeviceTypeName(expected_device), " tensor, got ", volume.device());
  SSLSEG_CHECK(is_supported_float(volume.scalar_type()),
               "sw_gather: volume must be float16, bfloat16, float32 or float64, got ", dtype_name(volume.scalar_type()));
  const int nd = static_cast<int>(volume.dim()) - 2;
  SSLSEG_CHECK(static_cast<int>(roi_size.size()) == nd, "sw_gather: roi_size must have ", nd,
               " entries (one per spatial dim of volume), got ", roi_size.size());
  SwGrid g;
  g.nd = nd;
  for (int d = 0; d < nd; ++d) {
    SSLSEG_CHECK(roi_size[d] >= 1, "sw_gather: roi_size entries must be >= 1, got ", list_str(roi_size));
    g.roi[3 - nd + d] = roi_size[d];
  }
  check_grid("sw_gather", nd, starts, counts, volume.size(0), g);
  const int64_t total = volume.size(0) * g.per_batch;
  SSLSEG_CHECK(0 <= window_begin && window_begin <= window_end && window_end <= total, "sw_gather: windows [",
               window_begin, ", ", window_end, ") must lie in [0, B * prod(counts)] = [0, ", total, "]");
  return g;
}

SwGrid sw_accumulate_check(const at::Tensor& out, const at::Tensor& pred, const std::optional<at::Tensor>& importance,
                           const std::optional<at::Tensor>& weight, c10::IntArrayRef starts, c10::IntArrayRef counts,
                           int64_t window_begin, c10::DeviceType expected_device) {
  SSLSEG_CHECK(out.defined() && pred.defined(), "sw_accumulate_: out and pred must be defined tensors");
  SSLSEG_CHECK(out.dim() == 4 || out.dim() == 5,
               "sw_accumulate_: out must be (B, C, *spatial) with 2 or 3 spatial dims, got shape ", shape_str(out));
  SSLSEG_CHECK(out.device().type() == expected_device, "sw_accumulate_: out must be a ",
               c10::DeviceTypeName(expected_device), " tensor, got ", out.device());
  SSLSEG_CHECK(out.scalar_type() == at::kFloat || out.scalar_type() == at::kDouble,
               "sw_accumulate_: out must be float32 or float64 (the accumulator), got ", dtype_name(out.scalar_type()));
  const int nd = static_cast<int>(out.dim()) - 2;
  SSLSEG_CHECK(pred.dim() == out.dim(), "sw_accumulate_: pred must be (N, C, *roi) with the ", nd,
               " spatial dims of out, got shape ", shape_str(pred));
  SSLSEG_CHECK(pred.size(1) == out.size(1), "sw_accumulate_: pred must have the ", out.size(1),
               " channels of out, got ", pred.size(1));
  SSLSEG_CHECK(pred.device() == out.device(), "sw_accumulate_: pred must be on the device of out (", out.device(),
               "), got ", pred.device());
  SSLSEG_CHECK(is_supported_float(pred.scalar_type()),
               "sw_accumulate_: pred must be float16, bfloat16, float32 or float64, got ", dtype_name(pred.scalar_type()));
  SwGrid g;
  g.nd = nd;
  for (int d = 0; d < nd; ++d) {
    SSLSEG_CHECK(pred.size(2 + d) >= 1, "sw_accumulate_: pred's window size must be >= 1, got shape ", shape_str(pred));
    g.roi[3 - nd + d] = pred.size(2 + d);
  }
  if (importance.has_value() && importance->defined()) {
    const at::Tensor& imp = *importance;
    int64_t sep_len = 1;
    for (int d = 0; d < nd; ++d) sep_len += pred.size(2 + d);
    const bool separable = imp.dim() == 1 && imp.size(0) == sep_len;
    SSLSEG_CHECK(separable || imp.sizes() == pred.sizes().slice(2), "sw_accumulate_: importance must have the window shape ",
                 list_str(pred.sizes().slice(2)), " or be separable (1-D, sum(roi) + 1 = ", sep_len, " entries), got ",
                 shape_str(imp));
    SSLSEG_CHECK(imp.scalar_type() == out.scalar_type(), "sw_accumulate_: importance must have the dtype of out (",
                 dtype_name(out.scalar_type()), "), got ", dtype_name(imp.scalar_type()));
    SSLSEG_CHECK(imp.device() == out.device(), "sw_accumulate_: importance must be on the device of out (",
                 out.device(), "), got ", imp.device());
  }
  if (weight.has_value() && weight->defined()) {
    const at::Tensor& w = *weight;
    SSLSEG_CHECK(w.sizes() == out.sizes().slice(2), "sw_accumulate_: weight must have the spatial shape of out ",
                 list_str(out.sizes().slice(2)), ", got ", shape_str(w));
    SSLSEG_CHECK(w.scalar_type() == out.scalar_type(), "sw_accumulate_: weight must have the dtype of out (",
                 dtype_name(out.scalar_type()), "), got ", dtype_name(w.scalar_type()));
    SSLSEG_CHECK(w.device() == out.device(), "sw_accumulate_: weight must be on the device of out (", out.device(),
                 "), got ", w.device());
  }
  check_grid("sw_accumulate_", nd, starts, counts, out.size(0), g);
  const int64_t total = out.size(0) * g.per_batch;
  const int64_t n = pred.size(0);
  SSLSEG_CHECK(0 <= window_begin && window_begin + n <= total, "sw_accumulate_: windows [", window_begin, ", ",
               window_begin + n, ") must lie in [0, B * prod(counts)] = [0, ", total, "]");
  return g;
}

namespace {

// ---- gather ------------------------------------------------------------------------------------

template <typename T>
void gather_impl(const at::Tensor& volume, at::Tensor& out, const SwGrid& g, int64_t wb, int64_t we, double pad) {
  const Sw5 v = sw_as5(volume);
  const T* src = volume.const_data_ptr<T>();
  T* dst = out.data_ptr<T>();
  T padv;
  if constexpr (std::is_same_v<T, double>) padv = pad;
  else padv = static_cast<T>(static_cast<float>(pad));
  std::vector<SwWindow> wins;
  for (int64_t w = wb; w < we; ++w) wins.push_back(sw_window(g, w));
  const int64_t C = v.size[1];
  const int64_t r0 = g.roi[0], r1 = g.roi[1], r2 = g.roi[2];
  const int64_t rows = (we - wb) * C * r0 * r1;
  const int64_t grain = std::max<int64_t>(1, 32768 / r2);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
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
void accumulate_windows(const at::Tensor& out, const at::Tensor& pred, const A* imp, const at::Tensor* weight,
                        const SwGrid& g, int64_t window_begin, bool softmax, bool separable) {
  const SepImp<A> sep = kImp && separable ? sep_imp(imp, g) : SepImp<A>{};
  const Sw5 o5 = sw_as5(out), p5 = sw_as5(pred);
  A* op = out.data_ptr<A>();
  const P* pp = pred.const_data_ptr<P>();
  const A* wp = weight ? weight->const_data_ptr<A>() : nullptr;
  std::array<int64_t, 3> wst{0, 0, 0};
  if (weight) {
    const int nd = static_cast<int>(weight->dim());
    for (int d = 0; d < nd; ++d) wst[3 - nd + d] = weight->stride(d);
  }
  const int64_t C = o5.size[1];
  const std::array<int64_t, 3> S{o5.size[2], o5.size[3], o5.size[4]};
  const auto& r = g.roi;
  for (int64_t n = 0; n < p5.size[0]; ++n) {
    const SwWindow win = sw_window(g, window_begin + n);
    std::array<int64_t, 3> lo{}, hi{};
    bool empty = false;
    for (int d = 0; d < 3; ++d) {
      lo[d] = std::max<int64_t>(win.start[d], 0);
      hi[d] = std::min<int64_t>(win.start[d] + r[d], S[d]);
      empty = empty || lo[d] >= hi[d];
    }
    if (empty) continue;
    // Runs along the last dim where the first/last flags are constant: cut at first_from and
    // last_before (clamped into [lo, hi)).
    int64_t cuts[4] = {lo[2], std::clamp(win.first_from[2], lo[2], hi[2]),
                       std::clamp(win.last_before[2], lo[2], hi[2]), hi[2]};
    std::sort(cuts + 1, cuts + 3);
    const int64_t e0 = hi[0] - lo[0], e1 = hi[1] - lo[1];
    // Parallel over the window's rows (x0, x1); the channels are the inner loop, so the row of
    // the importance map and of the weight is read from memory once for all channels.
    const int64_t rows = e0 * e1;
    const int64_t grain = std::max<int64_t>(1, 32768 / (C * (hi[2] - lo[2])));
    const int64_t obase = win.b * o5.stride[0];
    const int64_t pbase = n * p5.stride[0];
    const int64_t len = hi[2] - lo[2];
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      // softmax: the row's probabilities for all channels, computed once, unit stride.
      std::vector<A> buf(softmax ? (C + 2) * len : 0);
      // separable importance: the row of the map, computed once per row for all channels.
      std::vector<A> ibuf(kImp && separable ? r[2] : 0);
      int64_t x1 = lo[1] + begin % e1, x0 = lo[0] + begin / e1;
      for (int64_t row = begin; row < end; ++row) {
        const bool outer_first = x0 >= win.first_from[0] && x1 >= win.first_from[1];
        const bool outer_last = wp != nullptr && x0 < win.last_before[0] && x1 < win.last_before[1];
        // Row pointers at x2 = 0 (out, weight) and at i2 = 0 (pred, importance), offset per run.
        A* orow = op + obase + x0 * o5.stride[2] + x1 * o5.stride[3];
        const P* prow = pp + pbase + (x0 - win.start[0]) * p5.stride[2] + (x1 - win.start[1]) * p5.stride[3];
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
          const P* p0 = prow + (lo[2] - win.start[2]) * p5.stride[4];
          for (int64_t c = 0; c < C; ++c) {
            A* b = buf.data() + c * len;
            const P* pc = p0 + c * p5.stride[1];
            for (int64_t j = 0; j < len; ++j) b[j] = static_cast<A>(pc[j * p5.stride[4]]);
          }
          softmax_columns(buf.data(), C, len, buf.data() + C * len, buf.data() + (C + 1) * len);
        }
        for (int64_t c = 0; c < C; ++c) {
          for (int k = 0; k < 3; ++k) {
            const int64_t a = cuts[k], z = cuts[k + 1];
            if (a >= z) continue;
            const bool first = outer_first && a >= win.first_from[2];
            const bool last = outer_last && a < win.last_before[2];
            const int64_t i2 = a - win.start[2];
            A* o = orow + c * o5.stride[1] + a * o5.stride[4];
            const A* ir = kImp ? irow + i2 : nullptr;
            const A* wr = wrow ? wrow + a * wst[2] : nullptr;
            if (softmax) {
              acc_segment<A, A, kImp, kUnit>(first, last, o, o5.stride[4], buf.data() + c * len + (a - lo[2]), 1, ir,
                                             wr, wst[2], z - a);
            } else {
              acc_segment<P, A, kImp, kUnit>(first, last, o, o5.stride[4], prow + c * p5.stride[1] + i2 * p5.stride[4],
                                             p5.stride[4], ir, wr, wst[2], z - a);
            }
          }
        }
        if (++x1 == hi[1]) {
          x1 = lo[1];
          ++x0;
        }
      }
    });
  }
}

template <typename P, typename A>
void accumulate_dispatch(const at::Tensor& out, const at::Tensor& pred, const at::Tensor& imp,
                         const at::Tensor* weight, const SwGrid& g, int64_t window_begin, bool softmax) {
  // Unit stride along the last dim for every operand the run loop reads (pred: unless softmax
  // copies it into a unit-stride buffer first).
  const bool unit = out.stride(-1) == 1 && (softmax || pred.stride(-1) == 1) &&
                    (weight == nullptr || weight->stride(-1) == 1);
  const A* ip = imp.defined() ? imp.const_data_ptr<A>() : nullptr;
  const bool sep = imp.defined() && imp.dim() == 1;
  if (ip) {
    if (unit) accumulate_windows<P, A, true, true>(out, pred, ip, weight, g, window_begin, softmax, sep);
    else accumulate_windows<P, A, true, false>(out, pred, ip, weight, g, window_begin, softmax, sep);
  } else {
    if (unit) accumulate_windows<P, A, false, true>(out, pred, ip, weight, g, window_begin, softmax, sep);
    else accumulate_windows<P, A, false, false>(out, pred, ip, weight, g, window_begin, softmax, sep);
  }
}

template <typename A>
void accumulate_pred(const at::Tensor& out, const at::Tensor& pred, const at::Tensor& imp, const at::Tensor* weight,
                     const SwGrid& g, int64_t window_begin, bool softmax) {
  switch (pred.scalar_type()) {
    case at::kFloat: return accumulate_dispatch<float, A>(out, pred, imp, weight, g, window_begin, softmax);
    case at::kDouble: return accumulate_dispatch<double, A>(out, pred, imp, weight, g, window_begin, softmax);
    case at::kHalf: return accumulate_dispatch<c10::Half, A>(out, pred, imp, weight, g, window_begin, softmax);
    case at::kBFloat16:
      return accumulate_dispatch<c10::BFloat16, A>(out, pred, imp, weight, g, window_begin, softmax);
    default: TORCH_INTERNAL_ASSERT(false, "sw_accumulate_: unexpected pred dtype ", pred.scalar_type());
  }
}

}  // namespace

at::Tensor sw_gather_cpu(const at::Tensor& volume, c10::IntArrayRef roi_size, c10::IntArrayRef starts,
                         c10::IntArrayRef counts, int64_t window_begin, int64_t window_end, double pad_value) {
  const SwGrid g = sw_gather_check(volume, roi_size, starts, counts, window_begin, window_end, c10::DeviceType::CPU);
  std::vector<int64_t> shape{window_end - window_begin, volume.size(1)};
  shape.insert(shape.end(), roi_size.begin(), roi_size.end());
  at::Tensor out = at::empty(shape, volume.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  switch (volume.scalar_type()) {
    case at::kFloat: gather_impl<float>(volume, out, g, window_begin, window_end, pad_value); break;
    case at::kDouble: gather_impl<double>(volume, out, g, window_begin, window_end, pad_value); break;
    case at::kHalf: gather_impl<c10::Half>(volume, out, g, window_begin, window_end, pad_value); break;
    case at::kBFloat16: gather_impl<c10::BFloat16>(volume, out, g, window_begin, window_end, pad_value); break;
    default: TORCH_INTERNAL_ASSERT(false, "sw_gather: unexpected dtype ", volume.scalar_type());
  }
  return out;
}

void sw_accumulate_cpu(const at::Tensor& out, const at::Tensor& pred, const std::optional<at::Tensor>& importance,
                       const std::optional<at::Tensor>& weight, c10::IntArrayRef starts, c10::IntArrayRef counts,
                       int64_t window_begin, bool softmax) {
  const SwGrid g =
      sw_accumulate_check(out, pred, importance, weight, starts, counts, window_begin, c10::DeviceType::CPU);
  if (out.numel() == 0 || pred.numel() == 0) return;
  // The importance map is window-sized (small): the kernel reads it as a dense C-order array.
  const at::Tensor imp = importance.has_value() && importance->defined() ? importance->contiguous() : at::Tensor();
  const bool has_w = weight.has_value() && weight->defined();
  const at::Tensor* w = has_w ? &*weight : nullptr;
  if (out.scalar_type() == at::kDouble) accumulate_pred<double>(out, pred, imp, w, g, window_begin, softmax);
  else accumulate_pred<float>(out, pred, imp, w, g, window_begin, softmax);
}

TORCH_LIBRARY_IMPL(sslseg, CPU, m) {
  m.impl("sw_gather", &sw_gather_cpu);
  m.impl("sw_accumulate_", &sw_accumulate_cpu);
}

}  // namespace sslseg
