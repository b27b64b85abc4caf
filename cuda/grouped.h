// Expert-grouped normal mode: dispatch that writes each received (token, local expert) pair
// straight into that expert's group of rows (jax.lax.ragged_dot's layout), and the weighted
// combine back. Kernels + host launchers only; the FFI handlers are in ffi/grouped.cc.
//
// Row order, capacity and alignment: docs/design.md, "Semantics contract" (dispatch_grouped);
// the kernels and the tables they share: "Grouped normal mode".
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "intranode.h"

namespace jaxep {

// E_l of the grouped kernels: the layout keeps a [32 warps][E_l] bitmap and prefix table in
// shared memory.
inline constexpr int kMaxGroupedExperts = 512;

// ---- dispatch_grouped ------------------------------------------------------------------------
struct GroupedDispatchArgs {
  Workspace* ws;
  int num_tokens, num_topk, num_experts, num_local_experts;
  int rows;        // M, rows of the output
  int alignment;   // each group padded to a multiple of it
  bool zero_padding;
  const int32_t* topk_idx;       // [T, K]
  const float* topk_weights;     // [T, K]
  const int32_t* expert_rank;    // [E]
  const int32_t* expert_slot;    // [E]
  const void* x;                 // [T, x_row_bytes]
  const void* scales;            // [T, s_row_bytes] or null
  int x_row_bytes, s_row_bytes;
  void* out_x;                   // [M, x_row_bytes]
  void* out_scales;              // [M, s_row_bytes] or null
  int32_t* group_sizes;          // [E_l]
  float* weights;                // [M]
  int32_t* src_index;            // [M]
  int32_t* dest_row;             // [T, K]
  int32_t* dest_rank;            // [T, K]
  int32_t* meta;                 // [2]: num_dropped, num_invalid
  int num_sms;
  unsigned long long timeout_ns;
  char* stage;                   // this rank's stage (one process per GPU), else null
  StageLayout stage_layout;      // of x, scales, topk_idx, topk_weights (DispatchStageLayout)
};
cudaError_t LaunchDispatchGrouped(const GroupedDispatchArgs& a, cudaStream_t stream);
// Dynamic shared memory of the layout kernel for E experts, E_l local ones, and the most the
// current device gives it (LoadGroupedModule raised its limit to that).
size_t GroupedLayoutSharedBytes(int num_experts, int num_local_experts);
size_t GroupedLayoutSharedLimit();

// ---- combine_grouped: out[t] = sum over t's rows on every rank of w[row] * y[row] -----------
struct GroupedCombineArgs {
  Workspace* ws;
  int num_tokens, num_topk, rows, row_elems;  // T, K, M, elements per row
  int elem_bytes;               // of y and out: 2 = bfloat16, 4 = float32
  bool weighted;
  const void* y;                // [M, row]
  const float* weights;         // [M]
  const int32_t* dest_row;      // [T, K]
  const int32_t* dest_rank;     // [T, K]
  void* out;                    // [T, row]
  int num_sms;
  unsigned long long timeout_ns;
  char* stage;                  // one process per GPU: this rank's stage, else null
  StageLayout stage_layout;     // GroupedCombineStageLayout
};
cudaError_t LaunchCombineGrouped(const GroupedCombineArgs& a, cudaStream_t stream);

// One process per GPU, the combine's stage: the handle's dest_row and dest_rank [T, K] (which
// the expert ranks read to find a token's rows), then float32 partial rows [R][T][H].
StageLayout GroupedCombineStageLayout(int64_t num_ranks, int64_t tokens, int64_t num_topk,
                                      int64_t row_elems);

// ---- the value of each top-k entry's grouped row: out[t, k] = vals_r[dest_row[t, k]] --------
struct GroupedEntriesArgs {
  Workspace* ws;
  int num_tokens, num_topk, rows;
  const float* vals;            // [M]
  const int32_t* dest_row;      // [T, K]
  const int32_t* dest_rank;     // [T, K]
  float* out;                   // [T, K]
  unsigned long long timeout_ns;
  char* stage;                  // one process per GPU: this rank's stage (vals), else null
};
cudaError_t LaunchGroupedEntries(const GroupedEntriesArgs& a, cudaStream_t stream);

// Loads this file's kernels (called by the intranode setup, so no kernel loads lazily while a
// peer spins) and sets the layout kernel's shared-memory limit.
cudaError_t LoadGroupedModule();

}  // namespace jaxep
