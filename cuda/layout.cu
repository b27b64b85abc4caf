// Dispatch layout kernel: one thread per token, counts in shared memory per block, then one
// global integer atomic per non-zero block count (exact, so the result is deterministic).
//
// A token's K ids are independent loads issued together, so the kernel is bound by launch and
// one round of memory latency rather than by serial loops; T=4096 tokens are 32 blocks.
#include "layout.h"

#include <climits>
#include <cstddef>

namespace jaxep {
namespace {

constexpr int kThreads = 128;  // tokens per block

__global__ void __launch_bounds__(kThreads)
    DispatchLayoutKernel(const int32_t* __restrict__ topk_idx,
                         const int32_t* __restrict__ expert_rank, int num_tokens, int num_topk,
                         int num_experts, int num_ranks, int32_t* __restrict__ tokens_per_rank,
                         int32_t* __restrict__ tokens_per_expert,
                         bool* __restrict__ is_token_in_rank) {
  extern __shared__ int32_t smem[];
  int32_t* s_expert_rank = smem;                   // [E]
  int32_t* s_expert_count = smem + num_experts;    // [E]
  __shared__ int32_t s_rank_count[kLayoutMaxRanks];
  __shared__ unsigned long long s_mask[kThreads];

  const int tid = static_cast<int>(threadIdx.x);
  for (int e = tid; e < num_experts; e += kThreads) {
    s_expert_rank[e] = expert_rank[e];
    s_expert_count[e] = 0;
  }
  for (int r = tid; r < num_ranks; r += kThreads) s_rank_count[r] = 0;
  __syncthreads();

  const int t0 = static_cast<int>(blockIdx.x) * kThreads;
  const int t = t0 + tid;
  unsigned long long mask = 0;
  if (t < num_tokens) {
    const int32_t* row = topk_idx + static_cast<size_t>(t) * num_topk;
    for (int k = 0; k < num_topk; ++k) {
      const int e = row[k];
      if (static_cast<unsigned>(e) >= static_cast<unsigned>(num_experts)) continue;  // -1/invalid
      bool first = true;
      for (int j = 0; j < k; ++j) first = first && row[j] != e;
      if (!first) continue;
      atomicAdd(&s_expert_count[e], 1);
      const int r = s_expert_rank[e];
      if (static_cast<unsigned>(r) < static_cast<unsigned>(num_ranks)) mask |= 1ull << r;
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
  for (int e = tid; e < num_experts; e += kThreads) {
    if (s_expert_count[e]) atomicAdd(&tokens_per_expert[e], s_expert_count[e]);
  }
  for (int r = tid; r < num_ranks; r += kThreads) {
    if (s_rank_count[r]) atomicAdd(&tokens_per_rank[r], s_rank_count[r]);
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
  cudaError_t err = cudaMemsetAsync(tokens_per_rank, 0, sizeof(int32_t) * num_ranks, stream);
  if (err == cudaSuccess) {
    err = cudaMemsetAsync(tokens_per_expert, 0, sizeof(int32_t) * num_experts, stream);
  }
  if (err != cudaSuccess || num_tokens == 0) return err;
  const size_t smem = 2 * static_cast<size_t>(num_experts) * sizeof(int32_t);
  if (smem > 48 * 1024) {
    err = cudaFuncSetAttribute(DispatchLayoutKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(static_cast<unsigned>((num_tokens + kThreads - 1) / kThreads));
  DispatchLayoutKernel<<<grid, kThreads, smem, stream>>>(
      topk_idx, expert_rank, num_tokens, num_topk, num_experts, num_ranks, tokens_per_rank,
      tokens_per_expert, is_token_in_rank);
  return cudaGetLastError();
}

}  // namespace jaxep
