// Reading and writing NumPy .npy files (format versions 1.0, 2.0 and 3.0) as torch tensors, and
// reading headerless raw files, for the sslseg_infer runner.
//
// Read: little-endian (or single-byte) bool / int / uint / float arrays, C or Fortran order.
// Write: C order, version 1.0, header padded to a multiple of 64 bytes as numpy writes it; the
// file appears atomically (written to a temporary name, then renamed).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace npy {

// Bad input (unreadable file, malformed header, unsupported dtype): the runner reports it as a
// one-line error with exit code 2.
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

inline std::vector<char> read_all(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error(path + ": cannot open file");
  std::vector<char> data((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  if (f.bad()) throw Error(path + ": read error");
  return data;
}

inline at::ScalarType dtype_of(const std::string& descr, const std::string& path) {
  if (descr.size() < 3) throw Error(path + ": unsupported dtype '" + descr + "'");
  const char order = descr[0];
  const std::string code = descr.substr(1);
  const bool single = code == "b1" || code == "u1" || code == "i1";
  if (order == '>' && !single) {
    throw Error(path + ": big-endian data ('" + descr + "') is not supported; save it little-endian");
  }
  if (order != '<' && order != '|' && order != '=' && order != '>') {
    throw Error(path + ": unsupported dtype '" + descr + "'");
  }
  if (code == "f4") return at::kFloat;
  if (code == "f8") return at::kDouble;
  if (code == "f2") return at::kHalf;
  if (code == "u1") return at::kByte;
  if (code == "i1") return at::kChar;
  if (code == "i2") return at::kShort;
  if (code == "i4") return at::kInt;
  if (code == "i8") return at::kLong;
  if (code == "u2") return at::kUInt16;
  if (code == "b1") return at::kBool;
  throw Error(path + ": unsupported dtype '" + descr +
              "' (expected float16/32/64, bool, int8/16/32/64, uint8 or uint16)");
}

// The value of `'key':` in numpy's header dict, as raw text up to the next top-level ',' or '}'.
inline std::string header_field(const std::string& header, const std::string& key, const std::string& path) {
  const std::string pat = "'" + key + "'";
  size_t p = header.find(pat);
  if (p == std::string::npos) throw Error(path + ": .npy header has no '" + key + "' field");
  p = header.find(':', p + pat.size());
  if (p == std::string::npos) throw Error(path + ": malformed .npy header");
  ++p;
  int depth = 0;
  size_t q = p;
  for (; q < header.size(); ++q) {
    const char c = header[q];
    if (c == '(' || c == '[') ++depth;
    else if (c == ')' || c == ']') --depth;
    else if ((c == ',' || c == '}') && depth == 0) break;
  }
  std::string v = header.substr(p, q - p);
  const size_t a = v.find_first_not_of(" \t"), b = v.find_last_not_of(" \t");
  return a == std::string::npos ? "" : v.substr(a, b - a + 1);
}

inline std::vector<int64_t> parse_shape(const std::string& text, const std::string& path) {
  if (text.size() < 2 || text.front() != '(' || text.back() != ')') {
    throw Error(path + ": malformed shape '" + text + "' in .npy header");
  }
  std::vector<int64_t> shape;
  std::string item;
  std::stringstream ss(text.substr(1, text.size() - 2));
  while (std::getline(ss, item, ',')) {
    const size_t a = item.find_first_not_of(" \t");
    if (a == std::string::npos) continue;  // the trailing comma of a 1-tuple
    try {
      shape.push_back(std::stoll(item.substr(a)));
    } catch (const std::exception&) {
      throw Error(path + ": malformed shape '" + text + "' in .npy header");
    }
  }
  return shape;
}

// A tensor with the file's dtype and shape (a copy: the caller owns it).
inline at::Tensor load(const std::string& path) {
  const std::vector<char> data = read_all(path);
  static const char kMagic[] = "\x93NUMPY";
  if (data.size() < 10 || std::string(data.data(), 6) != std::string(kMagic, 6)) {
    throw Error(path + ": not a .npy file (no \\x93NUMPY magic)");
  }
  const auto major = static_cast<uint8_t>(data[6]);
  size_t header_len = 0, header_start = 0;
  if (major == 1) {
    header_len = static_cast<uint8_t>(data[8]) | (static_cast<size_t>(static_cast<uint8_t>(data[9])) << 8);
    header_start = 10;
  } else if (major == 2 || major == 3) {
    if (data.size() < 12) throw Error(path + ": truncated .npy header");
    header_len = 0;
    for (int k = 0; k < 4; ++k) header_len |= static_cast<size_t>(static_cast<uint8_t>(data[8 + k])) << (8 * k);
    header_start = 12;
  } else {
    throw Error(path + ": unsupported .npy format version " + std::to_string(major));
  }
  if (header_start + header_len > data.size()) throw Error(path + ": truncated .npy header");
  const std::string header(data.data() + header_start, header_len);
  std::string descr = header_field(header, "descr", path);
  if (descr.size() < 2 || (descr.front() != '\'' && descr.front() != '"')) {
    throw Error(path + ": unsupported dtype " + descr + " (structured arrays are not supported)");
  }
  descr = descr.substr(1, descr.size() - 2);
  const at::ScalarType dtype = dtype_of(descr, path);
  const bool fortran = header_field(header, "fortran_order", path) == "True";
  std::vector<int64_t> shape = parse_shape(header_field(header, "shape", path), path);
  int64_t numel = 1;
  for (int64_t s : shape) {
    if (s < 0) throw Error(path + ": negative size in shape");
    numel *= s;
  }
  const size_t offset = header_start + header_len;
  const size_t nbytes = static_cast<size_t>(numel) * c10::elementSize(dtype);
  if (data.size() - offset < nbytes) {
    throw Error(path + ": file holds " + std::to_string(data.size() - offset) + " data bytes, the header says " +
                std::to_string(nbytes));
  }
  if (fortran) {
    // Column-major: the same bytes are the C-order array of the reversed shape, transposed.
    std::vector<int64_t> rev(shape.rbegin(), shape.rend());
    at::Tensor t = at::empty(rev, at::TensorOptions().dtype(dtype));
    std::memcpy(t.data_ptr(), data.data() + offset, nbytes);
    std::vector<int64_t> perm;
    for (int64_t d = static_cast<int64_t>(shape.size()) - 1; d >= 0; --d) perm.push_back(d);
    return t.permute(perm).contiguous();
  }
  at::Tensor t = at::empty(shape, at::TensorOptions().dtype(dtype));
  std::memcpy(t.data_ptr(), data.data() + offset, nbytes);
  return t;
}

// A headerless file of float32 values in C order with the given shape.
inline at::Tensor load_raw_float32(const std::string& path, const std::vector<int64_t>& shape) {
  const std::vector<char> data = read_all(path);
  int64_t numel = 1;
  for (int64_t s : shape) numel *= s;
  const size_t nbytes = static_cast<size_t>(numel) * sizeof(float);
  if (data.size() != nbytes) {
    throw Error(path + ": a float32 raw file of shape " + c10::str(c10::IntArrayRef(shape)) + " must hold " +
                std::to_string(nbytes) + " bytes, got " + std::to_string(data.size()));
  }
  at::Tensor t = at::empty(shape, at::TensorOptions().dtype(at::kFloat));
  std::memcpy(t.data_ptr(), data.data(), nbytes);
  return t;
}

inline std::string descr_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "<f4";
    case at::kDouble: return "<f8";
    case at::kLong: return "<i8";
    case at::kInt: return "<i4";
    case at::kByte: return "|u1";
    default: throw std::invalid_argument(std::string("npy::save: unsupported dtype ") + c10::toString(t));
  }
}

// Writes `t` (any layout) as a C-order .npy file; atomically replaces `path`.
inline void save(const std::string& path, const at::Tensor& tensor) {
  const at::Tensor t = tensor.contiguous();
  std::string dims;
  for (int64_t d = 0; d < t.dim(); ++d) dims += (d > 0 ? ", " : "") + std::to_string(t.size(d));
  if (t.dim() == 1) dims += ",";  // a Python 1-tuple
  std::string header = "{'descr': '" + descr_of(t.scalar_type()) + "', 'fortran_order': False, 'shape': (" + dims + "), }";
  // magic (6) + version (2) + length (2) + header + '\n', padded to a multiple of 64 bytes.
  const size_t total = 10 + header.size() + 1;
  header += std::string((64 - total % 64) % 64, ' ') + "\n";
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    if (!f) throw Error(path + ": cannot write (directory missing or not writable?)");
    f.write("\x93NUMPY\x01\x00", 8);
    const uint16_t len = static_cast<uint16_t>(header.size());
    const char len_bytes[2] = {static_cast<char>(len & 0xFF), static_cast<char>(len >> 8)};
    f.write(len_bytes, 2);
    f.write(header.data(), static_cast<std::streamsize>(header.size()));
    f.write(static_cast<const char*>(t.const_data_ptr()), static_cast<std::streamsize>(t.nbytes()));
    if (!f) {
      std::remove(tmp.c_str());
      throw Error(path + ": write failed (disk full?)");
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    throw Error(path + ": cannot move the written file into place");
  }
}

}  // namespace npy
