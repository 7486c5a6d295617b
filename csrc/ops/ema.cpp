// sslseg::ema_update_: argument checks and work grouping shared by the CPU and CUDA kernels.
#include "ops/ema.h"

#include <torch/csrc/stable/ops.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <utility>

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

// C-order strides (the common case, checked without allocating).
bool contiguous_strides(IntList sizes, IntList strides) {
  int64_t expected = 1;
  for (size_t d = sizes.size(); d-- > 0;) {
    if (sizes[d] != 1 && strides[d] != expected) return false;
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
  // One pass that reads each property once (every accessor is a call into libtorch through the
  // stable shim, and module lists hold hundreds of tensors); on any mismatch the full check runs
  // and raises its message.
  const auto fail = [&] { ema_check_args(teacher, student, decay, device); };
  if (teacher.size() != student.size() || !(decay >= 0.0 && decay <= 1.0)) fail();
  EmaWork work;
  for (size_t i = 0; i < teacher.size(); ++i) {
    const Tensor& t = teacher[i];
    const Tensor& s = student[i];
    const IntList sizes = t.sizes();
    const ScalarType tt = t.scalar_type(), st = s.scalar_type();
    const auto td = t.device(), sd = s.device();
    if (!same_list(sizes, s.sizes()) || td.type() != sd.type() || td.index() != sd.index() || td.type() != device ||
        !is_supported_float(tt) || !is_supported_float(st)) {
      fail();
    }
    int64_t n = 1;
    for (const int64_t d : sizes) n *= d;
    if (n == 0) continue;
    const auto key = std::make_pair(tt, st);
    if (contiguous_strides(sizes, t.strides()) && contiguous_strides(sizes, s.strides())) {
      work.groups[key].push_back(EmaSegment{t.data_ptr(), s.data_ptr(), n});
      continue;
    }
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

int64_t ema_plan_new(std::vector<Tensor> teacher, std::vector<Tensor> student, DeviceType device,
                     void (*update)(const std::vector<Tensor>&, const std::vector<Tensor>&, double)) {
  ema_check_args(teacher, student, 0.0, device);
  auto* plan = new EmaPlan{std::move(teacher), std::move(student), update};
  return static_cast<int64_t>(reinterpret_cast<intptr_t>(plan));
}

}  // namespace sslseg
