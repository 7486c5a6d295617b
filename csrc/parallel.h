// How much parallelism a CPU kernel uses, decided from the size of its work.
//
// A parallel region is cheap only while every pool thread gets a core at once: ~10 us on an idle
// host. When the cores are busy (a data loader, another run, a CI job) a woken pool thread waits
// for a scheduler time slice and the whole fork/join waits with it. Measured on the 2-core
// development host (torch 2.13, OpenMP pool, benches/bench_ema.py --load 2, two busy-loop
// processes beside the bench): the fused EMA update over 500 x 1024 floats, ~0.1 ms of serial
// work run as one parallel region, took 6.7 ms (min) and 16 ms (median), against 0.24 ms for
// torch._foreach_lerp_ (no region for tensors this small). A region is therefore opened only for
// work that needs at least two tasks of kMinTaskNs each: at that size a stall of a few time
// slices is a bounded fraction of the work, and below it the serial path is never far off.
//
// Kernels state the serial cost of one work item in nanoseconds (measured, noted beside each
// kernel; memory-bound loops through kStreamBytesPerNs) and call sslseg::parallel::parallel_for
// in place of torch::stable::parallel_for. The split only changes which thread runs which items:
// every kernel computes each output element the same way on any split, so results do not depend
// on the thread count or on this threshold.
#pragma once

#include <torch/csrc/stable/ops.h>

#include <algorithm>
#include <cstdint>

namespace sslseg::parallel {

// Least serial work of one parallel task, and (twice it) the least work that opens a region.
constexpr double kMinTaskNs = 500'000.0;  // 0.5 ms

// Bytes per nanosecond a streaming loop (load, multiply-add, store) moves on one core: the
// serial fused EMA update of 4M floats (48 MB read and written) took 0.91 ms (53 B/ns) out of
// cache on the development host, ~0.1 ns per float (120 B/ns) in cache. The lower figure keeps
// the estimate on the side of more work, i.e. of a region opening sooner for big inputs.
constexpr double kStreamBytesPerNs = 50.0;

// Serial cost of an item that moves `bytes` through a streaming loop.
constexpr double stream_ns(double bytes) { return bytes / kStreamBytesPerNs; }

// Tasks for `items` items of `item_ns` each: 1 (run serially, no region) below two tasks'
// worth, else as many tasks of at least kMinTaskNs as there are pool threads for.
inline int64_t task_count(int64_t items, double item_ns) {
  const double work = static_cast<double>(items) * std::max(item_ns, 0.0);
  if (!(work >= 2.0 * kMinTaskNs)) return 1;
  const auto by_work = static_cast<int64_t>(work / kMinTaskNs);
  const auto threads = static_cast<int64_t>(torch::stable::get_num_threads());
  return std::max<int64_t>(1, std::min(by_work, threads));
}

// f(b, e) over [begin, end) where one item costs about item_ns of serial time: inline, without
// any parallel region, when task_count says 1; otherwise split into at most that many chunks
// (at::parallel_for gives each thread ceil(n / tasks) items: never less than kMinTaskNs of work).
template <typename F>
void parallel_for(int64_t begin, int64_t end, double item_ns, const F& f) {
  const int64_t n = end - begin;
  if (n <= 0) return;
  const int64_t tasks = task_count(n, item_ns);
  if (tasks <= 1) {
    f(begin, end);
    return;
  }
  torch::stable::parallel_for(begin, end, (n + tasks - 1) / tasks, f);
}

}  // namespace sslseg::parallel
