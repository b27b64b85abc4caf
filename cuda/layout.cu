// Dispatch layout kernel. One launch, three block roles selected by blockIdx.x:
//   block 0                         : tokens_per_rank (scans all tokens, counts in shared memory)
//   blocks 1 .. num_expert_blocks   : tokens_per_expert, kExpertsPerBlock experts per block
//   remaining blocks                : is_token_in_rank, kTokensPerRowBlock token rows per block
// Every role owns its outputs exclusively and writes all of them (zeros included), so no
// global atomics, no pre-zeroing and no inter-block synchronisation are needed. Counting uses
// shared-memory integer atomics, which are exact, so results are deterministic.
#include "layout.h"

#include <climits>
#include <cstddef>

namespace jaxep {
namespace {

constexpr int kThreads = 256;
constexpr int kExpertsPerBlock = 64;
constexpr int kTokensPerRowBlock = kThreads;  // one token per thread when building masks
constexpr int kCountSlots = kLayoutMaxRanks > kExpertsPerBlock ? kLayoutMaxRanks : kExpertsPerBlock;

// Bit r set iff token `row` has a valid expert held by rank r.
__device__ __forceinline__ unsigned long long TokenRankMask(const int32_t* __restrict__ row,
                                                            int num_topk, int num_experts,
                                                            int num_ranks,
                                                            const int32_t* s_expert_rank) {
  unsigned long long mask = 0;
  for (int k = 0; k < num_topk; ++k) {
    const int e = row[k];
    if (static_cast<unsigned>(e) < static_cast<unsigned>(num_experts)) {
      const int r = s_expert_rank[e];
      if (static_cast<unsigned>(r) < static_cast<unsigned>(num_ranks)) mask |= 1ull << r;
    }
  }
  return mask;
}

__device__ __forceinline__ void LoadExpertRank(const int32_t* __restrict__ expert_rank,
                                               int num_experts, int32_t* s_expert_rank) {
  for (int e = threadIdx.x; e < num_experts; e += kThreads) s_expert_rank[e] = expert_rank[e];
}

__global__ void __launch_bounds__(kThreads)
    DispatchLayoutKernel(const int32_t* __restrict__ topk_idx,
                         const int32_t* __restrict__ expert_rank, int num_tokens, int num_topk,
                         int num_experts, int num_ranks, int num_expert_blocks,
                         int32_t* __restrict__ tokens_per_rank,
                         int32_t* __restrict__ tokens_per_expert,
                         bool* __restrict__ is_token_in_rank) {
  extern __shared__ int32_t s_expert_rank[];  // [num_experts], rank roles only
  __shared__ int32_t s_counts[kCountSlots];
  __shared__ unsigned long long s_mask[kTokensPerRowBlock];

  const int block = static_cast<int>(blockIdx.x);
  const int tid = static_cast<int>(threadIdx.x);

  if (block == 0) {
    // ---- tokens_per_rank ----
    for (int r = tid; r < num_ranks; r += kThreads) s_counts[r] = 0;
    LoadExpertRank(expert_rank, num_experts, s_expert_rank);
    __syncthreads();
    for (int t = tid; t < num_tokens; t += kThreads) {
      unsigned long long mask = TokenRankMask(topk_idx + static_cast<size_t>(t) * num_topk,
                                              num_topk, num_experts, num_ranks, s_expert_rank);
      while (mask != 0) {
        const int r = __ffsll(static_cast<long long>(mask)) - 1;
        atomicAdd(&s_counts[r], 1);
        mask &= mask - 1;
      }
    }
    __syncthreads();
    for (int r = tid; r < num_ranks; r += kThreads) tokens_per_rank[r] = s_counts[r];
    return;
  }

  if (block <= num_expert_blocks) {
    // ---- tokens_per_expert for experts [base, base + n) ----
    const int base = (block - 1) * kExpertsPerBlock;
    const int n = min(kExpertsPerBlock, num_experts - base);
    for (int i = tid; i < n; i += kThreads) s_counts[i] = 0;
    __syncthreads();
    const int total = num_tokens * num_topk;  // validated to fit in int by the launcher
    for (int i = tid; i < total; i += kThreads) {  // flat, coalesced scan of topk_idx
      const int e = topk_idx[i];
      const int local = e - base;
      if (static_cast<unsigned>(local) >= static_cast<unsigned>(n)) continue;  // also drops e<0
      const int t = i / num_topk;
      const int k = i - t * num_topk;
      const int32_t* row = topk_idx + static_cast<size_t>(t) * num_topk;
      bool first = true;
      for (int j = 0; j < k; ++j) {
        if (row[j] == e) {
          first = false;
          break;
        }
      }
      if (first) atomicAdd(&s_counts[local], 1);
    }
    __syncthreads();
    for (int i = tid; i < n; i += kThreads) tokens_per_expert[base + i] = s_counts[i];
    return;
  }

  // ---- is_token_in_rank rows [t0, t0 + n) ----
  const int t0 = (block - 1 - num_expert_blocks) * kTokensPerRowBlock;
  const int n = min(kTokensPerRowBlock, num_tokens - t0);
  LoadExpertRank(expert_rank, num_experts, s_expert_rank);
  __syncthreads();
  if (tid < n) {
    s_mask[tid] = TokenRankMask(topk_idx + static_cast<size_t>(t0 + tid) * num_topk, num_topk,
                                num_experts, num_ranks, s_expert_rank);
  }
  __syncthreads();
  bool* out = is_token_in_rank + static_cast<size_t>(t0) * num_ranks;
  const int count = n * num_ranks;
  for (int i = tid; i < count; i += kThreads) {  // coalesced byte writes of n full rows
    const int tl = i / num_ranks;
    const int r = i - tl * num_ranks;
    out[i] = ((s_mask[tl] >> r) & 1ull) != 0;
  }
}

}  // namespace

cudaError_t LaunchDispatchLayout(const int32_t* topk_idx, const int32_t* expert_rank,
                                 int num_tokens, int num_topk, int num_experts, int num_ranks,
                                 int32_t* tokens_per_rank, int32_t* tokens_per_expert,
                                 bool* is_token_in_rank, cudaStream_t stream) {
  if (num_tokens < 0 || num_topk < 0 || num_topk > kLayoutMaxTopk || num_experts < 1 ||
      num_experts > kLayoutMaxExperts || num_ranks < 1 || num_ranks > kLayoutMaxRanks) {
    return cudaErrorInvalidValue;
  }
  if (static_cast<long long>(num_tokens) * num_topk > INT_MAX ||
      static_cast<long long>(num_tokens) * num_ranks > INT_MAX) {
    return cudaErrorInvalidValue;
  }
  const int num_expert_blocks = (num_experts + kExpertsPerBlock - 1) / kExpertsPerBlock;
  const int num_row_blocks = (num_tokens + kTokensPerRowBlock - 1) / kTokensPerRowBlock;
  const dim3 grid(static_cast<unsigned>(1 + num_expert_blocks + num_row_blocks));
  const size_t smem = static_cast<size_t>(num_experts) * sizeof(int32_t);
  DispatchLayoutKernel<<<grid, kThreads, smem, stream>>>(
      topk_idx, expert_rank, num_tokens, num_topk, num_experts, num_ranks, num_expert_blocks,
      tokens_per_rank, tokens_per_expert, is_token_in_rank);
  return cudaGetLastError();
}

}  // namespace jaxep
