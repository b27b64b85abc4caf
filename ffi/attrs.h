// The attributes of the communication targets, each target's decoded as one struct
// (`.Attrs<T>()`, Transformer Engine's pattern).
//
// XLA decodes a target's whole attribute dictionary into one struct: the dictionary must have
// exactly the struct's members, and the struct is built by flat aggregate initialisation
// `T{m0, m1, ...}`. Every communication target has `CommAttrs`; a target with more attributes
// has its own struct whose first member is `CommAttrs comm`, which brace elision fills from the
// first three values. Register such a struct with JAXEP_REGISTER_ATTRS(T, <its own members>) at
// global scope, members in declaration order. A target with only these binds
// `.Attrs<CommAttrs>()`.
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

// A struct `T { CommAttrs comm; <members>; }`; `members` are StructMember<type>("name"), in
// declaration order (at least one: a struct of CommAttrs alone is CommAttrs).
#define JAXEP_REGISTER_ATTRS(T, ...) \
  XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(T, JAXEP_COMM_ATTR_MEMBERS, __VA_ARGS__)

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(::jaxep::CommAttrs, JAXEP_COMM_ATTR_MEMBERS);
