// Vectorisable float exp / log shared by the CPU kernels (mc_uncertainty, sliding_window).
// Plain C++ (no intrinsics): the loops that call them auto-vectorise, for AVX2 too under GCC's
// target_clones. About 1 ulp (Cephes polynomials).
#pragma once

#include <bit>
#include <cstdint>

namespace sslseg::fastmath {

// exp(x) for x in [-88, 0] (softmax arguments x - max, clamped by the caller), Cephes expf:
// range reduction by ln 2, degree-6 polynomial, scaling by 2^n through the exponent bits. At
// x = -88 n is -127, whose bits encode +0.0, so -inf logits give exact zeros. No selects: with
// GCC's default -ftrapping-math, a select next to this arithmetic becomes a branch (jump
// threading) and the loop no longer vectorises; the clamp is a separate loop.
inline float vexp(float x) {
  float fx = x * 1.44269504088896341f;
  fx = (fx + 12582912.0f) - 12582912.0f;  // round to nearest (|fx| < 2^22)
  x = x - fx * 0.693359375f;
  x = x - fx * -2.12194440e-4f;
  const float z = x * x;
  float y = 1.9875691500e-4f;
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * z + x + 1.0f;
  const int32_t n = static_cast<int32_t>(fx);
  return y * std::bit_cast<float>((n + 127) << 23);
}

// log(x) for normal x > 0, Cephes logf: x = m 2^e with m in [sqrt(1/2), sqrt(2)) taken from the
// bits (the "small" half of [0.5, 1) doubled through the exponent, integer arithmetic only, so
// the loop has no select and vectorises), then a degree-8 polynomial in f = m - 1.
inline float vlog(float x) {
  const int32_t bits = std::bit_cast<int32_t>(x);
  const int32_t mb = (bits & 0x007fffff) | 0x3f000000;          // m in [0.5, 1)
  const int32_t small = static_cast<int32_t>(mb < 0x3f3504f3);  // m < sqrt(1/2)
  const float f = std::bit_cast<float>(mb + (small << 23)) - 1.0f;
  const float fe = static_cast<float>(((bits >> 23) & 0xff) - 126 - small);
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  y = y + fe * -2.12194440e-4f;
  y = y + -0.5f * z;
  return (f + y) + fe * 0.693359375f;
}

}  // namespace sslseg::fastmath
