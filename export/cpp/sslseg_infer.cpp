// sslseg_infer: segment a volume with a TorchScript student exported by `sslseg export`, with the
// same pre-processing and window blending as `sslseg.infer`, in a program that needs only libtorch.
//
//   sslseg_infer MODEL.pt INPUT.npy --out LABELS.npy [--probabilities PROBS.npy]
//   sslseg_infer MODEL.pt --raw INPUT.f32 --shape C,D,H,W --out LABELS.npy
//
// The model file carries its metadata in the extra file `sslseg.json` (format "sslseg-export/1"):
// dim, in_channels, num_classes, patch_size and intensity. The input, (C, D, H, W) or (D, H, W), is
// normalised per channel as `sslseg.data.storage.normalize_intensity` does (zscore / minmax / none, with
// numpy's float32 arithmetic, bit for bit), then
//   - 3D models: sliding window over the volume, window = patch_size, overlap 0.5, Gaussian
//     importance (sigma = 0.125 * window), 4 windows per forward pass; the windows are gathered and
//     blended by sslseg's own CPU kernels (csrc/ops/cpu/sliding_window.cpp, compiled in), so the
//     blended probabilities (the windows' softmax, Gaussian-weighted) are those of
//     `sslseg.inference.predict_volume`; labels = their argmax over classes;
//   - 2D models: slice by slice along D (16 slices per forward pass), each slice resized (bilinear,
//     align_corners=False) to patch_size; labels = argmax at the patch size, resized back by
//     nearest neighbour; probabilities = softmax, resized back bilinearly (sslseg.inference
//     .predict_slicewise).
// Outputs: LABELS.npy (D, H, W), uint8 up to 256 classes else int64 (as `sslseg infer` writes .npy
// files; --label-dtype overrides); PROBS.npy (K, D, H, W) float32. A `--pipeline` export (raw volume
// -> labels in one module) is run as it is. Exit status: 0 on success, 2 for bad arguments or input
// (one line on stderr), 1 if the model itself fails.
//
// Models trained with a plan (metadata "plan", a NIfTI folder preprocessed by sslseg: crop to
// nonzero, per-channel normalisation, resampling to a target spacing) run only as `--pipeline`
// exports, whose module contains the plan's crop and normalisation: give --spacing D,H,W, which
// must equal the plan's target spacing (checked here and in the module; neither resamples). A
// network-only export of such a model is refused with an error saying so.
#include "mini_json.h"
#include "npy.h"

#include <ATen/Parallel.h>
#include <torch/nn/functional.h>
#include <torch/script.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <iostream>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

namespace {

constexpr const char* kFormat = "sslseg-export/1";
constexpr double kOverlap = 0.5;       // sslseg.inference predict_volume: overlap=0.5
constexpr double kSigmaScale = 0.125;  // mode="gaussian", sigma_scale=0.125
constexpr int64_t kWindowBatch = 4;    // sw_batch_size=4
constexpr int64_t kSliceBatch = 16;    // predict_slicewise: batch_size=16

// A user error (arguments, input file, metadata): reported in one line, exit status 2.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

const char* kUsage =
    "usage: sslseg_infer MODEL.pt (INPUT.npy | --raw FILE --shape C,D,H,W) --out LABELS.npy\n"
    "                    [--probabilities PROBS.npy] [--label-dtype auto|uint8|int64] [--threads N]\n"
    "\n"
    "Segments a (C, D, H, W) volume with a TorchScript model written by `sslseg export --format torchscript`,\n"
    "exactly as sslseg.infer does (normalisation, sliding window or slice-wise inference).\n"
    "  INPUT.npy            a .npy array (C, D, H, W) or (D, H, W), any float/int dtype (read as float32)\n"
    "  --raw FILE           instead of INPUT.npy: headerless little-endian float32 values in C order\n"
    "  --shape C,D,H,W      the shape of --raw\n"
    "  --out LABELS.npy     label map (D, H, W)\n"
    "  --probabilities P    also write the class probabilities (K, D, H, W) float32\n"
    "  --label-dtype T      auto (default: uint8 up to 256 classes, else int64, as `sslseg infer` writes\n"
    "                       .npy files), uint8 or int64\n"
    "  --spacing D,H,W      voxel spacing in mm; required for models trained with a plan (pipeline exports),\n"
    "                       and it must be the plan's target spacing (no resampling here)\n"
    "  --threads N          intra-op threads (default: libtorch's choice)\n";

struct Args {
  std::string model, input, raw, out, probs, label_dtype = "auto";
  std::vector<int64_t> shape;
  std::vector<double> spacing;  // empty: not given
  int threads = 0;
};

std::vector<double> parse_spacing(const std::string& text) {
  std::vector<double> v;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    try {
      size_t used = 0;
      const double x = std::stod(item, &used);
      if (used != item.size() || !(x > 0)) throw std::invalid_argument("");
      v.push_back(x);
    } catch (const std::exception&) {
      throw UsageError("--spacing must be three comma-separated positive numbers D,H,W in mm, got '" + text + "'");
    }
  }
  if (v.size() != 3) {
    throw UsageError("--spacing must be three comma-separated positive numbers D,H,W in mm, got '" + text + "'");
  }
  return v;
}

std::vector<int64_t> parse_ints(const std::string& text, const std::string& what) {
  std::vector<int64_t> v;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    try {
      size_t used = 0;
      const long long x = std::stoll(item, &used);
      if (used != item.size() || x < 0) throw std::invalid_argument("");
      v.push_back(x);
    } catch (const std::exception&) {
      throw UsageError(what + " must be comma-separated non-negative integers, got '" + text + "'");
    }
  }
  return v;
}

Args parse_args(int argc, char** argv) {
  Args a;
  std::vector<std::string> positional;
  for (int i = 1; i < argc; ++i) {
    const std::string s = argv[i];
    auto next = [&](const char* flag) -> std::string {
      if (i + 1 >= argc) throw UsageError(std::string(flag) + " needs a value");
      return argv[++i];
    };
    if (s == "-h" || s == "--help") {
      std::cout << kUsage;
      std::exit(0);
    } else if (s == "--out") {
      a.out = next("--out");
    } else if (s == "--probabilities") {
      a.probs = next("--probabilities");
    } else if (s == "--raw") {
      a.raw = next("--raw");
    } else if (s == "--shape") {
      a.shape = parse_ints(next("--shape"), "--shape");
    } else if (s == "--label-dtype") {
      a.label_dtype = next("--label-dtype");
      if (a.label_dtype != "auto" && a.label_dtype != "int64" && a.label_dtype != "uint8") {
        throw UsageError("--label-dtype must be auto, int64 or uint8, got '" + a.label_dtype + "'");
      }
    } else if (s == "--spacing") {
      a.spacing = parse_spacing(next("--spacing"));
    } else if (s == "--threads") {
      const std::vector<int64_t> t = parse_ints(next("--threads"), "--threads");
      if (t.size() != 1 || t[0] < 1) throw UsageError("--threads must be one integer >= 1");
      a.threads = static_cast<int>(t[0]);
    } else if (s.size() > 1 && s[0] == '-') {
      throw UsageError("unknown option '" + s + "'");
    } else {
      positional.push_back(s);
    }
  }
  if (positional.empty()) throw UsageError("MODEL is required");
  a.model = positional[0];
  if (positional.size() > 2) {
    throw UsageError("expected MODEL and at most one INPUT, got " + std::to_string(positional.size()) +
                     " positional arguments");
  }
  if (positional.size() == 2) a.input = positional[1];
  if (a.input.empty() == a.raw.empty()) {
    throw UsageError("give exactly one input: INPUT.npy or --raw FILE --shape C,D,H,W");
  }
  if (!a.raw.empty() && a.shape.size() != 4) {
    throw UsageError("--raw needs --shape C,D,H,W (4 integers), got " + std::to_string(a.shape.size()));
  }
  if (a.raw.empty() && !a.shape.empty()) throw UsageError("--shape is only used with --raw");
  if (a.out.empty()) throw UsageError("--out LABELS.npy is required");
  return a;
}

// ---- metadata ------------------------------------------------------------------------------------

struct Meta {
  int dim = 0;
  int64_t in_channels = 0, num_classes = 0;
  std::vector<int64_t> patch;
  std::string intensity;
  bool pipeline = false;  // `sslseg export --pipeline`: the module maps a raw volume to its labels
  bool planned = false;   // trained with a (non-identity) data plan
  std::vector<double> target_spacing;
};

int64_t json_int(const mini_json::Value& v, const std::string& key, const std::string& where) {
  const mini_json::Value& x = v.at(key);
  if (x.kind != mini_json::Value::Kind::Number || x.number != std::floor(x.number)) {
    throw UsageError(where + ": metadata '" + key + "' must be an integer");
  }
  return static_cast<int64_t>(x.number);
}

Meta read_meta(const std::string& text, const std::string& where) {
  mini_json::Value v;
  try {
    v = mini_json::parse(text);
  } catch (const std::exception& e) {
    throw UsageError(where + ": sslseg.json is not valid JSON (" + e.what() + ")");
  }
  if (v.kind != mini_json::Value::Kind::Object) throw UsageError(where + ": sslseg.json must hold a JSON object");
  try {
    const mini_json::Value& fmt = v.at("format");
    if (fmt.kind != mini_json::Value::Kind::String || fmt.string != kFormat) {
      throw UsageError(where + ": metadata format must be '" + kFormat + "', got '" +
                       (fmt.kind == mini_json::Value::Kind::String ? fmt.string : std::string("<not a string>")) +
                       "'; re-export the model with this sslseg version");
    }
    Meta m;
    m.dim = static_cast<int>(json_int(v, "dim", where));
    m.in_channels = json_int(v, "in_channels", where);
    m.num_classes = json_int(v, "num_classes", where);
    if (m.dim != 2 && m.dim != 3) throw UsageError(where + ": metadata 'dim' must be 2 or 3, got " + std::to_string(m.dim));
    if (m.in_channels < 1 || m.num_classes < 1) throw UsageError(where + ": metadata in_channels/num_classes must be >= 1");
    const mini_json::Value& p = v.at("patch_size");
    if (p.kind != mini_json::Value::Kind::Array || static_cast<int>(p.array.size()) != m.dim) {
      throw UsageError(where + ": metadata 'patch_size' must be a list of " + std::to_string(m.dim) + " integers");
    }
    for (const auto& x : p.array) {
      if (x.kind != mini_json::Value::Kind::Number || x.number < 1 || x.number != std::floor(x.number)) {
        throw UsageError(where + ": metadata 'patch_size' entries must be integers >= 1");
      }
      m.patch.push_back(static_cast<int64_t>(x.number));
    }
    const mini_json::Value& in = v.at("intensity");
    m.intensity = in.kind == mini_json::Value::Kind::String ? in.string : "";
    if (m.intensity != "zscore" && m.intensity != "minmax" && m.intensity != "none") {
      throw UsageError(where + ": metadata 'intensity' must be zscore, minmax or none, got '" + m.intensity + "'");
    }
    if (v.has("pipeline")) {
      const mini_json::Value& pl = v.at("pipeline");
      m.pipeline = pl.kind == mini_json::Value::Kind::Bool && pl.boolean;
    }
    if (v.has("plan") && v.at("plan").kind == mini_json::Value::Kind::Object) {
      const mini_json::Value& plan = v.at("plan");
      const bool identity = plan.has("identity") && plan.at("identity").kind == mini_json::Value::Kind::Bool &&
                            plan.at("identity").boolean;
      if (!identity) {
        m.planned = true;
        const mini_json::Value& ts = plan.at("target_spacing");
        if (ts.kind != mini_json::Value::Kind::Array || ts.array.size() != 3) {
          throw UsageError(where + ": metadata plan 'target_spacing' must be a list of 3 numbers");
        }
        for (const auto& x : ts.array) {
          if (x.kind != mini_json::Value::Kind::Number || !(x.number > 0)) {
            throw UsageError(where + ": metadata plan 'target_spacing' entries must be positive numbers");
          }
          m.target_spacing.push_back(x.number);
        }
      }
    }
    return m;
  } catch (const std::runtime_error& e) {
    if (dynamic_cast<const UsageError*>(&e)) throw;
    throw UsageError(where + ": sslseg.json: " + e.what());
  }
}

// ---- pre-processing ------------------------------------------------------------------------------

// numpy's float32 sum (np.add.reduce over a contiguous array): pairwise summation, blocks of at
// most 128 values summed with 8 running accumulators. Mirrored so that the statistics below are
// bit-identical to sslseg's numpy normalisation, and so are the network inputs.
float pairwise_sum(const float* a, int64_t n) {
  if (n < 8) {
    float res = 0.0f;
    for (int64_t i = 0; i < n; ++i) res += a[i];
    return res;
  }
  if (n <= 128) {
    float r[8];
    for (int j = 0; j < 8; ++j) r[j] = a[j];
    int64_t i = 8;
    for (; i < n - (n % 8); i += 8) {
      for (int j = 0; j < 8; ++j) r[j] += a[i + j];
    }
    float res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (; i < n; ++i) res += a[i];
    return res;
  }
  int64_t n2 = n / 2;
  n2 -= n2 % 8;
  return pairwise_sum(a, n2) + pairwise_sum(a + n2, n - n2);
}

// sslseg.data.storage.normalize_intensity on a contiguous (C, D, H, W) float32 volume, with
// numpy's arithmetic: float32 sums, divided by the count in double (numpy divides a float32 scalar
// by an intp), float32 sqrt, then (x - mean) / std in float32.
at::Tensor normalize_intensity(const at::Tensor& image, const std::string& mode) {
  if (mode == "none") return image;
  at::Tensor out = at::empty_like(image);
  const int64_t n = image.numel() / image.size(0);
  std::vector<float> sq(mode == "zscore" ? n : 0);
  for (int64_t c = 0; c < image.size(0); ++c) {
    const float* x = image.const_data_ptr<float>() + c * n;
    float* y = out.data_ptr<float>() + c * n;
    if (mode == "zscore") {
      const float mean = static_cast<float>(static_cast<double>(pairwise_sum(x, n)) / static_cast<double>(n));
      for (int64_t i = 0; i < n; ++i) {
        const float d = x[i] - mean;
        sq[i] = d * d;
      }
      const float var = static_cast<float>(static_cast<double>(pairwise_sum(sq.data(), n)) / static_cast<double>(n));
      const float sd = std::sqrt(var);
      const float div = sd > 0 ? sd : 1.0f;
      for (int64_t i = 0; i < n; ++i) y[i] = (x[i] - mean) / div;
    } else {
      float lo = x[0], hi = x[0];
      for (int64_t i = 1; i < n; ++i) {
        lo = std::min(lo, x[i]);
        hi = std::max(hi, x[i]);
      }
      // (hi - lo) is a Python float there, rounded to float32 when it meets the float32 array.
      const float range = hi > lo ? static_cast<float>(static_cast<double>(hi) - static_cast<double>(lo)) : 1.0f;
      for (int64_t i = 0; i < n; ++i) y[i] = (x[i] - lo) / range;
    }
  }
  return out;
}

// ---- the network ---------------------------------------------------------------------------------

at::Tensor forward(torch::jit::script::Module& model, const at::Tensor& x, int64_t num_classes) {
  c10::IValue y = model.forward({x});
  if (y.isTuple()) y = y.toTupleRef().elements().at(0);
  else if (y.isList()) y = y.toListRef().at(0);
  if (!y.isTensor()) throw std::runtime_error("the model must return a Tensor of logits, got " + y.tagKind());
  at::Tensor t = y.toTensor();
  if (t.dim() != x.dim() || t.size(0) != x.size(0) || t.size(1) != num_classes ||
      t.sizes().slice(2) != x.sizes().slice(2)) {
    throw std::runtime_error("the model mapped input " + c10::str(x.sizes()) + " to " + c10::str(t.sizes()) +
                             ", expected (N, " + std::to_string(num_classes) + ", *spatial of the input)");
  }
  return t.to(at::kFloat);
}

// ---- 3D: sliding window (sslseg.inference.window_grid / importance_map / sliding_window) ---------

struct Grid {
  std::vector<int64_t> starts, counts;  // concatenated per-dim window starts, windows per dim
  int64_t num_windows = 1;
};

// MONAI's dense_patch_slices grid, as sslseg.inference.window_grid builds it (stride=None).
Grid window_grid(c10::IntArrayRef spatial, const std::vector<int64_t>& roi, double overlap) {
  Grid g;
  for (size_t d = 0; d < roi.size(); ++d) {
    const int64_t size = spatial[d], r = roi[d];
    const int64_t padded = std::max(size, r);
    const int64_t pad_before = (padded - size) / 2;
    int64_t interval = r;
    if (r != padded) {
      interval = static_cast<int64_t>(static_cast<double>(r) * (1.0 - overlap));
      if (interval <= 0) interval = 1;
    }
    const int64_t num = static_cast<int64_t>(std::ceil(static_cast<double>(padded) / static_cast<double>(interval)));
    int64_t n = 1;
    for (int64_t k = 0; k < num; ++k) {
      if (k * interval + r >= padded) {
        n = k + 1;
        break;
      }
    }
    for (int64_t k = 0; k < n; ++k) {
      int64_t s = k * interval;
      s -= std::max<int64_t>(s + r - padded, 0);
      g.starts.push_back(s - pad_before);
    }
    g.counts.push_back(n);
    g.num_windows *= n;
  }
  return g;
}

// MONAI's 1-D Gaussians, float32 (sslseg.inference.sliding._gaussian_factors), packed as the
// separable importance sw_accumulate_ takes: factors of each dim, then the floor.
at::Tensor separable_importance(const std::vector<int64_t>& roi, double sigma_scale) {
  std::vector<at::Tensor> parts;
  at::Tensor low;
  for (int64_t r : roi) {
    const double sigma = static_cast<double>(r) * sigma_scale;
    at::Tensor x = at::arange(-(static_cast<double>(r) - 1) / 2.0, (static_cast<double>(r) - 1) / 2.0 + 1,
                              at::TensorOptions().dtype(at::kFloat));
    at::Tensor f = at::exp(x.pow(2) / (-2 * std::pow(sigma, 2)));
    low = low.defined() ? low * f.min() : f.min();
    parts.push_back(f);
  }
  parts.push_back(at::clamp(low, 1e-3).reshape({1}));
  return at::cat(parts);
}

// sslseg's sliding-window kernels (csrc/ops/cpu/sliding_window.cpp, compiled in and registered
// with the stable ABI), called through the dispatcher like torch.ops.sslseg.sw_gather in Python.
at::Tensor sw_gather(const at::Tensor& volume, const std::vector<int64_t>& roi, const std::vector<int64_t>& starts,
                     const std::vector<int64_t>& counts, int64_t begin, int64_t end) {
  static const c10::OperatorHandle op = c10::Dispatcher::singleton().findSchemaOrThrow("sslseg::sw_gather", "");
  torch::jit::Stack stack{volume, roi, starts, counts, begin, end, 0.0};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

// torch.ops.sslseg.sw_accumulate_ (in place on out).
void sw_accumulate(const at::Tensor& out, const at::Tensor& pred, const std::optional<at::Tensor>& importance,
                   const std::optional<at::Tensor>& weight, const std::vector<int64_t>& starts,
                   const std::vector<int64_t>& counts, int64_t begin, bool softmax) {
  static const c10::OperatorHandle op = c10::Dispatcher::singleton().findSchemaOrThrow("sslseg::sw_accumulate_", "");
  torch::jit::Stack stack{out, pred, importance ? c10::IValue(*importance) : c10::IValue(),
                          weight ? c10::IValue(*weight) : c10::IValue(), starts, counts, begin, softmax};
  op.callBoxed(&stack);
}

// The (*roi) map the separable importance stands for (sslseg.ops.sliding_window.dense_importance).
at::Tensor dense_importance(const at::Tensor& sep, const std::vector<int64_t>& roi) {
  std::vector<at::Tensor> f = at::split_with_sizes(sep.slice(0, 0, sep.size(0) - 1), roi);
  at::Tensor m = f[0];
  for (size_t i = 1; i < f.size(); ++i) {
    std::vector<int64_t> shape(i, 1);
    shape.push_back(roi[i]);
    m = m.unsqueeze(-1) * f[i].reshape(shape);
  }
  return at::maximum(m, sep.slice(0, sep.size(0) - 1));
}

// (K, D, H, W) blended class probabilities of a (C, D, H, W) volume: the windows' softmax
// probabilities, Gaussian-weighted (sslseg.inference.predict_volume, activation="softmax").
at::Tensor sliding_window(torch::jit::script::Module& model, const at::Tensor& image, const Meta& meta) {
  const at::Tensor volume = image.unsqueeze(0).contiguous();  // (1, C, D, H, W)
  const c10::IntArrayRef spatial = volume.sizes().slice(2);
  const Grid g = window_grid(spatial, meta.patch, kOverlap);
  const at::Tensor sep = separable_importance(meta.patch, kSigmaScale);
  // The blending weight of each voxel: the sum of the importance maps of the windows covering it,
  // accumulated by the same kernel in the same window order as sslseg does.
  std::vector<int64_t> expand_shape{g.num_windows, 1};
  expand_shape.insert(expand_shape.end(), meta.patch.begin(), meta.patch.end());
  const at::Tensor dense = dense_importance(sep, meta.patch);
  std::vector<int64_t> w_shape{1, 1};
  w_shape.insert(w_shape.end(), spatial.begin(), spatial.end());
  at::Tensor weight_acc = at::empty(w_shape, at::TensorOptions().dtype(at::kFloat));
  sw_accumulate(weight_acc, dense.unsqueeze(0).unsqueeze(0).expand(expand_shape), std::nullopt, std::nullopt,
                g.starts, g.counts, 0, false);
  const at::Tensor weight = weight_acc[0][0];
  at::Tensor out;
  for (int64_t begin = 0; begin < g.num_windows; begin += kWindowBatch) {
    const int64_t end = std::min(begin + kWindowBatch, g.num_windows);
    const at::Tensor windows = sw_gather(volume, meta.patch, g.starts, g.counts, begin, end);
    const at::Tensor pred = forward(model, windows, meta.num_classes);
    if (!out.defined()) {
      std::vector<int64_t> shape{1, pred.size(1)};
      shape.insert(shape.end(), spatial.begin(), spatial.end());
      out = at::empty(shape, at::TensorOptions().dtype(at::kFloat));
    }
    // softmax=true: each window's logits become probabilities inside the kernel before blending.
    sw_accumulate(out, pred, sep, weight, g.starts, g.counts, begin, /*softmax=*/true);
  }
  return out[0];
}

// ---- 2D models on volumes: slice by slice (sslseg.inference.predict_slicewise) -------------------

void slicewise(torch::jit::script::Module& model, const at::Tensor& image, const Meta& meta, bool want_probs,
               at::Tensor& labels, at::Tensor& probs) {
  namespace F = torch::nn::functional;
  const int64_t d = image.size(1), h = image.size(2), w = image.size(3);
  const int64_t ph = meta.patch[0], pw = meta.patch[1];
  const bool resize = h != ph || w != pw;
  const at::Tensor slices = image.permute({1, 0, 2, 3});  // (D, C, H, W)
  std::vector<at::Tensor> lab, prob;
  for (int64_t start = 0; start < d; start += kSliceBatch) {
    at::Tensor x = slices.slice(0, start, std::min(start + kSliceBatch, d)).to(at::kFloat);
    if (resize) {
      x = F::interpolate(x, F::InterpolateFuncOptions()
                                .size(std::vector<int64_t>{ph, pw})
                                .mode(torch::kBilinear)
                                .align_corners(false));
    }
    const at::Tensor logits = forward(model, x, meta.num_classes);
    at::Tensor l = logits.argmax(1, /*keepdim=*/true).to(at::kFloat);
    if (resize) {
      l = F::interpolate(l, F::InterpolateFuncOptions().size(std::vector<int64_t>{h, w}).mode(torch::kNearest));
    }
    lab.push_back(l.select(1, 0).to(at::kLong));
    if (want_probs) {
      at::Tensor p = at::softmax(logits, 1);
      if (resize) {
        p = F::interpolate(p, F::InterpolateFuncOptions()
                                  .size(std::vector<int64_t>{h, w})
                                  .mode(torch::kBilinear)
                                  .align_corners(false));
      }
      prob.push_back(p);
    }
  }
  labels = at::cat(lab);  // (D, H, W)
  if (want_probs) probs = at::cat(prob).permute({1, 0, 2, 3}).contiguous();  // (K, D, H, W)
}

// The first line of a libtorch error, without the C++ backtrace.
std::string short_error(const c10::Error& e) {
  std::string msg = e.what_without_backtrace();
  const size_t nl = msg.find('\n');
  return nl == std::string::npos ? msg : msg.substr(0, nl);
}

int run(const Args& args) {
  if (args.threads > 0) at::set_num_threads(args.threads);
  torch::jit::ExtraFilesMap extra{{"sslseg.json", ""}};
  torch::jit::script::Module model;
  try {
    model = torch::jit::load(args.model, torch::kCPU, extra);
  } catch (const c10::Error& e) {
    throw UsageError(args.model + ": cannot load a TorchScript model (" + short_error(e) + ")");
  }
  if (extra["sslseg.json"].empty()) {
    throw UsageError(args.model +
                     ": no sslseg.json metadata inside; export the model with `sslseg export --format torchscript`");
  }
  const Meta meta = read_meta(extra["sslseg.json"], args.model);
  model.eval();

  const std::string where = args.raw.empty() ? args.input : args.raw;
  at::Tensor image = args.raw.empty() ? npy::load(args.input) : npy::load_raw_float32(args.raw, args.shape);
  if (image.scalar_type() == at::kBool) throw UsageError(where + ": expected a numeric array, got bool");
  if (image.dim() == 3) image = image.unsqueeze(0);  // (D, H, W): one channel, as sslseg.infer reads it
  if (image.dim() != 4) {
    throw UsageError(where + ": expected a volume (D, H, W) or (C, D, H, W), got shape " + c10::str(image.sizes()));
  }
  if (image.size(0) != meta.in_channels) {
    throw UsageError(where + ": the model takes " + std::to_string(meta.in_channels) +
                     " channel(s) on axis 0, got shape " + c10::str(image.sizes()));
  }
  if (image.numel() == 0) throw UsageError(where + ": the volume is empty, shape " + c10::str(image.sizes()));
  image = image.to(at::kFloat).contiguous();
  const at::Tensor finite = at::isfinite(image);
  if (!finite.all().item<bool>()) {
    const bool nan = at::isnan(image).any().item<bool>();
    throw UsageError(where + ": the volume contains " + (nan ? "NaN" : "Inf") + " (" +
                     std::to_string((~finite).sum().item<int64_t>()) + " non-finite voxel(s) of " +
                     std::to_string(image.numel()) + ")");
  }
  const std::string label_dtype =
      args.label_dtype != "auto" ? args.label_dtype : (meta.num_classes <= 256 ? "uint8" : "int64");
  if (label_dtype == "uint8" && meta.num_classes > 256) {
    throw UsageError("--label-dtype uint8 holds at most 256 classes, the model has " + std::to_string(meta.num_classes));
  }
  const bool want_probs = !args.probs.empty();
  if (meta.planned) {
    const std::string target = c10::str(at::ArrayRef<double>(meta.target_spacing));
    if (!meta.pipeline) {
      throw UsageError(args.model + ": the model was trained with a plan (crop, normalisation, target spacing " +
                       target + " mm) that this runner applies only through a pipeline export: export it with "
                       "`sslseg export --pipeline` and pass --spacing, or segment with `sslseg infer`");
    }
    if (args.spacing.empty()) {
      throw UsageError(where + ": the model was trained with a plan: give --spacing D,H,W (mm), which must equal "
                       "the plan's target spacing " + target);
    }
    // Same rule as the module's (sslseg.inference.pipeline.SPACING_RTOL); 2D plans keep each
    // volume's own slice distance.
    for (int a = meta.dim == 2 ? 1 : 0; a < 3; ++a) {
      if (std::abs(args.spacing[a] - meta.target_spacing[a]) > 1e-3 * meta.target_spacing[a]) {
        throw UsageError(where + ": expected a volume at the plan's target spacing " + target + " mm (D, H, W), got "
                         "spacing " + c10::str(at::ArrayRef<double>(args.spacing)) + " mm; this runner does not "
                         "resample: resample the volume to the target spacing first, or use `sslseg infer`");
      }
    }
  }
  if (meta.pipeline && want_probs) {
    throw UsageError(args.model + " is a pipeline export (volume -> labels): it has no probabilities; export "
                     "without --pipeline to get them");
  }

  at::Tensor labels, probs;
  {
    c10::InferenceMode guard;
    try {
      if (meta.pipeline) {
        // The module normalises and blends itself (pure PyTorch): run it on the raw volume.
        labels = meta.planned ? model.forward({image, c10::List<double>(args.spacing)}).toTensor().to(at::kLong)
                              : model.forward({image}).toTensor().to(at::kLong);
      } else if (meta.dim == 3) {
        const at::Tensor blended = sliding_window(model, normalize_intensity(image, meta.intensity), meta);
        labels = blended.argmax(0);  // (D, H, W)
        if (want_probs) probs = blended;  // (K, D, H, W)
      } else {
        slicewise(model, normalize_intensity(image, meta.intensity), meta, want_probs, labels, probs);
      }
    } catch (const c10::Error& e) {
      std::cerr << "sslseg_infer: error: the model failed on input " << c10::str(image.sizes()) << ": "
                << short_error(e) << "\n";
      return 1;
    }
  }
  npy::save(args.out, label_dtype == "uint8" ? labels.to(at::kByte) : labels);
  if (want_probs) npy::save(args.probs, probs);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse_args(argc, argv));
  } catch (const UsageError& e) {
    std::cerr << "sslseg_infer: error: " << e.what() << "\n";
    if (argc <= 1) std::cerr << kUsage;
    return 2;
  } catch (const npy::Error& e) {
    std::cerr << "sslseg_infer: error: " << e.what() << "\n";
    return 2;
  } catch (const c10::Error& e) {
    std::cerr << "sslseg_infer: error: " << short_error(e) << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "sslseg_infer: error: " << e.what() << "\n";
    return 1;
  }
}
