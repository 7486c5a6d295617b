// Argument checks whose messages name the argument, what was expected and what was got.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <sstream>
#include <string>

namespace sslseg {

// SSLSEG_CHECK(cond, "op: ", "argument ", name, " expected ... but got ", value)
#define SSLSEG_CHECK(cond, ...) TORCH_CHECK((cond), __VA_ARGS__)

inline std::string shape_str(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

// "teacher[3]" style names for elements of tensor lists.
inline std::string item_name(const char* list, size_t i) {
  return std::string(list) + "[" + std::to_string(i) + "]";
}

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

}  // namespace sslseg
