// Shared by the transport handlers: find this device's workspace of a communicator, and turn a
// launcher's status into an ffi::Error naming the target.
#pragma once
#ifdef JAXEP_WITH_CUDA

#include <cstdint>
#include <string>

#include <cuda_runtime_api.h>

#include "checks.h"
#include "registry.h"

namespace jaxep {

inline ffi::Error Lookup(const char* op, int64_t comm_id, int32_t device, WorkspaceRef& ref) {
  ref = FindWorkspace(comm_id, device);
  if (!ref.ws) {
    return Invalid(op, "no workspace for communicator " + std::to_string(comm_id) +
                           " on device " + std::to_string(device) +
                           " (closed, or built for another mesh)");
  }
  if (std::string e = DescribeError(*ref.error, ref.ranks_per_node); !e.empty()) {
    return ffi::Error(ffi::ErrorCode::kFailedPrecondition, e);
  }
  return ffi::Error::Success();
}

// The grouped kernels reach every peer by load/store: not across nodes.
inline ffi::Error CheckOneNode(const char* op, const WorkspaceRef& ref) {
  if (ref.ranks_per_node == 0) return ffi::Error::Success();
  return Invalid(op, "this EP group spans nodes (" + std::to_string(ref.num_ranks) +
                         " ranks, " + std::to_string(ref.ranks_per_node) +
                         " per node): the grouped ops have no internode kernels");
}

// A call's T (tokens per rank) must fit the workspace's static capacity.
inline ffi::Error CheckTokens(const char* op, int64_t tokens, const WorkspaceRef& ref) {
  if (tokens <= ref.max_tokens) return ffi::Error::Success();
  return Invalid(op, "T=" + std::to_string(tokens) + " exceeds max_tokens=" +
                         std::to_string(ref.max_tokens));
}

// One process per GPU: a call's inputs must fit the stage sized for the communicator.
inline ffi::Error CheckStage(const char* op, const StageLayout& layout, const WorkspaceRef& ref) {
  if (static_cast<size_t>(layout.bytes) <= ref.stage_bytes) return ffi::Error::Success();
  return Invalid(op, "the call's inputs take " + std::to_string(layout.bytes) +
                         " bytes of the process-per-GPU stage, which holds " +
                         std::to_string(ref.stage_bytes));
}

inline ffi::Error LaunchStatus(const char* op, cudaError_t err) {
  if (err == cudaSuccess) return ffi::Error::Success();
  return ffi::Error::Internal(std::string("jaxep_") + op + "_ffi: launch failed: " +
                              cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
}

}  // namespace jaxep

#endif  // JAXEP_WITH_CUDA
