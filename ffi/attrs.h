// The attributes every communication target has, decoded as one struct, and the helper that
// declares a target's attribute struct (Transformer Engine's `.Attrs<T>()` pattern).
//
// XLA decodes a target's whole attribute dictionary into one struct, so each target has its own
// struct whose first member is `CommAttrs`: brace elision lets the decoder's flat initialiser
// fill it. Register a struct with JAXEP_REGISTER_ATTRS(T, <its own members>) at global scope.
#pragma once

#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace jaxep {

struct CommAttrs {
  int64_t comm_id;     // Communicator id (registry.h)
  int32_t num_sms;     // blocks of the copy kernels, 0 = the kernel's default
  int64_t timeout_ns;  // bound of every wait on a peer
};

// The `prereduce` attribute of the low-latency combine targets, as the public `prereduce`
// argument (jaxep/low_latency.py): False, True, "float32".
enum Prereduce : int32_t {
  kPrereduceNone = 0,     // one row per (token, expert) entry comes back
  kPrereduceOutDtype = 1, // per (token, expert rank) partial sums in y's dtype
  kPrereduceFloat32 = 2,  // per (token, expert rank) partial sums in float32
};

}  // namespace jaxep

#define JAXEP_COMM_ATTR_MEMBERS                                       \
  ::xla::ffi::StructMember<int64_t>("comm_id"),                       \
      ::xla::ffi::StructMember<int32_t>("num_sms"),                   \
      ::xla::ffi::StructMember<int64_t>("timeout_ns")

// JAXEP_REGISTER_ATTRS(T) for a struct that is CommAttrs only; JAXEP_REGISTER_ATTRS(T, members...)
// for one that adds `members` after it, in declaration order.
#define JAXEP_REGISTER_ATTRS(T, ...) \
  XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(T, JAXEP_COMM_ATTR_MEMBERS __VA_OPT__(, ) __VA_ARGS__)
