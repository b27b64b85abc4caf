// The one registry of process-wide state: the communication workspaces of each live
// Communicator, keyed by its id and the device ordinal the FFI handlers receive.
#pragma once
#ifdef JAXEP_WITH_CUDA

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "intranode.h"

namespace jaxep {

struct WorkspaceRef {
  Workspace* ws = nullptr;
  const ErrorRecord* error = nullptr;  // host-mapped
  int rank = -1;
  int num_ranks = 0;
  int max_tokens = 0;
};

// Allocates the workspaces of every EP group (groups[g][r] = device ordinal of rank r).
// Returns an empty string on success, else what failed.
std::string RegisterCommunicator(int64_t id, const std::vector<std::vector<int>>& groups,
                                 int max_tokens, size_t* bytes_per_device);
// Frees them (after synchronising the devices). Unknown ids are ignored.
std::string ReleaseCommunicator(int64_t id);
// The workspace of `device` in communicator `id`; ws == nullptr when there is none.
WorkspaceRef FindWorkspace(int64_t id, int device);
// A recorded kernel failure (barrier timeout) of communicator `id`, as text; empty if none.
std::string DescribeError(int64_t id);
std::string DescribeError(const ErrorRecord& e);

}  // namespace jaxep

#endif  // JAXEP_WITH_CUDA
