// Every schema of the sslseg namespace, in one reviewable place. Kernels are bound per backend in
// csrc/ops/cpu/*.cpp (this module, sslseg._C) and csrc/ops/cuda/*.cu (sslseg._C_cuda) with
// STABLE_TORCH_LIBRARY_IMPL; this is the ONLY STABLE_TORCH_LIBRARY(sslseg, ...) (two libraries
// registering one namespace abort the process).
#include <torch/csrc/stable/library.h>

#include <string>

#ifndef SSLSEG_CUDA_BUILT
#define SSLSEG_CUDA_BUILT none  // built without the CUDA module
#endif
#define SSLSEG_STR2(x) #x
#define SSLSEG_STR(x) SSLSEG_STR2(x)

namespace {

// The stable-ABI floor this binary targets, the torch it was compiled against (the runtime torch
// may be any release from the target on) and the CUDA toolkit of sslseg._C_cuda ("none": no CUDA
// module was built).
std::string build_info() {
  return std::string("abi_target=") + SSLSEG_STR(SSLSEG_TARGET_TORCH) + ";built_with_torch=" +
         SSLSEG_STR(SSLSEG_BUILD_TORCH) + ";cuda_built=" + SSLSEG_STR(SSLSEG_CUDA_BUILT);
}

}  // namespace

STABLE_TORCH_LIBRARY(sslseg, m) {
  // Fused EMA: teacher[i] = decay * teacher[i] + (1 - decay) * student[i] for every i, in place,
  // accumulated in fp32 (fp64 for double). sslseg/ops/ema.py (which caches the lists of a module).
  m.def("ema_update_(Tensor(a!)[] teacher, Tensor[] student, float decay) -> ()");
  // The same over lists cached in C++ behind an integer handle (no custom classes in the stable
  // ABI): one call per update whatever the list length. Internal to sslseg/ops/ema.py, which owns
  // the handle and frees it with its cache entry.
  m.def("_ema_plan_new(Tensor[] teacher, Tensor[] student) -> int");
  m.def("_ema_plan_update(int plan, float decay) -> ()");
  m.def("_ema_plan_free(int plan) -> ()");

  // Exact Euclidean distance transform: float32 distance (in spacing units) from every nonzero
  // voxel of a bool/integer mask to the nearest zero voxel, over the last len(spacing) (2 or 3)
  // dims; leading dims are a batch. Equals scipy.ndimage.distance_transform_edt. sslseg/ops/edt.py.
  m.def("edt(Tensor mask, float[] spacing) -> Tensor");

  // Sliding-window inference (sslseg/ops/sliding_window.py). Window grid = per-dim start lists
  // (starts: concatenated, counts: lengths); window w is batch w / prod(counts), grid position
  // unravelled in C order. sw_gather: windows [window_begin, window_end) of volume (B, C, *S) as
  // (N, C, *roi), pad_value outside the volume. sw_accumulate_: the windows of pred (N, C, *roi)
  // (softmax over C first if softmax), times importance, written (first covering window) or added
  // into out (B, C, *S), and divided by weight (*S) at the last covering window: the blending
  // normalisation fused.
  m.def("sw_gather(Tensor volume, int[] roi_size, int[] starts, int[] counts, int window_begin, int window_end, "
        "float pad_value) -> Tensor");
  m.def("sw_accumulate_(Tensor(a!) out, Tensor pred, Tensor? importance, Tensor? weight, int[] starts, "
        "int[] counts, int window_begin, bool softmax=False) -> ()");

  // MC-dropout uncertainty (sslseg/ops/mc_uncertainty.py): acc (+)= softmax(logits, 1) in one
  // pass; then acc /= count in place and the entropy -sum p log(p + eps) (/ log C), (B, 1, *S).
  m.def("mc_softmax_accumulate_(Tensor(a!) acc, Tensor logits, bool overwrite) -> ()");
  m.def("mc_entropy_finalize_(Tensor(a!) acc, int count, bool normalize, float eps) -> Tensor");

  // What this binary targets and was built with (sslseg.ops.build_info()).
  m.def("_build_info() -> str");
}

// No tensor argument to dispatch on: one kernel for every backend.
STABLE_TORCH_LIBRARY_IMPL(sslseg, CompositeExplicitAutograd, m) { m.impl("_build_info", TORCH_BOX(&build_info)); }
