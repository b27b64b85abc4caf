// Shared by the low-latency FFI handlers (ll_dispatch.cc, ll_combine.cc): finding a
// communicator's low-latency buffers, the launch-argument fields every LL kernel has, and the
// context every LL target binds.
#pragma once
#ifdef JAXEP_WITH_CUDA

#include <cstdint>
#include <string>

#include <cuda_runtime_api.h>

#include "attrs.h"
#include "checks.h"
#include "lookup.h"
#include "low_latency.h"
#include "registry.h"
#include "xla/ffi/api/ffi.h"

namespace jaxep {

inline std::string Str(int64_t v) { return std::to_string(v); }

inline ffi::Error LookupLL(const char* op, int64_t comm_id, int32_t device, WorkspaceRef& ref) {
  JAXEP_RETURN_IF_ERROR(Lookup(op, comm_id, device, ref));
  if (!ref.ll) {
    return Invalid(op, "communicator " + Str(comm_id) + " has no low-latency buffers "
                       "(EPConfig.low_latency=False, or too large for the automatic choice)");
  }
  return ffi::Error::Success();
}

// A launch-argument struct of an LL kernel with the fields every one of them has filled in.
template <typename Args>
Args LLArgs(const WorkspaceRef& ref, const CommAttrs& attrs) {
  Args a{};
  a.ws = ref.ll;
  a.shape = ref.ll_shape;
  a.num_sms = attrs.num_sms;
  a.timeout_ns = static_cast<unsigned long long>(attrs.timeout_ns);
  return a;
}

// The context that every LL target binds first.
inline auto LLBind() {
  return ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>().Ctx<ffi::DeviceOrdinal>();
}

}  // namespace jaxep

#endif  // JAXEP_WITH_CUDA
