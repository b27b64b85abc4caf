// Dispatch layout: per-rank / per-expert token counts and the token->rank mask.
// Kernel + host launcher only; no XLA headers here (see ffi/dispatch_layout.cc).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace jaxep {

// Limits the layout kernel relies on (the FFI handler validates them).
inline constexpr int kLayoutMaxRanks = 64;      // rank mask is one uint64 per token
inline constexpr int kLayoutMaxExperts = 8192;  // expert->rank table lives in shared memory
inline constexpr int kLayoutMaxTopk = 64;       // in-row dedupe is O(K^2)

// Computes, for topk_idx [T, K] (global expert ids, -1 = none; ids outside
// [-1, E) are treated as -1) and expert_rank [E] (rank holding each expert):
//   tokens_per_rank  [R]    tokens with at least one valid expert on rank r
//   tokens_per_expert[E]    tokens that selected expert e (duplicates in a row count once)
//   is_token_in_rank [T, R] token t has a valid expert on rank r
// Every output element is written: the counts are zeroed with cudaMemsetAsync on `stream`,
// then accumulated with exact integer atomics (deterministic). Entries of
// expert_rank outside [0, R) make that expert count for no rank. Only enqueues
// work on `stream`; returns the launch status (cudaGetLastError()), or
// cudaErrorInvalidValue for arguments outside the limits above.
cudaError_t LaunchDispatchLayout(const int32_t* topk_idx, const int32_t* expert_rank,
                                 int num_tokens, int num_topk, int num_experts, int num_ranks,
                                 int32_t* tokens_per_rank, int32_t* tokens_per_expert,
                                 bool* is_token_in_rank, cudaStream_t stream);

}  // namespace jaxep
