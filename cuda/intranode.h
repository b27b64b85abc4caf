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
  // grouped.h (the low-latency phases are 11..15, low_latency.h)
  kGroupedStart = 21,
  kGroupedEnd = 22,
  kGroupedCombineStart = 23,
  kGroupedCombinePartials = 24,
  kGroupedCombineEnd = 25,
  kGroupedEntriesStart = 26,
  kGroupedEntriesEnd = 27,
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

// Initialises this process's rank of an EP group spanning processes: `peers[p]` is rank p's
// Workspace mapped into this process (peers[rank] is this process's own, zeroed here), `stages[p]`
// rank p's stage. Maps an ErrorRecord into host memory, loads the kernels and synchronises.
cudaError_t InitProcessWorkspace(int device, int rank, int num_ranks, int max_tokens, int num_topk,
                                 Workspace* const* peers, const char* const* stages,
                                 ErrorRecord** host_error);

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
};
cudaError_t LaunchCombine(const CombineArgs& a, cudaStream_t stream);

// ---- dispatch of rows along a cached handle: out[c] = rows_src[src_index[c]] ---------------
struct DispatchRowsArgs {
  Workspace* ws;
  int num_tokens, capacity, row_bytes;
  const void* rows;           // [T, row_bytes]
  const int32_t* src_index;   // [C]
  void* out;                  // [C, row_bytes]
  int num_sms;
  unsigned long long timeout_ns;
  char* stage;                // this rank's stage (one process per GPU), else null
  StageLayout stage_layout;   // of rows
};
cudaError_t LaunchDispatchRows(const DispatchRowsArgs& a, cudaStream_t stream);

}  // namespace jaxep
