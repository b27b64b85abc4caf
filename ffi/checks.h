// Validation helpers shared by the FFI handlers: every message starts with the target's name
// ("jaxep_<op>_ffi: ") and says what was expected and what was given.
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace jaxep {

namespace ffi = xla::ffi;

inline std::string Dims(ffi::Span<const int64_t> dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

// Bytes of one row of a buffer whose leading dim counts rows, from its trailing dims, so that a
// buffer of no rows (T = 0) has the row size of one with C rows (0 for a rank-0 buffer).
inline int64_t RowBytes(const ffi::AnyBuffer& b) {
  auto dims = b.dimensions();
  if (dims.size() == 0) return 0;
  int64_t bytes = static_cast<int64_t>(ffi::ByteWidth(b.element_type()));
  for (size_t i = 1; i < dims.size(); ++i) bytes *= dims[i];
  return bytes;
}

// The kernels' one encoding of the element type of the rows they read and write as a type: its
// bytes, 1 = float8_e4m3fn, 2 = bfloat16, 4 = float32 (0: a type no kernel reads rows of).
inline int RowElemBytes(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F8E4M3FN: return 1;
    case ffi::DataType::BF16: return 2;
    case ffi::DataType::F32: return 4;
    default: return 0;
  }
}

inline ffi::Error Invalid(const char* op, const std::string& what) {
  return ffi::Error::InvalidArgument(std::string("jaxep_") + op + "_ffi: " + what);
}

// `what` must have shape `want`.
template <typename B>
ffi::Error Shape(const char* op, const char* what, const B& buf,
                 std::initializer_list<int64_t> want) {
  auto dims = buf.dimensions();
  bool ok = dims.size() == want.size();
  size_t i = 0;
  for (int64_t d : want) ok = ok && dims[i++] == d;
  if (ok) return ffi::Error::Success();
  std::string w = "[";
  i = 0;
  for (int64_t d : want) w += (i++ ? ", " : "") + std::to_string(d);
  return Invalid(op, std::string(what) + " must have shape " + w + "], got " + Dims(dims));
}

}  // namespace jaxep

#define JAXEP_RETURN_IF_ERROR(expr)              \
  if (::xla::ffi::Error e_ = (expr); e_.failure()) { \
    return e_;                                   \
  }
