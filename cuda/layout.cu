// Dispatch layout kernel: one thread per token over T/128 blocks.
//
// The job is small (T*K ids), so what matters is latency and contention, not bandwidth (a
// single block is bound by one SM's latency hiding, hence one block per 128 tokens). Here a token's ids are loaded together and deduplicated
// in registers, rank counts are aggregated per warp (ballot + popc, one shared atomic per warp
// and rank), and per-block counts go to global memory with one integer atomic per non-zero
// count. The counts are zeroed by cudaMemsetAsync first. Integer atomics are exact, so the
// result is deterministic.
#include "layout.h"

#include <climits>
#include <cstddef>

namespace jaxep {
namespace {

constexpr int kThreads = 128;    // tokens per block
constexpr int kIdsInFlight = 8;  // ids of one token loaded together (and deduplicated in registers)

__global__ void __launch_bounds__(kThreads)
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
  const int lane = tid & 31;
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
    for (int k0 = 0; k0 < num_topk; k0 += kIdsInFlight) {
      int ids[kIdsInFlight];
#pragma unroll
      for (int i = 0; i < kIdsInFlight; ++i) ids[i] = k0 + i < num_topk ? row[k0 + i] : -1;
#pragma unroll
      for (int i = 0; i < kIdsInFlight; ++i) {
        const int e = ids[i];
        if (static_cast<unsigned>(e) >= static_cast<unsigned>(num_experts)) continue;
        bool first = true;  // a token listing an expert twice counts once
#pragma unroll
        for (int j = 0; j < i; ++j) first = first && ids[j] != e;
        for (int j = 0; j < k0; ++j) first = first && row[j] != e;  // only when K > 8
        if (!first) continue;
        atomicAdd(&s_expert_count[e], 1);
        const int r = s_expert_rank[e];
        if (static_cast<unsigned>(r) < static_cast<unsigned>(num_ranks)) mask |= 1ull << r;
      }
    }
  }
  s_mask[tid] = mask;
  for (int r = 0; r < num_ranks; ++r) {  // warp-aggregated rank counts
    const unsigned votes = __ballot_sync(0xffffffffu, (mask >> r) & 1ull);
    if (lane == 0 && votes) atomicAdd(&s_rank_count[r], __popc(votes));
  }
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
  if (smem > 40 * 1024) {  // with the static arrays the default 48 KB would be exceeded
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
