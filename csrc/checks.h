// Argument checks whose messages name the argument, what was expected and what was got, plus the
// stable-ABI names every sslseg source uses (torch/csrc/stable and torch/headeronly only).
#pragma once

#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/DeviceType.h>
#include <torch/headeronly/core/ScalarType.h>

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace sslseg {

using torch::stable::Tensor;
using torch::headeronly::DeviceType;
using torch::headeronly::ScalarType;
using IntList = torch::headeronly::IntHeaderOnlyArrayRef;

// Concatenates the message parts with operator<<.
template <typename... Args>
std::string str(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

// SSLSEG_CHECK(cond, "op: ", "argument ", name, " expected ... but got ", value). Throws
// std::runtime_error, as STD_TORCH_CHECK does (the dispatcher turns it into a Python
// RuntimeError), but with the message alone: STD_TORCH_CHECK prefixes the C++ function, file and
// line, which say nothing to a Python caller.
#define SSLSEG_CHECK(cond, ...)                                     \
  do {                                                              \
    if (!(cond)) throw std::runtime_error(::sslseg::str(__VA_ARGS__)); \
  } while (0)

// "[16, 3, 3]" for a size list, as Python prints list(t.shape).
inline std::string list_str(IntList v) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < v.size(); ++i) os << (i ? ", " : "") << v[i];
  os << "]";
  return os.str();
}

inline std::string shape_str(const Tensor& t) { return list_str(t.sizes()); }

inline bool same_list(IntList a, IntList b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i] != b[i]) return false;
  }
  return true;
}

// The trailing `n` entries of a size list (n <= size).
inline IntList tail(IntList v, size_t n) { return IntList(v.data() + (v.size() - n), n); }

// "teacher[3]" style names for elements of tensor lists.
inline std::string item_name(const char* list, size_t i) { return std::string(list) + "[" + std::to_string(i) + "]"; }

inline bool is_supported_float(ScalarType t) {
  return t == ScalarType::Float || t == ScalarType::Double || t == ScalarType::Half || t == ScalarType::BFloat16;
}

// Python's name of a dtype ("float32", "int64"): the one every message uses (Python side:
// sslseg/ops/_checks.py dtype_name).
inline std::string dtype_name(ScalarType t) {
  switch (t) {
    case ScalarType::Half: return "float16";
    case ScalarType::BFloat16: return "bfloat16";
    case ScalarType::Float: return "float32";
    case ScalarType::Double: return "float64";
    case ScalarType::Long: return "int64";
    case ScalarType::Int: return "int32";
    case ScalarType::Short: return "int16";
    case ScalarType::Byte: return "uint8";
    case ScalarType::Char: return "int8";
    case ScalarType::Bool: return "bool";
    default: return torch::headeronly::toString(t);
  }
}

inline const char* device_type_name(DeviceType t) {
  switch (t) {
    case DeviceType::CPU: return "CPU";
    case DeviceType::CUDA: return "CUDA";
    default: return "non-CPU/CUDA";
  }
}

// "cpu", "cuda:0": Python's str(tensor.device).
inline std::string device_str(const Tensor& t) {
  if (t.is_cpu()) return "cpu";
  if (t.is_cuda()) return "cuda:" + std::to_string(static_cast<int>(t.get_device_index()));
  return str("device type ", static_cast<int>(t.device().type()));
}

inline bool same_device(const Tensor& a, const Tensor& b) {
  return a.device().type() == b.device().type() && a.get_device_index() == b.get_device_index();
}

inline bool on(const Tensor& t, DeviceType type) { return t.device().type() == type; }

template <typename T>
T* mut_ptr(const Tensor& t) {
  return static_cast<T*>(t.data_ptr());
}
template <typename T>
const T* const_ptr(const Tensor& t) {
  return static_cast<const T*>(t.data_ptr());
}

// A new tensor of `sizes` and `dtype` on the device of `like` (contiguous).
inline Tensor new_tensor(const Tensor& like, IntList sizes, ScalarType dtype) {
  return torch::stable::empty(sizes, dtype, std::nullopt, like.device());
}

}  // namespace sslseg
