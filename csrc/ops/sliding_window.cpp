// sslseg::sw_gather / sw_accumulate_: argument checks, window grid and tensor geometry shared by
// the CPU (cpu/sliding_window.cpp) and CUDA (cuda/sliding_window.cu) kernels.
#include "ops/sliding_window.h"

#include <algorithm>
#include <limits>
#include <vector>

namespace sslseg {
namespace {

// Shared checks of the grid arguments; fills g.count, g.starts (normalised to 3 dims by the caller).
void check_grid(const char* op, int nd, IntList starts, IntList counts, int64_t batch,
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
                   list_str(IntList(s)));
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

Sw5 sw_as5(const Tensor& t) {
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

SwGrid sw_gather_check(const Tensor& volume, IntList roi_size, IntList starts,
                       IntList counts, int64_t window_begin, int64_t window_end,
                       DeviceType expected_device) {
  SSLSEG_CHECK(volume.defined(), "sw_gather: volume must be a defined tensor");
  SSLSEG_CHECK(volume.dim() == 4 || volume.dim() == 5,
               "sw_gather: volume must be (B, C, *spatial) with 2 or 3 spatial dims, got shape ", shape_str(volume));
  SSLSEG_CHECK(on(volume, expected_device), "sw_gather: volume must be a ",
               device_type_name(expected_device), " tensor, got ", device_str(volume));
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

SwGrid sw_accumulate_check(const Tensor& out, const Tensor& pred, const std::optional<Tensor>& importance,
                           const std::optional<Tensor>& weight, IntList starts, IntList counts,
                           int64_t window_begin, DeviceType expected_device) {
  SSLSEG_CHECK(out.defined() && pred.defined(), "sw_accumulate_: out and pred must be defined tensors");
  SSLSEG_CHECK(out.dim() == 4 || out.dim() == 5,
               "sw_accumulate_: out must be (B, C, *spatial) with 2 or 3 spatial dims, got shape ", shape_str(out));
  SSLSEG_CHECK(on(out, expected_device), "sw_accumulate_: out must be a ",
               device_type_name(expected_device), " tensor, got ", device_str(out));
  SSLSEG_CHECK(out.scalar_type() == ScalarType::Float || out.scalar_type() == ScalarType::Double,
               "sw_accumulate_: out must be float32 or float64 (the accumulator), got ", dtype_name(out.scalar_type()));
  const int nd = static_cast<int>(out.dim()) - 2;
  SSLSEG_CHECK(pred.dim() == out.dim(), "sw_accumulate_: pred must be (N, C, *roi) with the ", nd,
               " spatial dims of out, got shape ", shape_str(pred));
  SSLSEG_CHECK(pred.size(1) == out.size(1), "sw_accumulate_: pred must have the ", out.size(1),
               " channels of out, got ", pred.size(1));
  SSLSEG_CHECK(same_device(pred, out), "sw_accumulate_: pred must be on the device of out (", device_str(out),
               "), got ", device_str(pred));
  SSLSEG_CHECK(is_supported_float(pred.scalar_type()),
               "sw_accumulate_: pred must be float16, bfloat16, float32 or float64, got ", dtype_name(pred.scalar_type()));
  SwGrid g;
  g.nd = nd;
  for (int d = 0; d < nd; ++d) {
    SSLSEG_CHECK(pred.size(2 + d) >= 1, "sw_accumulate_: pred's window size must be >= 1, got shape ", shape_str(pred));
    g.roi[3 - nd + d] = pred.size(2 + d);
  }
  if (importance.has_value() && importance->defined()) {
    const Tensor& imp = *importance;
    int64_t sep_len = 1;
    for (int d = 0; d < nd; ++d) sep_len += pred.size(2 + d);
    const bool separable = imp.dim() == 1 && imp.size(0) == sep_len;
    SSLSEG_CHECK(separable || same_list(imp.sizes(), tail(pred.sizes(), pred.dim() - 2)), "sw_accumulate_: importance must have the window shape ",
                 list_str(tail(pred.sizes(), pred.dim() - 2)), " or be separable (1-D, sum(roi) + 1 = ", sep_len, " entries), got ",
                 shape_str(imp));
    SSLSEG_CHECK(imp.scalar_type() == out.scalar_type(), "sw_accumulate_: importance must have the dtype of out (",
                 dtype_name(out.scalar_type()), "), got ", dtype_name(imp.scalar_type()));
    SSLSEG_CHECK(same_device(imp, out), "sw_accumulate_: importance must be on the device of out (",
                 device_str(out), "), got ", device_str(imp));
  }
  if (weight.has_value() && weight->defined()) {
    const Tensor& w = *weight;
    SSLSEG_CHECK(same_list(w.sizes(), tail(out.sizes(), out.dim() - 2)), "sw_accumulate_: weight must have the spatial shape of out ",
                 list_str(tail(out.sizes(), out.dim() - 2)), ", got ", shape_str(w));
    SSLSEG_CHECK(w.scalar_type() == out.scalar_type(), "sw_accumulate_: weight must have the dtype of out (",
                 dtype_name(out.scalar_type()), "), got ", dtype_name(w.scalar_type()));
    SSLSEG_CHECK(same_device(w, out), "sw_accumulate_: weight must be on the device of out (", device_str(out),
                 "), got ", device_str(w));
  }
  check_grid("sw_accumulate_", nd, starts, counts, out.size(0), g);
  const int64_t total = out.size(0) * g.per_batch;
  const int64_t n = pred.size(0);
  SSLSEG_CHECK(0 <= window_begin && window_begin + n <= total, "sw_accumulate_: windows [", window_begin, ", ",
               window_begin + n, ") must lie in [0, B * prod(counts)] = [0, ", total, "]");
  return g;
}

Tensor sw_gather_output(const Tensor& volume, IntList roi_size, int64_t window_begin, int64_t window_end) {
  std::vector<int64_t> shape{window_end - window_begin, volume.size(1)};
  shape.insert(shape.end(), roi_size.begin(), roi_size.end());
  return new_tensor(volume, shape, volume.scalar_type());
}

}  // namespace sslseg
