// Normal-mode transport: the GPUs of an EP group (one process, or one per GPU) over NVLink.
// Kernels + host launchers only; no XLA headers here (see ffi/intranode.cc).
//
// Pull design, barriers, row order: docs/design.md, "Normal mode: pull" and "Process models".
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace jaxep {

inline constexpr int kMaxRanks = 8;        // GPUs of one host
inline constexpr int kMaxPublished = 4;    // buffer addresses published per call
inline constexpr int kMaxTopkIntranode = 32;
inline constexpr int kMaxExpertsIntranode = 8192;  // expert->rank table in shared memory

// Written by a kernel that timed out waiting for a peer (host-mapped, so the host can read it
// after the failure); the kernel then traps.
struct ErrorRecord {
  int32_t code;   // 0 = none, 1 = barrier timeout
  int32_t rank;   // the waiting rank
  int32_t peer;   // the peer that did not arrive
  int32_t phase;  // Phase below
  int32_t via;    // >= 0: the rank that relays the peer's data here (layered LL dispatch)
  uint64_t seq;   // barrier sequence number waited for
};

enum Phase : int32_t {
  kDispatchStart = 1,
  kDispatchEnd = 2,
  kCombineStart = 3,
  kCombineEnd = 4,
  kRowsStart = 5,
  kRowsEnd = 6,
  kCombineForward = 7,  // across nodes: the forwarders' partial sums have arrived
  // grouped.h (the low-latency phases are 11..15, low_latency.h)
  kGroupedStart = 21,
  kGroupedEnd = 22,
  kGroupedCombineStart = 23,
  kGroupedCombinePartials = 24,
  kGroupedCombineEnd = 25,
  kGroupedEntriesStart = 26,
  kGroupedEntriesEnd = 27,
};

// Normal mode across nodes (docs/design.md, "Across nodes"): rank x exchanges with each other
// node m through one slot of its relay, the one of x's rail peer there (m * ranks_per_node +
// x % ranks_per_node). A source puts its inputs into the slot of its rail peer in every other
// node; the ranks of that node pull them from there over NVLink, as from a stage. In combine the
// rail peer sums its node's rows of the source's tokens and puts one partial row back.
struct NormalRelay {
  char* mine;  // this rank's relay: its slot m is at mine + m * slot_bytes (the same offsets on
               // every rank, so also the put destinations)
  const char* in[kMaxRanks];  // source s in another node: its slot at the rank of my node on
                              // s's rail, as this rank addresses it; null for my node's ranks
  int64_t pos_off;      // slot: int32 counts[kMaxRanks] at 0, then int32 [R][max_tokens] here
  int64_t data_off;     // the source's inputs, laid out as in its stage
  int64_t partial_off;  // combine: the partial rows from node m (the forwarder's are at data_off)
  int64_t slot_bytes;
  int32_t pe[kMaxRanks];   // rank p's NVSHMEM PE
  uint32_t remote;         // bit p: rank p is in another node
  int32_t ranks_per_node;  // 0: one node (no relay)
};

struct Workspace {
  // Barrier: flags[p] holds the last sequence number peer p announced here.
  alignas(128) unsigned long long flags[kMaxRanks];
  alignas(128) unsigned long long seq;  // this device's barrier count (one thread advances it)
  alignas(16) const void* published[kMaxPublished];  // this call's buffer addresses
  int32_t counts[kMaxRanks];  // this call: my tokens destined to each rank
  // Constant after setup.
  Workspace* peers[kMaxRanks];  // peers[rank] (peers[me] == this), in this process's addresses
  // One process per GPU: peer p's stage buffer mapped here (nvshmem_ptr); null in one process,
  // where the kernels read the peers' XLA buffers through `published` instead.
  const char* stage[kMaxRanks];
  ErrorRecord* error;           // device alias of the host-mapped record
  NormalRelay relay;            // across nodes (one process per GPU), else zero
  int32_t rank;
  int32_t num_ranks;
  int32_t max_tokens;
  int32_t num_topk;  // K: sizes the grouped dispatch's row table
  // Followed by int32 pos[num_ranks][max_tokens]: for each destination rank, the index of each
  // of my tokens among my tokens sent there (-1 when not sent); then the grouped dispatch's
  // tables (grouped.h).
};

// SMs of the current device (132 if the query fails): the default grid of the copy kernels.
int DeviceSmCount();

size_t WorkspaceBytes(int num_ranks, int max_tokens, int num_topk);

// Allocates one Workspace per device (devices[r] holds rank r), enables peer access between all
// pairs, fills the peer tables, maps one ErrorRecord per rank into host memory and loads the
// kernels' module on every device (no lazy loading while a peer spins). Restores the current
// device. On failure frees what it allocated.
cudaError_t CreateWorkspaces(int num_ranks, const int* devices, int max_tokens, int num_topk,
                             Workspace** workspaces, ErrorRecord** host_errors);
// Synchronises each device, then frees its Workspace and ErrorRecord.
cudaError_t DestroyWorkspaces(int num_ranks, const int* devices, Workspace** workspaces,
                              ErrorRecord** host_errors);

// ---- one process per GPU (docs/design.md, "Process-per-GPU transport") --------------------
// A peer process cannot address this process's XLA buffers, so each call first copies its inputs
// into the sender's stage buffer (symmetric memory: every peer maps it) and the receivers pull
// from there. The offsets of a call's inputs in the stage depend only on the call's shapes, which
// are the same on every rank, so each receiver computes them itself.
struct StageLayout {
  int64_t off[kMaxPublished];  // where published input i starts (256-byte aligned)
  int64_t bytes;               // end of the last one
};
StageLayout DispatchStageLayout(int64_t tokens, int64_t x_row_bytes, int64_t s_row_bytes,
                                int64_t num_topk);
StageLayout RowsStageLayout(int64_t rows, int64_t row_bytes);
// Bytes of a stage that holds any call of a communicator: dispatch of float32 rows (or fp8 rows
// with their scales), combine of `capacity` float32 rows, dispatch along a handle, and the
// grouped combine's float32 partial rows from every rank (grouped.h).
size_t StageBytes(int num_ranks, int max_tokens, int capacity, int num_topk, int hidden);

// The relay of a rank of an EP group across nodes (NormalRelay): one slot per node, each
// holding a source's positions, its inputs (a stage's worth) and a combine's partial rows.
struct RelayLayout {
  int64_t pos_off, data_off, partial_off, slot_bytes, bytes;
};
RelayLayout NormalRelayLayout(int num_ranks, int ranks_per_node, int max_tokens, int hidden,
                              size_t stage_bytes);

// Initialises this process's rank of an EP group spanning processes: `peers[p]` is rank p's
// Workspace mapped into this process (peers[rank] is this process's own, zeroed here; null for
// a rank in another node), `stages[p]` rank p's stage. `relay`: across nodes, else null. Maps an
// ErrorRecord into host memory, loads the kernels and synchronises.
cudaError_t InitProcessWorkspace(int device, int rank, int num_ranks, int max_tokens, int num_topk,
                                 Workspace* const* peers, const char* const* stages,
                                 const NormalRelay* relay, ErrorRecord** host_error);

// ---- normal-mode dispatch ----------------------------------------------------------------
struct DispatchArgs {
  Workspace* ws;
  int num_tokens, num_topk, num_experts, num_local_experts, capacity;
  const int32_t* topk_idx;       // [T, K]
  const float* topk_weights;     // [T, K]
  const int32_t* expert_rank;    // [E]
  const int32_t* expert_slot;    // [E]
  const void* x;                 // [T, x_row_bytes]
  const void* scales;            // [T, s_row_bytes] or null
  int x_row_bytes, s_row_bytes;
  void* recv_x;                  // [C, x_row_bytes]
  void* recv_scales;             // [C, s_row_bytes] or null
  int32_t* recv_topk;            // [C, K]
  float* recv_weights;           // [C, K]
  int32_t* src_index;            // [C]
  int32_t* send_slot;            // [T, R]
  int32_t* tokens_per_expert;    // [E_l]
  int32_t* meta;                 // [3]: num_tokens, num_dropped, num_invalid
  int num_sms;
  unsigned long long timeout_ns;
  char* stage;                   // this rank's stage (one process per GPU), else null
  StageLayout stage_layout;      // of x, scales, topk_idx, topk_weights
  bool across_nodes;             // the group spans nodes: inputs go through the relays
};
cudaError_t LaunchDispatch(const DispatchArgs& a, cudaStream_t stream);

// ---- combine: out[t] = sum_r y_r[send_slot[t, r]] (float32 accumulation) ------------------
struct CombineArgs {
  Workspace* ws;
  int num_tokens, row_elems;  // T, elements per row
  int elem_bytes;             // 2 = bfloat16, 4 = float32
  const void* y;              // [C, row]
  const int32_t* send_slot;   // [T, R]
  void* out;                  // [T, row]
  int num_sms;
  unsigned long long timeout_ns;
  char* stage;                // this rank's stage (one process per GPU), else null
  StageLayout stage_layout;   // of y
  bool across_nodes;          // the group spans nodes: partial sums through the relays
};
cudaError_t LaunchCombine(const CombineArgs& a, cudaStream_t stream);

// ---- dispatch of rows along a cached handle: out[c] = rows_src[src_index[c]] ---------------
struct DispatchRowsArgs {
  Workspace* ws;
  int num_tokens, capacity, row_bytes;
  const void* rows;           // [T, row_bytes]
  const int32_t* src_index;   // [C]
  const int32_t* send_slot;   // [T, R]: which nodes need which rows (across nodes only)
  void* out;                  // [C, row_bytes]
  int num_sms;
  unsigned long long timeout_ns;
  char* stage;                // this rank's stage (one process per GPU), else null
  StageLayout stage_layout;   // of rows
  bool across_nodes;          // the group spans nodes: rows go through the relays
};
cudaError_t LaunchDispatchRows(const DispatchRowsArgs& a, cudaStream_t stream);

// ---- across nodes (normal_internode.cu): the puts into the rail peers' relays ---------------
// Dispatch: after the positions, before the start barrier: counts, positions, top-k and the
// rows each other node needs. Rows: the rows each other node needs (send_slot).
cudaError_t LaunchDispatchRelay(const DispatchArgs& a, cudaStream_t stream);
cudaError_t LaunchRowsRelay(const DispatchRowsArgs& a, cudaStream_t stream);
// Combine: send_slot to the rail peers; after the start barrier, each rank's partial sums for
// its rail peers' tokens (put back), then a barrier; the final sum reads them (CombineReduce).
cudaError_t LaunchCombineSlots(const CombineArgs& a, cudaStream_t stream);
cudaError_t LaunchCombineForward(const CombineArgs& a, cudaStream_t stream);
cudaError_t LoadInternodeModule();

}  // namespace jaxep
