// sslseg::ema_update_: argument checks and work grouping shared by the CPU and CUDA kernels.
#include "ops/ema.h"

#include <torch/csrc/stable/ops.h>

#include <algorithm>
#include <numeric>

namespace sslseg {
namespace {

// True when the elements of t cover exactly numel() consecutive slots in some dimension order
// (torch's is_non_overlapping_and_dense, which the stable API does not expose).
bool non_overlapping_and_dense(const Tensor& t) {
  const IntList sizes = t.sizes(), strides = t.strides();
  std::vector<size_t> order(sizes.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return sizes[a] < 2 ? false : (sizes[b] < 2 ? true : strides[a] < strides[b]);
  });
  int64_t expected = 1;
  for (size_t d : order) {
    if (sizes[d] < 2) continue;
    if (strides[d] != expected) return false;
    expected *= sizes[d];
  }
  return true;
}

bool flat_compatible(const Tensor& t, const Tensor& s) {
  return non_overlapping_and_dense(t) && non_overlapping_and_dense(s) && same_list(t.strides(), s.strides());
}

}  // namespace

void ema_check_args(const std::vector<Tensor>& teacher, const std::vector<Tensor>& student, double decay,
                    DeviceType expected_device) {
  SSLSEG_CHECK(teacher.size() == student.size(), "ema_update_: teacher and student must have the same number of tensors, got ",
               teacher.size(), " teacher tensors and ", student.size(), " student tensors");
  SSLSEG_CHECK(decay >= 0.0 && decay <= 1.0, "ema_update_: decay must be in [0, 1], got ", decay);
  for (size_t i = 0; i < teacher.size(); ++i) {
    const Tensor& t = teacher[i];
    const Tensor& s = student[i];
    SSLSEG_CHECK(t.defined() && s.defined(), "ema_update_: ", item_name("teacher", i), " / ", item_name("student", i),
                 " must be defined tensors");
    SSLSEG_CHECK(same_list(t.sizes(), s.sizes()), "ema_update_: ", item_name("student", i), " must have the shape of ",
                 item_name("teacher", i), " ", shape_str(t), ", got ", shape_str(s));
    SSLSEG_CHECK(same_device(t, s), "ema_update_: ", item_name("student", i), " must be on the device of ",
                 item_name("teacher", i), " (", device_str(t), "), got ", device_str(s));
    SSLSEG_CHECK(on(t, expected_device), "ema_update_: ", item_name("teacher", i), " must be a ",
                 device_type_name(expected_device), " tensor like the rest of the list, got ", device_str(t));
    SSLSEG_CHECK(is_supported_float(t.scalar_type()), "ema_update_: ", item_name("teacher", i),
                 " must be float16, bfloat16, float32 or float64, got ", dtype_name(t.scalar_type()));
    SSLSEG_CHECK(is_supported_float(s.scalar_type()), "ema_update_: ", item_name("student", i),
                 " must be float16, bfloat16, float32 or float64, got ", dtype_name(s.scalar_type()));
  }
}

EmaWork ema_prepare(const std::vector<Tensor>& teacher, const std::vector<Tensor>& student, double decay,
                    DeviceType device) {
  ema_check_args(teacher, student, decay, device);
  EmaWork work;
  for (size_t i = 0; i < teacher.size(); ++i) {
    const Tensor& t = teacher[i];
    const Tensor& s = student[i];
    const int64_t n = t.numel();
    if (n == 0) continue;
    const auto key = std::make_pair(t.scalar_type(), s.scalar_type());
    if (flat_compatible(t, s)) {
      work.groups[key].push_back(EmaSegment{t.data_ptr(), s.data_ptr(), n});
      continue;
    }
    // Rare (views, expanded or transposed tensors): dense C-order copies of both, updated flat.
    Tensor tc = torch::stable::clone(t);
    tc = torch::stable::contiguous(tc);
    Tensor sc = torch::stable::contiguous(s);
    work.groups[key].push_back(EmaSegment{tc.data_ptr(), sc.data_ptr(), n});
    work.keep.push_back(sc);
    work.copy_back.emplace_back(t, tc);
  }
  return work;
}

void ema_finish(EmaWork& work) {
  for (auto& [t, tc] : work.copy_back) torch::stable::copy_(t, tc);
}

}  // namespace sslseg
