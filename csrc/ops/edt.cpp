// sslseg::edt: the set-up shared by the CPU and CUDA kernels (checks, geometry, precision, output).
#include "ops/edt.h"

#include <torch/csrc/stable/ops.h>

#include <cmath>

namespace sslseg {

EdtProblem edt_prepare(const Tensor& mask, const std::vector<double>& spacing, DeviceType expected_device) {
  const int64_t nsp = static_cast<int64_t>(spacing.size());
  SSLSEG_CHECK(nsp == 2 || nsp == 3, "edt: spacing must have 2 or 3 entries (one per spatial dim), got ", nsp);
  SSLSEG_CHECK(mask.dim() >= nsp, "edt: mask must have at least ", nsp, " dims (batch dims, then ", nsp,
               " spatial dims), got shape ", shape_str(mask));
  const auto t = mask.scalar_type();
  SSLSEG_CHECK(t == ScalarType::Bool || t == ScalarType::Byte || t == ScalarType::Char || t == ScalarType::Short ||
                   t == ScalarType::Int || t == ScalarType::Long,
               "edt: mask must be bool or an integer dtype (nonzero = foreground), got ", dtype_name(t));
  for (int64_t i = 0; i < nsp; ++i) {
    SSLSEG_CHECK(std::isfinite(spacing[i]) && spacing[i] > 0.0, "edt: spacing[", i, "] must be finite and > 0, got ",
                 spacing[i]);
  }
  SSLSEG_CHECK(on(mask, expected_device), "edt: mask must be a ", device_type_name(expected_device), " tensor, got ",
               device_str(mask));

  EdtProblem p;
  p.out = new_tensor(mask, mask.sizes(), ScalarType::Float);
  if (p.out.numel() == 0) return p;
  p.mask = torch::stable::contiguous(mask);
  const IntList sizes = p.mask.sizes();
  const int64_t d = p.mask.dim();
  p.is3d = nsp == 3;
  p.X = sizes[d - 1];
  p.Y = sizes[d - 2];
  p.Z = p.is3d ? sizes[d - 3] : 1;
  p.B = p.mask.numel() / (p.X * p.Y * p.Z);
  p.sx = spacing.back();
  p.sy = spacing[nsp - 2];
  p.sz = p.is3d ? spacing[0] : 1.0;
  for (int64_t i = 1; i < nsp; ++i) p.use_float = p.use_float && spacing[i] == spacing[0];
  for (int64_t i = d - nsp; i < d; ++i) p.use_float = p.use_float && sizes[i] <= edt_detail::kMaxFloatSize;
  return p;
}

Tensor edt_work(const EdtProblem& p) {
  if (p.use_float) return p.out;
  const int64_t n = p.out.numel();
  return new_tensor(p.out, IntList(&n, 1), ScalarType::Double);
}

}  // namespace sslseg
