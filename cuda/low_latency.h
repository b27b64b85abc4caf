// Low-latency (decoding) transport: the GPUs of an EP group (one process, or one per GPU).
// Kernels + host launchers only; no XLA headers here (see ffi/ll_dispatch.cc, ffi/ll_combine.cc).
// Sources: the kernels in ll_dispatch_kernels.cu and ll_combine_kernels.cu (shared device
// helpers: ll_common.cuh), the workspaces in ll_setup.cu, copy-engine sends in ll_copy_engines.cu.
//
// Push design, completion counters, the buffer-reuse protocol and the pre-reduced weights:
// docs/design.md, "Low-latency mode: push, two phases, static buffers".
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>  // __host__ __device__

#include "intranode.h"  // kMaxRanks, ErrorRecord

namespace jaxep {

inline constexpr int kLLMaxTopk = 32;
inline constexpr int kLLChunk = 512;  // channels per warp work item (16 per lane)

enum LLPhase : int32_t {
  kLLDispatchSend = 11,  // waiting for a destination to release the buffer
  kLLDispatchRecv = 12,  // waiting for a source's rows
  kLLCombineSend = 13,
  kLLCombineRecv = 14,
  kLLCombineWeights = 15,  // pre-reduced combine send: waiting for a source's top-k weights
  kLLDispatchForward = 16,  // layered dispatch: waiting for a source's relay (another node)
};

// A call's shares at one completion counter add up to this (see SignalPeers in ll_common.cuh):
// more than any grid has blocks (the launchers cap grids at kLLMaxBlocks), and 2^44 calls fit
// in the 64-bit counters.
inline constexpr unsigned long long kLLCallTotal = 1ull << 20;
inline constexpr int kLLMaxBlocks = 1 << 16;
inline constexpr int kLLDispatchBuffers = 4;  // 0, 1: SM sends; 2, 3: copy-engine sends
inline constexpr int kLLFirstCopyBuffer = 2;
enum LLTicket : int { kDispatchSendTicket = 0, kCombineSendTicket = 1, kNumLLTickets = 2 };

// Where everything lives in a workspace (identical on every device); computed once
// (ComputeLLLayout), used by the allocation, the kernels (LLWorkspace::layout) and the
// copy-engine launches.
struct LLLayout {
  int32_t slot_bytes;    // bytes of one row slot: 4 * hidden (float32 rows fit)
  int32_t meta_ints;     // per token and destination: token (or -1), K entries, K weights
  int32_t counts_bytes;  // head of a bundle: [E_l] int32 (rows per local expert)
  int32_t copy_engine;   // 1: buffers 2, 3 and the outbox exist (copy-engine sends)
  int32_t combine_slots;  // slots per token and parity: max(K, R) (per top-k entry, or per
                          // expert rank with pre-reduction)
  int32_t rdma;          // 1: some peer is in another node (rdma.cuh): the staging area exists
  int32_t relay_ranks;   // layered dispatch: ranks per node (the relays' width), else 0
  int64_t bundle_bytes;  // one dispatch bundle at T_max rows of slot_bytes
  int64_t relay_bytes;   // one relay bundle at T_max rows (layered dispatch)
  int64_t inbox_off, outbox_off, combine_off, weights_off, staging_off, relay_off,
      total_bytes;  // bytes from the base:
  // inbox:   [2 or 4 (buffer)][R(src)] bundles     outbox: [0 or 2 (buffer - 2)][R(dest)] bundles
  // combine: [2][T_max][combine_slots] slots       weights: [2][R(src)][T_max][K] 8-byte
  //                                                   words (float32 weight | call << 32)
  // staging (rdma only): [2 (SM buffer)][R(dest)] dispatch bundles, then [R][T_max]
  //   [combine_slots] combine slots (one per destination slot, any parity): what this rank
  //   puts to peers in other nodes, before the puts
  // relay (layered only): [2][R(src)] relay bundles received (a source on this rank's rail in
  //   another node), then [2][R(forwarder)] relay bundles staged for the puts
};

// Bit p set: rank p is in another node than `rank` (nodes of ranks_per_node ranks; 0 or
// num_ranks: one node).
inline uint32_t RemoteRanks(int rank, int num_ranks, int ranks_per_node) {
  uint32_t remote = 0;
  for (int p = 0; p < num_ranks && ranks_per_node > 0; ++p) {
    remote |= (p / ranks_per_node != rank / ranks_per_node ? 1u : 0u) << p;
  }
  return remote;
}

struct LLWorkspace {
  // Written by peers (and by this device): completion counters (k * kLLCallTotal once the k-th
  // call to use one is complete), except dispatch_arrived of the copy-engine buffers: a flag,
  // the call's number at the buffer, copied by the sender's copy graph.
  alignas(128) unsigned long long dispatch_arrived[kLLDispatchBuffers][kMaxRanks];  // [buf][src]
  alignas(128) unsigned long long dispatch_read[kLLDispatchBuffers][kMaxRanks];     // [buf][dest]
  alignas(128) unsigned long long combine_arrived[2][kMaxRanks];  // [parity][src]
  alignas(128) unsigned long long combine_read[2][kMaxRanks];     // [parity][dest]
  alignas(128) unsigned long long relay_arrived[2][kMaxRanks];    // [buf][src] layered dispatch
  // This device's call numbers (advanced by the sends) and the sends' last-block tickets.
  alignas(128) unsigned long long dispatch_sm_sends;  // SM dispatch sends so far (buffer parity)
  unsigned long long combine_sends;                   // combine sends so far (parity, tags)
  unsigned long long dispatch_uses[kLLDispatchBuffers];  // calls that have written each buffer
  unsigned int ticket[kNumLLTickets];
  // Constant after setup.
  LLWorkspace* peers[kMaxRanks];  // this node's peers (others: null or unused)
  uint32_t remote;                // bit d: rank d is in another node, reached with NVSHMEM puts
  int32_t pe[kMaxRanks];          // rank d's NVSHMEM PE (rdma only)
  int32_t ranks_per_node;         // with remote: rank d is in node d / ranks_per_node
  int32_t layered;                // 1: dispatch rows to another node go once per node, relayed
  ErrorRecord* error;  // device alias of the rank's host-mapped record
  int32_t rank, num_ranks, max_tokens, num_topk, num_local_experts, hidden;
  LLLayout layout;
};

// rdma: some peer is in another node; relay_ranks > 0: the layered dispatch's relays for nodes
// of that many ranks.
LLLayout ComputeLLLayout(int num_ranks, int max_tokens, int num_topk, int num_local_experts,
                         int hidden, bool copy_engine, bool rdma = false, int relay_ranks = 0);

// Byte offsets from a workspace's base, shared by the kernels and the host's copy graphs:
// dispatch bundle `x` (the source in an inbox, the destination in the outbox) of `buffer`, and
// the flag of (buffer, source).
__host__ __device__ inline int64_t LLInboxOffset(const LLLayout& l, int num_ranks, int buffer,
                                                 int src) {
  return l.inbox_off + (static_cast<int64_t>(buffer) * num_ranks + src) * l.bundle_bytes;
}
__host__ __device__ inline int64_t LLOutboxOffset(const LLLayout& l, int num_ranks, int buffer,
                                                  int dest) {
  return l.outbox_off +
         (static_cast<int64_t>(buffer - kLLFirstCopyBuffer) * num_ranks + dest) * l.bundle_bytes;
}
// Staging (rdma): the bundle this rank puts to `dest` from SM buffer `buffer` (0 or 1), and
// combine slot `i` = (token's rank * T_max + token) * combine_slots + its slot there.
__host__ __device__ inline int64_t LLStagingBundleOffset(const LLLayout& l, int num_ranks,
                                                         int buffer, int dest) {
  return l.staging_off + (static_cast<int64_t>(buffer) * num_ranks + dest) * l.bundle_bytes;
}
__host__ __device__ inline int64_t LLStagingSlotOffset(const LLLayout& l, int num_ranks,
                                                       int64_t i) {
  return l.staging_off + 2 * static_cast<int64_t>(num_ranks) * l.bundle_bytes + i * l.slot_bytes;
}
// Relays (layered dispatch): the bundle received from `src` / staged for forwarder `fwd`.
__host__ __device__ inline int64_t LLRelayInOffset(const LLLayout& l, int num_ranks, int buffer,
                                                   int src) {
  return l.relay_off + (static_cast<int64_t>(buffer) * num_ranks + src) * l.relay_bytes;
}
__host__ __device__ inline int64_t LLRelayStageOffset(const LLLayout& l, int num_ranks,
                                                      int buffer, int fwd) {
  return l.relay_off + (static_cast<int64_t>(2 + buffer) * num_ranks + fwd) * l.relay_bytes;
}
__host__ __device__ inline int64_t LLElemBytes(bool fp8, int x_bytes) { return fp8 ? 1 : x_bytes; }

// One dispatch bundle of a call with T tokens, rows of `elem_bytes` elements (1 = e4m3: the row
// is followed by its H/128 float32 scales):
//   [counts_bytes: counts][align16(T * meta_ints * 4): metadata][T * RowStride: rows]
__host__ __device__ inline int64_t LLAlign16(int64_t n) { return (n + 15) & ~int64_t{15}; }
__host__ __device__ inline int64_t LLRowStride(int elem_bytes, int hidden) {
  return elem_bytes == 1 ? LLAlign16(hidden + 4 * (hidden / 128))
                         : static_cast<int64_t>(hidden) * elem_bytes;
}
__host__ __device__ inline int64_t LLRowsOffset(int counts_bytes, int num_tokens, int meta_ints) {
  return counts_bytes + LLAlign16(static_cast<int64_t>(num_tokens) * meta_ints * 4);
}
__host__ __device__ inline int64_t LLBundleUsedBytes(int counts_bytes, int num_tokens,
                                                     int meta_ints, int elem_bytes, int hidden) {
  return LLRowsOffset(counts_bytes, num_tokens, meta_ints) +
         num_tokens * LLRowStride(elem_bytes, hidden);
}

size_t LLWorkspaceBytes(int num_ranks, int max_tokens, int num_topk, int num_local_experts,
                        int hidden, bool copy_engine, bool rdma = false, int relay_ranks = 0);
// Dynamic shared memory of the dispatch send / recv and combine send kernels (the caller
// checks the limit).
size_t LLSendSharedBytes(int num_tokens, int num_topk, int num_experts);
size_t LLRecvSharedBytes(int num_ranks, int num_local_experts);
size_t LLCombineSendSharedBytes(int num_local_experts);  // bulk-copy buffers + expert prefix
inline constexpr size_t kLLMaxSharedBytes = 200 * 1024;

// Allocates one LLWorkspace per device (peer access already enabled by CreateWorkspaces),
// fills the peer tables; errors[r] is rank r's device-side ErrorRecord.
cudaError_t CreateLLWorkspaces(int num_ranks, const int* devices, int max_tokens, int num_topk,
                               int num_local_experts, int hidden, bool copy_engine,
                               ErrorRecord* const* errors, LLWorkspace** workspaces);
cudaError_t DestroyLLWorkspaces(int num_ranks, const int* devices, LLWorkspace** workspaces);
// One process per GPU: initialises this process's rank of the group in symmetric memory that
// the caller allocated (LLWorkspaceBytes without copy-engine buffers; peers[p] is rank p's
// workspace mapped here, peers[rank] this process's own, zeroed here). `error` is the device
// alias of the rank's host-mapped record. Loads the kernels and synchronises.
// ranks_per_node in (0, num_ranks): the group spans nodes (rank p in node p / ranks_per_node;
// peers[p] may be null for another node's rank); those ranks are reached with the NVSHMEM puts
// of rdma.cuh to PE pes[p], which needs NVSHMEM's device state initialised in this process
// (InitNvshmemDevice, rdma.h); `layered`: dispatch rows go once per node (see low_latency.h).
cudaError_t InitProcessLLWorkspace(int device, int rank, int num_ranks, int max_tokens,
                                   int num_topk, int num_local_experts, int hidden,
                                   ErrorRecord* error, LLWorkspace* const* peers,
                                   int ranks_per_node = 0, const int* pes = nullptr,
                                   bool layered = false);

// Per-device state of copy-engine dispatch sends: host-side only, see ll_copy_engines.h.
struct LLCopyEngines;

// Host-side copy of a workspace's sizes, for launch configuration.
struct LLShape {
  int num_ranks, num_local_experts, hidden;
  bool layered = false;  // the dispatch recv relays too (its blocks wait for one another)
};

// ---- dispatch -----------------------------------------------------------------------------
struct LLDispatchSendArgs {
  LLWorkspace* ws;
  LLShape shape;  // host copy of the workspace's sizes (launch configuration)
  int num_tokens, num_topk, num_experts;  // T (<= max_tokens), K (== workspace K), E
  int x_elem_bytes;                       // 2 = bfloat16, 4 = float32
  bool fp8, round_scale;
  const void* x;                // [T, H]
  const int32_t* topk_idx;      // [T, K] global ids; outside [0, E) = none (counted if != -1)
  const float* weights;         // [T, K] or null: shipped so the receiver can scale rows
  const int32_t* expert_rank;   // [E]
  const int32_t* expert_slot;   // [E]
  int32_t* info;                // [4] (or null): num_invalid, the call's number at its
                                //      buffer (low, high 32 bits: the buffer's k-th call),
                                //      buffer; the recv reads it, which also orders it after
                                //      this send
  int num_sms;
  unsigned long long timeout_ns;
  int buffer;  // set by the launcher: -1 = SM send (buffer 0/1 chosen on the device), else the
              // copy-engine send's buffer (2 or 3)
};
// engines == nullptr: the kernel writes the destinations' buffers itself (SM send). Else a
// copy-engine send (see LLCopyEngines; the caller's stream must not be capturing).
cudaError_t LaunchLLDispatchSend(const LLDispatchSendArgs& a, cudaStream_t stream,
                                 LLCopyEngines* engines);

struct LLDispatchRecvArgs {
  LLWorkspace* ws;
  LLShape shape;  // host copy of the workspace's sizes (launch configuration)
  int num_tokens;      // T of the call (rows per source)
  int elem_bytes;      // payload element: 1 = e4m3, 2 = bfloat16, 4 = float32
  bool fp8, ue8m0, zero_padding, weighted;  // weighted: rows *= shipped weight (not fp8)
  const int32_t* info;  // the send's info [4]
  void* x;             // [E_l, R*T, H]
  void* scales;        // fp8: [E_l, R*T, H/128] f32 or [E_l, R*T, ceil(H/512)] int32; else null
  int32_t* counts;     // [E_l]
  int32_t* src_index;  // [E_l, R*T]: src_rank * T + token, -1 padding
  int32_t* src_topk;   // [E_l, R*T]: the source token's top-k entry, -1 padding
  int32_t* recv_rows;  // [R*T, K]: per (source token, top-k entry) its output row
                       //   (local expert * R*T + row), -1 if not here or a repeated listing
  int32_t* num_invalid;  // [1], copied from info
  int num_sms;
  unsigned long long timeout_ns;
};
cudaError_t LaunchLLDispatchRecv(const LLDispatchRecvArgs& a, cudaStream_t stream);

// Both phases in one kernel (ll_dispatch): `s` as for an SM send (its info may be null: the
// receive takes the call from the same block), `r` as for its recv (r.info unused). Every
// block of the grid waits for all the others through the peers, so the grid is at most one
// block per SM.
cudaError_t LaunchLLDispatch(const LLDispatchSendArgs& s, const LLDispatchRecvArgs& r,
                             cudaStream_t stream);

// ---- combine ------------------------------------------------------------------------------
struct LLCombineSendArgs {
  LLWorkspace* ws;
  LLShape shape;  // host copy of the workspace's sizes (launch configuration)
  int num_tokens;  // T of the dispatch
  int elem_bytes;  // 2 = bfloat16, 4 = float32
  const void* y;   // [E_l, R*T, H]
  const int32_t* src_index;  // [E_l, R*T]
  const int32_t* src_topk;   // [E_l, R*T]
  const int32_t* counts;     // [E_l]
  int32_t* info;             // [2] (or null): call number (low, high 32 bits)
  bool skip_local;           // rows of this rank's own tokens stay (its recv reads y itself)
  int num_sms;
  unsigned long long timeout_ns;
};
cudaError_t LaunchLLCombineSend(const LLCombineSendArgs& a, cudaStream_t stream);

// Combine with pre-reduction on the expert rank: each rank pushes its tokens' top-k weights
// (repeated listings merged into the first) to every rank, waits for the ones it uses, sums per
// source token the weighted rows of its local experts in float32 and sends that one row to the
// token's [token][expert rank] slot: in y's dtype (one rounding per rank), or in float32 with
// float32_partials (float32 accumulation throughout, as the plain combine). A token with a
// single expert here sends that expert's row as it is (no weight: the recv weighs it). Fewer
// bytes than a row per entry: in y's dtype by the token's distinct experts over the ranks they
// are on (~2.2x at K=8, R=4); in float32 ~1.3x at K=8, R=4 and ~2x at R=2.
struct LLCombineSendReducedArgs {
  LLWorkspace* ws;
  LLShape shape;
  int num_tokens, num_experts;  // T of the dispatch, E
  int elem_bytes;               // 2 = bfloat16, 4 = float32
  const void* y;                // [E_l, R*T, H]
  const int32_t* recv_rows;     // [R*T, K] from the dispatch recv
  const int32_t* topk_idx;      // [T, K] this rank's tokens
  const float* weights;         // [T, K]
  bool float32_partials;        // partial sums of two or more rows in float32 (else y's dtype)
  int32_t* info;                // [2] (or null): call number (low, high 32 bits)
  int num_sms;
  unsigned long long timeout_ns;
};
cudaError_t LaunchLLCombineSendReduced(const LLCombineSendReducedArgs& a, cudaStream_t stream);

struct LLCombineRecvArgs {
  LLWorkspace* ws;
  LLShape shape;  // host copy of the workspace's sizes (launch configuration)
  int num_tokens, num_topk, num_experts;
  int elem_bytes;             // 2 = bfloat16, 4 = float32
  const int32_t* info;        // the send's info
  const int32_t* topk_idx;    // [T, K]
  const float* weights;       // [T, K]
  const int32_t* expert_rank;  // [E]
  bool reduced;               // the send pre-reduced: sum the token's per-rank rows (weights
                              // only for a rank's single row)
  bool float32_partials;      // with `reduced`: as the send's
  void* out;                  // [T, H]
  void* rows;                 // [T, K, H] or null: the returned row of each entry (0 if none;
                              // not with `reduced`)
  const void* y;              // with local_rows (not `reduced`): the expert outputs [E_l, R*T, H]
  const int32_t* local_rows;  // [R*T, K] or null: the dispatch's recv_rows; an entry whose expert
                              // is here is read from y at recv_rows[me * T + t][k], not from
                              // its slot (the send skipped it: skip_local)
  int num_sms;
  unsigned long long timeout_ns;
};
cudaError_t LaunchLLCombineRecv(const LLCombineRecvArgs& a, cudaStream_t stream);

// Both phases in one kernel (ll_combine), as LaunchLLDispatch: `s` as for the send (info may
// be null), `r` as for its recv (r.info unused; r.reduced as the send); at most one block per SM.
cudaError_t LaunchLLCombine(const LLCombineSendArgs& s, const LLCombineRecvArgs& r,
                            cudaStream_t stream);
cudaError_t LaunchLLCombineReduced(const LLCombineSendReducedArgs& s, const LLCombineRecvArgs& r,
                                   cudaStream_t stream);

}  // namespace jaxep
