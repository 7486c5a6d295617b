// MC-dropout uncertainty (UA-MT): a streaming mean of softmax probabilities over T stochastic
// forward passes, and its predictive entropy (sslseg/ops/mc_uncertainty.py).
//
// mc_softmax_accumulate_(acc, logits, overwrite): acc (+)= softmax(logits, dim=1), one pass over
// the logits, so T passes cost O(1) extra memory in T (only acc).
// mc_entropy_finalize_(acc, count, normalize, eps): acc /= count in place (the mean
// probability), and returns the entropy -sum_c p_c log(p_c + eps) (/ log C if normalize),
// shape (B, 1, *spatial).
#pragma once

#include "checks.h"

#include <cstdint>

namespace sslseg {

// Checks shared by the CPU and CUDA kernels (csrc/ops/mc_uncertainty.cpp) so both raise identical
// messages.
void mc_accumulate_check(const Tensor& acc, const Tensor& logits, DeviceType expected_device);
void mc_finalize_check(const Tensor& acc, int64_t count, bool normalize, double eps, DeviceType expected_device);

// The entropy output of mc_entropy_finalize_: (B, 1, *spatial), the dtype and device of acc.
Tensor mc_entropy_output(const Tensor& acc);

}  // namespace sslseg
