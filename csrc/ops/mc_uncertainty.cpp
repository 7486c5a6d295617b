// sslseg::mc_softmax_accumulate_ / mc_entropy_finalize_: the checks shared by the CPU and CUDA
// kernels, and the entropy output.
#include "ops/mc_uncertainty.h"

#include <vector>

namespace sslseg {
namespace {

void check_acc(const char* op, const Tensor& acc, DeviceType expected_device) {
  SSLSEG_CHECK(acc.defined(), op, ": acc must be a defined tensor");
  SSLSEG_CHECK(acc.dim() >= 2, op, ": acc must be (B, C, *spatial), got shape ", shape_str(acc));
  SSLSEG_CHECK(acc.size(1) >= 1, op, ": acc must have at least 1 class, got shape ", shape_str(acc));
  SSLSEG_CHECK(on(acc, expected_device), op, ": acc must be a ", device_type_name(expected_device),
               " tensor, got ", device_str(acc));
  SSLSEG_CHECK(acc.scalar_type() == ScalarType::Float || acc.scalar_type() == ScalarType::Double, op,
               ": acc must be float32 or float64 (the accumulator), got ", dtype_name(acc.scalar_type()));
  SSLSEG_CHECK(acc.is_contiguous(), op, ": acc must be contiguous");
}

}  // namespace

void mc_accumulate_check(const Tensor& acc, const Tensor& logits, DeviceType expected_device) {
  check_acc("mc_softmax_accumulate_", acc, expected_device);
  SSLSEG_CHECK(logits.defined(), "mc_softmax_accumulate_: logits must be a defined tensor");
  SSLSEG_CHECK(same_list(logits.sizes(), acc.sizes()), "mc_softmax_accumulate_: logits must have the shape of acc ",
               shape_str(acc), ", got ", shape_str(logits));
  SSLSEG_CHECK(same_device(logits, acc), "mc_softmax_accumulate_: logits must be on the device of acc (",
               device_str(acc), "), got ", device_str(logits));
  SSLSEG_CHECK(is_supported_float(logits.scalar_type()),
               "mc_softmax_accumulate_: logits must be float16, bfloat16, float32 or float64, got ",
               dtype_name(logits.scalar_type()));
}

void mc_finalize_check(const Tensor& acc, int64_t count, bool normalize, double eps,
                       DeviceType expected_device) {
  check_acc("mc_entropy_finalize_", acc, expected_device);
  SSLSEG_CHECK(count >= 1, "mc_entropy_finalize_: count must be >= 1 (the number of accumulated passes), got ", count);
  SSLSEG_CHECK(eps >= 0.0, "mc_entropy_finalize_: eps must be >= 0, got ", eps);
  SSLSEG_CHECK(!normalize || acc.size(1) >= 2, "mc_entropy_finalize_: normalize=True needs at least 2 classes, got ",
               acc.size(1));
}

Tensor mc_entropy_output(const Tensor& acc) {
  const IntList sizes = acc.sizes();
  std::vector<int64_t> shape(sizes.begin(), sizes.end());
  shape[1] = 1;
  return new_tensor(acc, shape, acc.scalar_type());
}

}  // namespace sslseg
