// Sliding-window inference: gather of windows from a volume, and the weighted accumulate of window
// predictions into an output with the final normalisation fused (sslseg/ops/sliding_window.py).
//
// Both ops take the window grid as per-dimension start lists (`starts`, the concatenation of the
// lists, and `counts`, their lengths). Window w (0 <= w < B * prod(counts)) is batch element
// w / prod(counts) at the grid position unravelled from w % prod(counts) in C order (last spatial
// dimension fastest): the order of MONAI's dense_patch_slices and of SSL4MIS's test_single_case.
// 2D problems are handled as 3D ones with a leading spatial dimension of size 1.
#pragma once

#include "checks.h"

#include <optional>
#include <array>
#include <cstdint>
#include <limits>
#include <vector>

namespace sslseg {

// A window grid normalised to three spatial dimensions.
struct SwGrid {
  int nd = 3;                              // spatial dims as given (2 or 3)
  std::array<int64_t, 3> roi{1, 1, 1};     // window size
  std::array<int64_t, 3> count{1, 1, 1};   // windows per dimension
  std::array<std::vector<int64_t>, 3> starts;
  int64_t per_batch = 1;                   // prod(count)
};

// One window of the grid: batch element, start, and the bounds that say, voxel by voxel, whether
// this window is the first (write, do not add) and the last (normalise) window covering it.
struct SwWindow {
  int64_t b;
  std::array<int64_t, 3> start;
  // Voxel x is first covered by this window iff x[d] >= first_from[d] for every d.
  std::array<int64_t, 3> first_from;
  // Voxel x is last covered by this window iff x[d] < last_before[d] for every d.
  std::array<int64_t, 3> last_before;
};

// A tensor's sizes and strides as (batch, channel, S0, S1, S2); 4-D tensors get S0 = 1.
struct Sw5 {
  std::array<int64_t, 5> size;
  std::array<int64_t, 5> stride;
};

Sw5 sw_as5(const Tensor& t);

// Checks of sw_gather shared by the CPU and CUDA kernels; returns the grid.
SwGrid sw_gather_check(const Tensor& volume, IntList roi_size, IntList starts,
                       IntList counts, int64_t window_begin, int64_t window_end,
                       DeviceType expected_device);

// Checks of sw_accumulate_ shared by the CPU and CUDA kernels; returns the grid.
SwGrid sw_accumulate_check(const Tensor& out, const Tensor& pred, const std::optional<Tensor>& importance,
                           const std::optional<Tensor>& weight, IntList starts, IntList counts,
                           int64_t window_begin, DeviceType expected_device);

SwWindow sw_window(const SwGrid& g, int64_t w);

// The output of sw_gather: (window_end - window_begin, C, *roi_size), contiguous.
Tensor sw_gather_output(const Tensor& volume, IntList roi_size, int64_t window_begin, int64_t window_end);

}  // namespace sslseg
