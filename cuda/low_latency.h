// Low-latency (decoding) transport: one process driving several GPUs of one host over NVLink.
// Kernels + host launchers only; no XLA headers here (see ffi/low_latency.cc).
//
// Design (push, two phases, static buffers). Every device owns an LLWorkspace (cudaMalloc,
// outside XLA's allocator) that its peers write through peer access:
//   * dispatch: the *send* kernel quantises (optionally) and writes each token once per
//     destination rank (deduplicated across that rank's experts: the receiver fans it out) into
//     the destination's receive slots [parity][src][token index], with per-row metadata (token,
//     and for each top-k entry the local expert and the row within it) and per-expert counts,
//     then raises a flag per destination and returns. The *recv* kernel waits for the flags of
//     every source, then unpacks the rows into the expert-major [E_l, R*T, H] output.
//   * combine: the *send* kernel writes each expert output row into its source's slot
//     [parity][token][k] and raises flags; the *recv* kernel waits, then reduces per token with
//     the top-k weights in float32.
// Reuse protocol: calls alternate between two buffer parities; a receiver acknowledges a call
// once it has read it, and a sender waits for the acknowledgement of the call two back before
// writing the same parity. A recv takes its call number from its send's `info` (not from a
// counter of its own), so XLA may order the recvs of two outstanding sends either way. So at most two sends of one family may be outstanding per
// communicator; a third waits, and if the receiver never reads, times out with an error.
// Sequence numbers live on the device (advanced by the kernels), so the host keeps no per-call
// state and the launches can be captured in CUDA graphs. Nothing spins between the phases.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "intranode.h"  // kMaxRanks, ErrorRecord

namespace jaxep {

inline constexpr int kLLMaxTopk = 32;
inline constexpr int kLLChunk = 512;  // channels per warp work item (16 per lane)

enum LLPhase : int32_t {
  kLLDispatchSend = 11,  // waiting for a destination to release the buffer (call - 2)
  kLLDispatchRecv = 12,  // waiting for a source's rows
  kLLCombineSend = 13,
  kLLCombineRecv = 14,
};

// Indices of LLWorkspace::seq (call counters, advanced by the send kernels; a recv takes its
// call number from its send's info) and of LLWorkspace::ticket (last-block detection).
enum LLCounter : int { kDispatchSendCtr = 0, kCombineSendCtr = 1, kNumLLCounters = 2 };
enum LLTicket : int { kDispatchSendTicket = 0, kDispatchRecvTicket = 1, kCombineSendTicket = 2,
                      kCombineRecvTicket = 3, kNumLLTickets = 4 };

struct LLWorkspace {
  // Written by peers.
  alignas(128) unsigned long long dispatch_flag[2][kMaxRanks];  // [parity][src]: src's call
  alignas(128) unsigned long long dispatch_ack[2][kMaxRanks];   // [parity][dest]: last call read
  alignas(128) unsigned long long combine_flag[2][kMaxRanks];
  alignas(128) unsigned long long combine_ack[2][kMaxRanks];
  // This device's call counters (LLCounter) and last-block tickets (LLTicket).
  alignas(128) unsigned long long seq[kNumLLCounters];
  unsigned int ticket[kNumLLTickets];
  // Constant after setup.
  LLWorkspace* peers[kMaxRanks];
  ErrorRecord* error;  // device alias of the rank's host-mapped record
  int32_t rank, num_ranks, max_tokens, num_topk, num_local_experts, hidden;
  int32_t slot_bytes;  // bytes of one row slot: 4 * hidden (float32 rows fit)
  int32_t meta_ints;   // per dispatched row: token, K entries, K weights
  int64_t rows_off, meta_off, counts_off, combine_off;  // regions, bytes from the base:
  // rows:    [2][R(src)][T_max] slots          meta: [2][R(src)][T_max][meta_ints] int32
  // counts:  [2][R(src)][E_l + 1] int32 (per local expert, then rows from src)
  // combine: [2][T_max][K] slots
};

size_t LLWorkspaceBytes(int num_ranks, int max_tokens, int num_topk, int num_local_experts,
                        int hidden);
// Dynamic shared memory of the dispatch send / recv kernels (the caller checks the limit).
size_t LLSendSharedBytes(int num_ranks, int num_tokens, int num_topk, int num_experts);
size_t LLRecvSharedBytes(int num_ranks, int num_local_experts);
inline constexpr size_t kLLMaxSharedBytes = 200 * 1024;

// Allocates one LLWorkspace per device (peer access already enabled by CreateWorkspaces),
// fills the peer tables; errors[r] is rank r's device-side ErrorRecord.
cudaError_t CreateLLWorkspaces(int num_ranks, const int* devices, int max_tokens, int num_topk,
                               int num_local_experts, int hidden, ErrorRecord* const* errors,
                               LLWorkspace** workspaces);
cudaError_t DestroyLLWorkspaces(int num_ranks, const int* devices, LLWorkspace** workspaces);

// Host-side copy of a workspace's sizes, for launch configuration.
struct LLShape {
  int num_ranks, num_local_experts, hidden;
};

// ---- dispatch -----------------------------------------------------------------------------
struct LLDispatchSendArgs {
  LLWorkspace* ws;
  LLShape shape;  // host copy of the workspace's sizes (launch configuration)
  int num_tokens, num_topk, num_experts;  // T (<= max_tokens), K (== workspace K), E
  int x_dtype;                            // 0 = bfloat16, 1 = float32
  bool fp8, round_scale;
  const void* x;                // [T, H]
  const int32_t* topk_idx;      // [T, K] global ids; outside [0, E) = none (counted if != -1)
  const float* weights;         // [T, K] or null: shipped so the receiver can scale rows
  const int32_t* expert_rank;   // [E]
  const int32_t* expert_slot;   // [E]
  int32_t* info;                // [3]: num_invalid, call number (low, high 32 bits); the recv
                                //      reads it, which also orders it after this send
  int num_sms;
  unsigned long long timeout_ns;
};
cudaError_t LaunchLLDispatchSend(const LLDispatchSendArgs& a, cudaStream_t stream);

struct LLDispatchRecvArgs {
  LLWorkspace* ws;
  LLShape shape;  // host copy of the workspace's sizes (launch configuration)
  int num_tokens;      // T of the call (rows per source)
  int elem_bytes;      // payload element: 1 = e4m3, 2 = bfloat16, 4 = float32
  bool fp8, ue8m0, zero_padding, weighted;  // weighted: rows *= shipped weight (not fp8)
  const int32_t* info;  // the send's info
  void* x;             // [E_l, R*T, H]
  void* scales;        // fp8: [E_l, R*T, H/128] f32 or [E_l, R*T, ceil(H/512)] int32; else null
  int32_t* counts;     // [E_l]
  int32_t* src_index;  // [E_l, R*T]: src_rank * T + token, -1 padding
  int32_t* src_topk;   // [E_l, R*T]: the source token's top-k entry, -1 padding
  int32_t* num_invalid;  // [1], copied from info
  int num_sms;
  unsigned long long timeout_ns;
};
cudaError_t LaunchLLDispatchRecv(const LLDispatchRecvArgs& a, cudaStream_t stream);

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
  int32_t* info;             // [2]: call number (low, high 32 bits)
  int num_sms;
  unsigned long long timeout_ns;
};
cudaError_t LaunchLLCombineSend(const LLCombineSendArgs& a, cudaStream_t stream);

struct LLCombineRecvArgs {
  LLWorkspace* ws;
  LLShape shape;  // host copy of the workspace's sizes (launch configuration)
  int num_tokens, num_topk, num_experts;
  int elem_bytes;             // 2 = bfloat16, 4 = float32
  const int32_t* info;        // the send's info
  const int32_t* topk_idx;    // [T, K]
  const float* weights;       // [T, K]
  void* out;                  // [T, H]
  void* rows;                 // [T, K, H] or null: the returned row of each entry (0 if none)
  int num_sms;
  unsigned long long timeout_ns;
};
cudaError_t LaunchLLCombineRecv(const LLCombineRecvArgs& a, cudaStream_t stream);

}  // namespace jaxep
