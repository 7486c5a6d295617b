// CPU kernels of sslseg::mc_softmax_accumulate_ and sslseg::mc_entropy_finalize_, checks
// shared with the CUDA kernels (csrc/ops/mc_uncertainty.cpp).
//
// Work unit: one batch element x a run of kChunk voxels, all classes. The softmax over classes is
// computed in three sweeps over the chunk (max, exp + sum, scale + accumulate) so that every inner
// loop runs along contiguous voxels and vectorises; exp/log are branch-free Cephes polynomials
// (about 1 ulp) that the compiler vectorises, compiled for AVX2 as well as the baseline ISA.
#include "fastmath.h"
#include "ops/mc_uncertainty.h"
#include "parallel.h"

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <vector>

namespace sslseg {
namespace {

using fastmath::vexp;
using fastmath::vlog;

constexpr int64_t kChunk = 256;

// Serial cost per accumulator element (one voxel x one class) of each kernel (csrc/parallel.h),
// measured with one thread on the development host over (2, 4, 64^3) and (2, 2, 112 x 112 x 80):
// softmax + accumulate 0.47-0.49 ns (float32), 10.6-10.9 ns (float64); mean + entropy 0.73-0.90
// ns (float32), 4.4-5.0 ns (float64). A float32 accumulator under ~2M elements is one serial pass.
constexpr double kAccumulateF32Ns = 0.5;
constexpr double kAccumulateF64Ns = 10.0;
constexpr double kFinalizeF32Ns = 0.75;
constexpr double kFinalizeF64Ns = 4.5;

// acc[c][j] (+)= softmax over c of x[c][j], for j < n; x and acc have channel stride xs / as.
// m, s: n floats; e: C * n floats of scratch.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void softmax_chunk_f32(const float* __restrict__ x, int64_t xs, float* __restrict__ acc, int64_t as, int64_t C,
                       int64_t n, bool overwrite, float* __restrict__ m, float* __restrict__ s,
                       float* __restrict__ e) {
  for (int64_t j = 0; j < n; ++j) m[j] = x[j];
  for (int64_t c = 1; c < C; ++c) {
    const float* xc = x + c * xs;
    for (int64_t j = 0; j < n; ++j) m[j] = __builtin_isgreater(xc[j], m[j]) ? xc[j] : m[j];
  }
  for (int64_t j = 0; j < n; ++j) s[j] = 0.0f;
  for (int64_t c = 0; c < C; ++c) {
    const float* xc = x + c * xs;
    float* ec = e + c * n;
    for (int64_t j = 0; j < n; ++j) {
      const float d = xc[j] - m[j];
      ec[j] = __builtin_isless(d, -88.0f) ? -88.0f : d;
    }
    for (int64_t j = 0; j < n; ++j) {
      const float v = vexp(ec[j]);
      ec[j] = v;
      s[j] += v;
    }
  }
  for (int64_t j = 0; j < n; ++j) s[j] = 1.0f / s[j];
  for (int64_t c = 0; c < C; ++c) {
    float* ac = acc + c * as;
    const float* ec = e + c * n;
    if (overwrite) {
      for (int64_t j = 0; j < n; ++j) ac[j] = ec[j] * s[j];
    } else {
      for (int64_t j = 0; j < n; ++j) ac[j] = ac[j] + ec[j] * s[j];
    }
  }
}

// Mean in place and entropy of one chunk: acc[c][j] /= count; ent[j] = -sum_c p log(p + eps).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void finalize_chunk_f32(float* __restrict__ acc, int64_t as, int64_t C, int64_t n, float count, float eps,
                        bool normalize, float log_c, float* __restrict__ ent) {
  for (int64_t j = 0; j < n; ++j) ent[j] = 0.0f;
  for (int64_t c = 0; c < C; ++c) {
    float* ac = acc + c * as;
    for (int64_t j = 0; j < n; ++j) {
      const float p = ac[j] / count;
      ac[j] = p;
      // p = 0 gives 0 * (a finite value: vlog(0) is finite) = 0, i.e. xlogy's 0 log 0 = 0.
      ent[j] = ent[j] - p * vlog(p + eps);
    }
  }
  if (normalize) {
    for (int64_t j = 0; j < n; ++j) ent[j] = ent[j] / log_c;
  }
}

template <typename A, typename L>
inline A load(const L& v) {
  if constexpr (std::is_same_v<L, float> || std::is_same_v<L, double>) return static_cast<A>(v);
  else return static_cast<A>(static_cast<float>(v));
}

// float accumulator: logits of any dtype, converted to float per chunk unless already float.
template <typename L>
void accumulate_f32(const Tensor& acc, const Tensor& logits, bool overwrite) {
  const int64_t B = acc.size(0), C = acc.size(1), S = acc.numel() / (B * C);
  const int64_t chunks = (S + kChunk - 1) / kChunk;
  const L* xp = const_ptr<L>(logits);
  float* ap = mut_ptr<float>(acc);
  const double chunk_ns = kAccumulateF32Ns * static_cast<double>(C * kChunk);
  parallel::parallel_for(0, B * chunks, chunk_ns, [&](int64_t begin, int64_t end) {
    std::vector<float> buf((C + 2) * kChunk + (std::is_same_v<L, float> ? 0 : C * kChunk));
    float* m = buf.data();
    float* s = m + kChunk;
    float* e = s + kChunk;
    float* conv = e + C * kChunk;
    for (int64_t u = begin; u < end; ++u) {
      const int64_t b = u / chunks, j0 = (u % chunks) * kChunk, n = std::min(kChunk, S - j0);
      const L* x = xp + b * C * S + j0;
      float* a = ap + b * C * S + j0;
      if constexpr (std::is_same_v<L, float>) {
        softmax_chunk_f32(x, S, a, S, C, n, overwrite, m, s, e);
      } else {
        for (int64_t c = 0; c < C; ++c)
          for (int64_t j = 0; j < n; ++j) conv[c * n + j] = load<float>(x[c * S + j]);
        softmax_chunk_f32(conv, n, a, S, C, n, overwrite, m, s, e);
      }
    }
  });
}

// double accumulator: plain loops in double with std::exp.
template <typename L>
void accumulate_f64(const Tensor& acc, const Tensor& logits, bool overwrite) {
  const int64_t B = acc.size(0), C = acc.size(1), S = acc.numel() / (B * C);
  const L* xp = const_ptr<L>(logits);
  double* ap = mut_ptr<double>(acc);
  parallel::parallel_for(0, B * S, kAccumulateF64Ns * static_cast<double>(C), [&](int64_t begin, int64_t end) {
    for (int64_t v = begin; v < end; ++v) {
      const int64_t b = v / S, j = v % S;
      const L* x = xp + b * C * S + j;
      double* a = ap + b * C * S + j;
      double mx = load<double>(x[0]);
      for (int64_t c = 1; c < C; ++c) mx = std::max(mx, load<double>(x[c * S]));
      double sum = 0.0;
      for (int64_t c = 0; c < C; ++c) sum += std::exp(load<double>(x[c * S]) - mx);
      const double inv = 1.0 / sum;
      for (int64_t c = 0; c < C; ++c) {
        const double p = std::exp(load<double>(x[c * S]) - mx) * inv;
        a[c * S] = overwrite ? p : a[c * S] + p;
      }
    }
  });
}

template <typename A>
void dispatch_logits(const Tensor& acc, const Tensor& logits, bool overwrite) {
  auto run = [&](auto tag) {
    using L = decltype(tag);
    if constexpr (std::is_same_v<A, float>) accumulate_f32<L>(acc, logits, overwrite);
    else accumulate_f64<L>(acc, logits, overwrite);
  };
  switch (logits.scalar_type()) {
    case ScalarType::Float: return run(float{});
    case ScalarType::Double: return run(double{});
    case ScalarType::Half: return run(torch::headeronly::Half{});
    case ScalarType::BFloat16: return run(torch::headeronly::BFloat16{});
    default: SSLSEG_CHECK(false, "mc_softmax_accumulate_: unexpected logits dtype ", dtype_name(logits.scalar_type()));
  }
}

void mc_softmax_accumulate_cpu(Tensor acc, Tensor logits, bool overwrite) {
  mc_accumulate_check(acc, logits, DeviceType::CPU);
  if (acc.numel() == 0) return;
  const Tensor x = torch::stable::contiguous(logits);
  if (acc.scalar_type() == ScalarType::Double) dispatch_logits<double>(acc, x, overwrite);
  else dispatch_logits<float>(acc, x, overwrite);
}

Tensor mc_entropy_finalize_cpu(Tensor acc, int64_t count, bool normalize, double eps) {
  mc_finalize_check(acc, count, normalize, eps, DeviceType::CPU);
  Tensor ent = mc_entropy_output(acc);
  if (acc.numel() == 0) return ent;
  const int64_t B = acc.size(0), C = acc.size(1), S = acc.numel() / (B * C);
  if (acc.scalar_type() == ScalarType::Float) {
    float* ap = mut_ptr<float>(acc);
    float* ep = mut_ptr<float>(ent);
    const float cnt = static_cast<float>(count), fe = static_cast<float>(eps);
    const float log_c = static_cast<float>(std::log(static_cast<double>(C)));
    const int64_t chunks = (S + kChunk - 1) / kChunk;
    const double chunk_ns = kFinalizeF32Ns * static_cast<double>(C * kChunk);
    parallel::parallel_for(0, B * chunks, chunk_ns, [&](int64_t begin, int64_t end) {
      for (int64_t u = begin; u < end; ++u) {
        const int64_t b = u / chunks, j0 = (u % chunks) * kChunk, n = std::min(kChunk, S - j0);
        finalize_chunk_f32(ap + b * C * S + j0, S, C, n, cnt, fe, normalize, log_c, ep + b * S + j0);
      }
    });
  } else {
    double* ap = mut_ptr<double>(acc);
    double* ep = mut_ptr<double>(ent);
    const double cnt = static_cast<double>(count), log_c = std::log(static_cast<double>(C));
    parallel::parallel_for(0, B * S, kFinalizeF64Ns * static_cast<double>(C), [&](int64_t begin, int64_t end) {
      for (int64_t v = begin; v < end; ++v) {
        const int64_t b = v / S, j = v % S;
        double* a = ap + b * C * S + j;
        double h = 0.0;
        for (int64_t c = 0; c < C; ++c) {
          const double p = a[c * S] / cnt;
          a[c * S] = p;
          h -= p > 0.0 ? p * std::log(p + eps) : 0.0;
        }
        ep[v] = normalize ? h / log_c : h;
      }
    });
  }
  return ent;
}

}  // namespace
}  // namespace sslseg

STABLE_TORCH_LIBRARY_IMPL(sslseg, CPU, m) {
  m.impl("mc_softmax_accumulate_", TORCH_BOX(&sslseg::mc_softmax_accumulate_cpu));
  m.impl("mc_entropy_finalize_", TORCH_BOX(&sslseg::mc_entropy_finalize_cpu));
}
