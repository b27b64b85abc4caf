// The one registry of process-wide state: the communication workspaces of each live
// Communicator, keyed by its id and the device ordinal the FFI handlers receive.
#pragma once
#ifdef JAXEP_WITH_CUDA

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "intranode.h"
#include "low_latency.h"

namespace jaxep {

struct WorkspaceRef {
  Workspace* ws = nullptr;
  const ErrorRecord* error = nullptr;  // host-mapped
  int rank = -1;
  int num_ranks = 0;
  int max_tokens = 0;
  LLWorkspace* ll = nullptr;  // low-latency buffers, when allocated
  LLShape ll_shape{};
  int ll_topk = 0;
  LLCopyEngines* ll_ce = nullptr;  // this device's copy-engine send state, when allocated
  char* stage = nullptr;  // one process per GPU: this rank's stage (inputs copied for the peers)
  size_t stage_bytes = 0;
  int num_topk = 0;  // K the workspace's grouped row table was sized for
  int ranks_per_node = 0;  // > 0: the group spans nodes; the grouped kernels do not serve it
};

// Sizes of a communicator's low-latency buffers (allocated when `enabled`); K, E_l and H are
// the communicator's and are set also without them (they size the process-per-GPU stage).
struct LLConfig {
  bool enabled = false;
  int num_topk = 0, num_local_experts = 0, hidden = 0;
  bool copy_engine = false;  // also the copy-engine send buffers and streams
  bool rdma = false;  // one process per GPU, some peer in another node: the staging area
  int relay_ranks = 0;  // with rdma, the layered dispatch's relays: ranks per node (> 1)
  int ranks_per_node = 0;  // with rdma: ranks per node (sizes the normal-mode relay)
};

// Allocates the workspaces of every EP group (groups[g][r] = device ordinal of rank r) under a
// new id (*id; ids are 1, 2, ... in creation order, so compiled programs are reproducible).
// Returns an empty string on success, else what failed.
std::string RegisterCommunicator(const std::vector<std::vector<int>>& groups, int max_tokens,
                                 const LLConfig& ll, int64_t* id, size_t* bytes_per_device);
// One process per GPU: the layout of a rank's symmetric region (the same on every rank):
// the normal-mode Workspace, its stage, the low-latency buffers when enabled, then across
// nodes (ll.rdma) the normal-mode relay (NormalRelay).
struct ProcessRegion {
  size_t workspace_off = 0, stage_off = 0, stage_bytes = 0, ll_off = 0, relay_off = 0, total = 0;
  RelayLayout relay{};
};
ProcessRegion ProcessRegionLayout(int num_ranks, int max_tokens, int capacity, const LLConfig& ll);

// One process per GPU: registers this process's rank `rank` of an EP group of bases.size()
// processes, on `device`, under a new id. bases[p] is rank p's symmetric region (laid out by
// ProcessRegionLayout) as this process addresses it (nvshmem_ptr; bases[rank] its own). Zeroes
// this rank's region: the caller must keep the peers from writing into it until this returned
// on every rank. The region is the caller's (never freed here). Returns "" or what failed.
// With ll.rdma, ll.ranks_per_node = n puts ranks p and q in one node when p / n == q / n (else
// all ranks are in one); a peer in another node is reached with NVSHMEM puts to PE pes[p] (its
// base may be 0): by the
// low-latency kernels, and by the normal-mode ones through the relays (the grouped ones do not
// reach it; the caller's rule keeps them off). Needs NVSHMEM's device state (InitNvshmemDevice).
// ll.relay_ranks > 0 selects the layered dispatch (it must equal ranks_per_node).
std::string RegisterProcessRank(int device, int rank, const std::vector<uintptr_t>& bases,
                                int max_tokens, int capacity, const LLConfig& ll, int64_t* id,
                                const std::vector<int>& pes = {});
// Retires communicator `id`: handlers no longer find its workspaces (their calls fail with a
// clear error). The memory stays allocated until the process exits, because a program captured
// in a CUDA graph replays its kernels without calling the handler again: freeing would let such
// a replay write freed memory. Unknown ids are ignored.
void ReleaseCommunicator(int64_t id);
// The workspace of `device` in communicator `id`; ws == nullptr when there is none.
WorkspaceRef FindWorkspace(int64_t id, int device);
// A recorded kernel failure (barrier timeout) of communicator `id`, as text; empty if none.
std::string DescribeError(int64_t id);
// ranks_per_node > 0: the ranks' nodes are named too.
std::string DescribeError(const ErrorRecord& e, int ranks_per_node = 0);
// The first recorded kernel failure of any live communicator (*id set to it), or "".
std::string FirstError(int64_t* id);

}  // namespace jaxep

#endif  // JAXEP_WITH_CUDA
