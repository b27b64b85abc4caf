// Dispatch layout kernel: a single block of 1024 threads, one token per thread per round.
//
// The whole job is small (T*K ids, a few KB), so it is bound by launch cost and memory latency,
// not bandwidth: one launch with no memsets and no global atomics is cheaper than a wide grid
// that needs its outputs zeroed first. Counts accumulate in shared memory with exact integer
// atomics, so the result is deterministic; a token's ids are loaded before they are used, so
// each round costs about one memory latency.
#include "layout.h"

#include <climits>
#include <cstddef>

namespace jaxep {
namespace {

constexpr int kThreads = 1024;
constexpr int kIdsInFlight = 8;  // ids of one token loaded together

__global__ void __launch_bounds__(kThreads, 1)
    DispatchLayoutKernel(const int32_t* __restrict__ topk_idx,
                         const int32_t* __restrict__ expert_rank, int num_tokens, int num_topk,
                         int num_experts, int num_ranks, int32_t* __restrict__ tokens_per_rank,
                         int32_t* __restrict__ tokens_per_expert,
                         bool* __restrict__ is_token_in_rank) {
  extern __shared__ int32_t smem[];
  int32_t* s_expert_rank = smem;                 // [E]
  int32_t* s_expert_count = smem + num_experts;  // [E]
  __shared__ int32_t s_rank_count[kLayoutMaxRanks];
  __shared__ unsigned long long s_mask[kThreads];

  const int tid = static_cast<int>(threadIdx.x);
  for (int e = tid; e < num_experts; e += kThreads) {
    s_expert_rank[e] = expert_rank[e];
    s_expert_count[e] = 0;
  }
  for (int r = tid; r < num_ranks; r += kThreads) s_rank_count[r] = 0;
  __syncthreads();

  for (int t0 = 0; t0 < num_tokens; t0 += kThreads) {
    const int t = t0 + tid;
    unsigned long long mask = 0;
    if (t < num_tokens) {
      const int32_t* row = topk_idx + static_cast<size_t>(t) * num_topk;
      for (int k0 = 0; k0 < num_topk; k0 += kIdsInFlight) {
        int ids[kIdsInFlight];
#pragma unroll
        for (int i = 0; i < kIdsInFlight; ++i) ids[i] = k0 + i < num_topk ? row[k0 + i] : -1;
#pragma unroll
        for (int i = 0; i < kIdsInFlight; ++i) {
          const int e = ids[i];
          if (static_cast<unsigned>(e) >= static_cast<unsigned>(num_experts)) continue;
          bool first = true;  // a token listing an expert twice counts once
          for (int j = 0; j < k0 + i; ++j) first = first && row[j] != e;
          if (!first) continue;
          atomicAdd(&s_expert_count[e], 1);
          const int r = s_expert_rank[e];
          if (static_cast<unsigned>(r) < static_cast<unsigned>(num_ranks)) mask |= 1ull << r;
        }
      }
      for (unsigned long long m = mask; m != 0; m &= m - 1) {
        atomicAdd(&s_rank_count[__ffsll(static_cast<long long>(m)) - 1], 1);
      }
    }
    s_mask[tid] = mask;
    __syncthreads();
    // is_token_in_rank rows [t0, t0 + n): coalesced byte stores.
    const int n = min(kThreads, num_tokens - t0);
    bool* out = is_token_in_rank + static_cast<size_t>(t0) * num_ranks;
    for (int i = tid; i < n * num_ranks; i += kThreads) {
      const int tl = i / num_ranks;
      out[i] = ((s_mask[tl] >> (i - tl * num_ranks)) & 1ull) != 0;
    }
    __syncthreads();  // s_mask is rewritten next round
  }
  for (int e = tid; e < num_experts; e += kThreads) tokens_per_expert[e] = s_expert_count[e];
  for (int r = tid; r < num_ranks; r += kThreads) tokens_per_rank[r] = s_rank_count[r];
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
  const size_t smem = 2 * static_cast<size_t>(num_experts) * sizeof(int32_t);
  if (smem > 40 * 1024) {  // with the static arrays the default 48 KB would be exceeded
    const cudaError_t err = cudaFuncSetAttribute(
        DispatchLayoutKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  DispatchLayoutKernel<<<1, kThreads, smem, stream>>>(topk_idx, expert_rank, num_tokens, num_topk,
                                                      num_experts, num_ranks, tokens_per_rank,
                                                      tokens_per_expert, is_token_in_rank);
  return cudaGetLastError();
}

}  // namespace jaxep
