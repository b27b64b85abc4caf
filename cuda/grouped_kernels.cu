// Expert-grouped normal mode (grouped.h): the layout, the row copies and the combine.
//
// dispatch_grouped = [Stage] -> Publish+barrier -> Layout (1 block) -> Gather (num_sms blocks)
//                    -> Barrier (end) -> DestRow
//   Layout: the receiver reads every source's topk_idx and gives each received pair its index
//     inside its group (sources in (rank, token) order, as the contract orders rows), admits
//     pairs while the aligned rows fit in M, and writes group counts and offsets. A pair's
//     index goes into the receiver's row table [source][token][k].
//   Gather: one warp per source token reads its row once and writes it to each of its groups.
//   DestRow: each sender reads its entries' final rows from the destinations' row tables.
// combine_grouped, one process: Publish(y, weights) -> pull the token's rows from every rank,
//   weighted, float32 accumulation -> Barrier. One process per GPU (peers cannot read y): each
//   expert rank first sums its rows per (source, token) into float32 partials in its stage.
// docs/design.md, "Grouped normal mode", has the tables and the barriers' reasons.
#include "grouped.h"

#include <algorithm>

#include <cuda_bf16.h>

#include "intranode_common.cuh"

namespace jaxep {
namespace {

constexpr int kLayoutThreads = 1024;
constexpr int kLayoutWarps = kLayoutThreads / 32;
constexpr int kEntryThreads = 256;
constexpr size_t kLayoutStaticShared = 16 * 1024;  // headroom for the kernel's static arrays

struct Published {
  const void* p[kMaxPublished];
};

__global__ void PublishAllKernel(Workspace* ws, Published p, int phase,
                                 unsigned long long timeout_ns) {
  if (threadIdx.x < kMaxPublished) ws->published[threadIdx.x] = p.p[threadIdx.x];
  BlockBarrier(ws, phase, timeout_ns);
}

__device__ __forceinline__ unsigned LaneMaskLt() {
  unsigned m;
  asm("mov.u32 %0, %%lanemask_lt;" : "=r"(m));
  return m;
}

// A peer's row table, addressed without reading the peer's header.
__device__ __forceinline__ const int32_t* PeerRowTable(const Workspace* peer, int num_ranks,
                                                      int max_tokens) {
  return reinterpret_cast<const int32_t*>(peer + 1) + static_cast<size_t>(num_ranks) * max_tokens;
}

// ---- layout --------------------------------------------------------------------------------

__global__ void __launch_bounds__(kLayoutThreads, 1) GroupedLayoutKernel(GroupedDispatchArgs a) {
  Workspace* ws = a.ws;
  const int R = ws->num_ranks, me = ws->rank, max_tokens = ws->max_tokens;
  const int T = a.num_tokens, K = a.num_topk, E = a.num_experts, El = a.num_local_experts;
  const int A = a.alignment;
  const long long M = a.rows;
  const int tid = static_cast<int>(threadIdx.x), lane = tid & 31, warp = tid >> 5;

  extern __shared__ int32_t smem[];
  int32_t* s_local = smem;                                    // [E]: slot here, or -1
  unsigned* s_bits = reinterpret_cast<unsigned*>(smem + E);   // [warp][El]: lanes with the slot
  int32_t* s_pre = smem + E + kLayoutWarps * El;              // [warp][El]: pairs before the warp
  __shared__ int s_running[kMaxGroupedExperts];   // pairs of each group in earlier rounds
  __shared__ int s_admitted[kMaxGroupedExperts];
  __shared__ int s_warp_open[kLayoutWarps];
  __shared__ int s_open_base, s_round_open, s_pairs, s_invalid;
  __shared__ const int32_t* s_idx[kMaxRanks];

  for (int e = tid; e < E; e += kLayoutThreads) {
    s_local[e] = a.expert_rank[e] == me ? a.expert_slot[e] : -1;
  }
  for (int j = tid; j < El; j += kLayoutThreads) s_running[j] = s_admitted[j] = 0;
  if (tid < R) s_idx[tid] = reinterpret_cast<const int32_t*>(PeerInput(ws, a.stage_layout, tid, 2));
  if (tid == 0) s_open_base = s_pairs = s_invalid = 0;
  __syncthreads();

  int32_t* table = RowTable(ws);
  const unsigned lt = LaneMaskLt();
  const int N = R * T;
  int pairs = 0, invalid = 0;
  for (int base = 0; base < N; base += kLayoutThreads) {
    const int i = base + tid;
    const bool live = i < N;
    const int s = live ? i / T : 0, t = live ? i - s * T : 0;
    // This token's local experts, each once (its first listing), sorted by slot: the order in
    // which the contract admits a token's pairs.
    int n = 0, pslot[kMaxTopkIntranode], pk[kMaxTopkIntranode], pbefore[kMaxTopkIntranode];
    if (live) {
      int ids[kMaxTopkIntranode];
      const int32_t* row = s_idx[s] + static_cast<size_t>(t) * K;
      for (int k = 0; k < K; ++k) ids[k] = __ldcg(row + k);
      for (int k = 0; k < K; ++k) {
        const int e = ids[k];
        if (e < 0 || e >= E) {
          invalid += (s == me && e != -1);
          continue;
        }
        const int j = s_local[e];
        bool seen = j < 0;  // distinct local experts have distinct slots
        for (int q = 0; q < n; ++q) seen |= pslot[q] == j;
        if (seen) continue;
        int q = n++;
        for (; q > 0 && pslot[q - 1] > j; --q) pslot[q] = pslot[q - 1], pk[q] = pk[q - 1];
        pslot[q] = j;
        pk[q] = k;
      }
    }
    // Index of each pair in its group: earlier rounds, earlier warps, earlier lanes.
    for (int w = tid; w < kLayoutWarps * El; w += kLayoutThreads) s_bits[w] = 0;
    __syncthreads();
    for (int q = 0; q < n; ++q) atomicOr(&s_bits[warp * El + pslot[q]], 1u << lane);
    __syncthreads();
    for (int j = tid; j < El; j += kLayoutThreads) {
      int acc = s_running[j];
      for (int w = 0; w < kLayoutWarps; ++w) {
        s_pre[w * El + j] = acc;
        acc += __popc(s_bits[w * El + j]);
      }
      s_running[j] = acc;
    }
    __syncthreads();
    int opens = 0;  // pairs that start a new block of A rows
    for (int q = 0; q < n; ++q) {
      const int c = warp * El + pslot[q];
      pbefore[q] = s_pre[c] + __popc(s_bits[c] & lt);
      opens += pbefore[q] % A == 0;
    }
    // Rows used through each pair = A * blocks opened so far, in (source, token, slot) order.
    int incl = opens;
    for (int o = 1; o < 32; o <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += v;
    }
    if (lane == 31) s_warp_open[warp] = incl;
    __syncthreads();
    if (warp == 0) {
      const int v = s_warp_open[lane];
      int w_incl = v;
      for (int o = 1; o < 32; o <<= 1) {
        const int u = __shfl_up_sync(0xffffffffu, w_incl, o);
        if (lane >= o) w_incl += u;
      }
      s_warp_open[lane] = w_incl - v;
      if (lane == 31) s_round_open = w_incl;
    }
    __syncthreads();
    if (live) {
      int32_t* trow = table + (static_cast<size_t>(s) * max_tokens + t) * K;
      for (int k = 0; k < K; ++k) trow[k] = -1;
      long long blocks = s_open_base + s_warp_open[warp] + incl - opens;
      for (int q = 0; q < n; ++q) {
        blocks += pbefore[q] % A == 0;
        if (blocks * A <= M) {  // admitted: the rows used only grow, so a prefix is admitted
          atomicAdd(&s_admitted[pslot[q]], 1);
          trow[pk[q]] = pbefore[q];
        }
      }
    }
    pairs += n;
    __syncthreads();
    if (tid == 0) s_open_base += s_round_open;
  }
  if (pairs) atomicAdd(&s_pairs, pairs);
  if (invalid) atomicAdd(&s_invalid, invalid);
  __syncthreads();
  // Group sizes (rounded up to A) and offsets: warp 0, each lane a run of slots.
  if (warp == 0) {
    const int per = (El + 31) / 32, lo = min(El, lane * per), hi = min(El, lo + per);
    int sum = 0;
    for (int j = lo; j < hi; ++j) sum += (s_admitted[j] + A - 1) / A * A;
    int incl = sum;
    for (int o = 1; o < 32; o <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += v;
    }
    int off = incl - sum;
    int32_t* counts = GroupCounts(ws);
    int32_t* offsets = GroupOffsets(ws);
    for (int j = lo; j < hi; ++j) {
      const int size = (s_admitted[j] + A - 1) / A * A;
      counts[j] = s_admitted[j];
      offsets[j] = off;
      a.group_sizes[j] = size;
      off += size;
    }
    if (lane == 31) {
      offsets[El] = incl;
      int admitted = 0;
      for (int j = 0; j < El; ++j) admitted += s_admitted[j];
      a.meta[0] = s_pairs - admitted;
      a.meta[1] = s_invalid;
    }
  }
}

// ---- gather --------------------------------------------------------------------------------

// One warp copies `src` (bytes) to rows `rows[0..n)` of `out`: one read, n writes.
__device__ __forceinline__ void CopyRowToRows(char* out, int bytes, const int* rows, int n,
                                              const char* src, int lane) {
  if ((bytes & 15) == 0 && Aligned(out, 16) && Aligned(src, 16)) {
    const int nv = bytes >> 4;
    const int4* s = reinterpret_cast<const int4*>(src);
    int i = lane;
    for (; i + 96 < nv; i += 128) {  // four 16-byte loads in flight per lane
      const int4 v0 = __ldcg(s + i), v1 = __ldcg(s + i + 32), v2 = __ldcg(s + i + 64),
                 v3 = __ldcg(s + i + 96);
      for (int d = 0; d < n; ++d) {
        int4* o = reinterpret_cast<int4*>(out + static_cast<size_t>(rows[d]) * bytes);
        o[i] = v0;
        o[i + 32] = v1;
        o[i + 64] = v2;
        o[i + 96] = v3;
      }
    }
    for (; i < nv; i += 32) {
      const int4 v = __ldcg(s + i);
      for (int d = 0; d < n; ++d) {
        reinterpret_cast<int4*>(out + static_cast<size_t>(rows[d]) * bytes)[i] = v;
      }
    }
  } else {
    for (int i = lane; i < bytes; i += 32) {
      const char c = src[i];
      for (int d = 0; d < n; ++d) out[static_cast<size_t>(rows[d]) * bytes + i] = c;
    }
  }
}

__global__ void __launch_bounds__(kCopyThreads, 1) GroupedGatherKernel(GroupedDispatchArgs a) {
  Workspace* ws = a.ws;
  const int R = ws->num_ranks, me = ws->rank, max_tokens = ws->max_tokens;
  const int T = a.num_tokens, K = a.num_topk, El = a.num_local_experts, M = a.rows;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __shared__ const char* s_src[kMaxRanks][kMaxPublished];
  __shared__ int s_off[kMaxGroupedExperts + 1];
  __shared__ int s_cnt[kMaxGroupedExperts];
  __shared__ int s_rows[kCopyWarps][kMaxTopkIntranode];
  if (threadIdx.x < R * kMaxPublished) {
    const int s = threadIdx.x / kMaxPublished, i = threadIdx.x % kMaxPublished;
    s_src[s][i] = PeerInput(ws, a.stage_layout, s, i);
  }
  for (int j = threadIdx.x; j <= El; j += kCopyThreads) s_off[j] = GroupOffsets(ws)[j];
  for (int j = threadIdx.x; j < El; j += kCopyThreads) s_cnt[j] = GroupCounts(ws)[j];
  __syncthreads();

  int32_t* table = RowTable(ws);
  const unsigned lt = LaneMaskLt();
  const int N = R * T;
  const int stride = gridDim.x * kCopyWarps;
  // Start at source me+1's tokens, so that receivers pull from different sources at a time.
  const int start = ((me + 1) % R) * T;
  for (int i0 = blockIdx.x * kCopyWarps + warp; i0 < N; i0 += stride) {
    const int i = (i0 + start) % N;
    const int s = i / T, t = i - s * T;
    int32_t* trow = table + (static_cast<size_t>(s) * max_tokens + t) * K;
    const int before = lane < K ? trow[lane] : -1;
    const unsigned mask = __ballot_sync(0xffffffffu, before >= 0);
    if (!mask) continue;
    int e = -1;
    float w = 0.f;
    if (lane < K) {
      const size_t o = static_cast<size_t>(t) * K + lane;
      e = __ldcg(reinterpret_cast<const int32_t*>(s_src[s][2]) + o);
      w = __ldcg(reinterpret_cast<const float*>(s_src[s][3]) + o);
    }
    float wsum = 0.f;  // a row's weight: every entry of the token listing its expert
    for (int j = 0; j < K; ++j) {
      const int ej = __shfl_sync(0xffffffffu, e, j);
      const float wj = __shfl_sync(0xffffffffu, w, j);
      if (ej == e) wsum += wj;
    }
    if (before >= 0) {
      const int row = s_off[a.expert_slot[e]] + before;
      a.src_index[row] = i;
      a.weights[row] = wsum;
      trow[lane] = row;
      s_rows[warp][__popc(mask & lt)] = row;
    }
    __syncwarp();
    const int n = __popc(mask);
    CopyRowToRows(static_cast<char*>(a.out_x), a.x_row_bytes, s_rows[warp], n,
                  s_src[s][0] + static_cast<size_t>(t) * a.x_row_bytes, lane);
    if (a.out_scales) {
      CopyRowToRows(static_cast<char*>(a.out_scales), a.s_row_bytes, s_rows[warp], n,
                    s_src[s][1] + static_cast<size_t>(t) * a.s_row_bytes, lane);
    }
    __syncwarp();
  }

  // Padding rows: a group's alignment rows (zeros, always) and the rows after the last group
  // (zeros with zero_padding); src_index -1 and weight 0 on both.
  const int total = s_off[El];
  for (int r0 = (blockIdx.x * kCopyWarps + warp) * 32; r0 < M; r0 += stride * 32) {
    const int row = r0 + lane;
    bool zero = false;
    if (row < M) {
      bool pad = row >= total;
      if (pad) {
        zero = a.zero_padding;
      } else {
        int lo = 0, hi = El - 1;  // the last group starting at or before `row`
        while (lo < hi) {
          const int mid = (lo + hi + 1) >> 1;
          if (s_off[mid] <= row) lo = mid; else hi = mid - 1;
        }
        pad = zero = row - s_off[lo] >= s_cnt[lo];
      }
      if (pad) {
        a.src_index[row] = -1;
        a.weights[row] = 0.f;
      }
    }
    for (unsigned zm = __ballot_sync(0xffffffffu, zero); zm; zm &= zm - 1) {
      const size_t r = static_cast<size_t>(r0 + __ffs(zm) - 1);
      ZeroRow(static_cast<char*>(a.out_x) + r * a.x_row_bytes, a.x_row_bytes, lane);
      if (a.out_scales) {
        ZeroRow(static_cast<char*>(a.out_scales) + r * a.s_row_bytes, a.s_row_bytes, lane);
      }
    }
  }
}

// After the end barrier: each local entry's row at its destination, from that row table.
__global__ void GroupedDestRowKernel(GroupedDispatchArgs a) {
  const Workspace* ws = a.ws;
  const int R = ws->num_ranks, me = ws->rank, max_tokens = ws->max_tokens, K = a.num_topk;
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= a.num_tokens * K) return;
  const int e = a.topk_idx[i];
  int row = -1, rank = -1;
  if (e >= 0 && e < a.num_experts) {
    const int r = a.expert_rank[e];
    if (r >= 0 && r < R) {
      const int t = i / K, k = i - t * K;
      row = __ldcg(PeerRowTable(ws->peers[r], R, max_tokens) +
                   (static_cast<size_t>(me) * max_tokens + t) * K + k);
      rank = row >= 0 ? r : -1;
    }
  }
  a.dest_row[i] = row;
  a.dest_rank[i] = rank;
}

// ---- combine -------------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ void AccumulateScaled(float* acc, const int4& v, float w);
template <>
__device__ __forceinline__ void AccumulateScaled<__nv_bfloat16>(float* acc, const int4& v,
                                                                float w) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    acc[2 * i] += w * f.x;
    acc[2 * i + 1] += w * f.y;
  }
}
template <>
__device__ __forceinline__ void AccumulateScaled<float>(float* acc, const int4& v, float w) {
  const float* f = reinterpret_cast<const float*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) acc[i] += w * f[i];
}

// Stores n = 16 / sizeof(Tin) accumulated floats as Tout at element `i * n` of dst.
template <typename Tin, typename Tout>
__device__ __forceinline__ void StoreVector(Tout* dst, int i, const float* acc) {
  constexpr int n = 16 / sizeof(Tin);
  if constexpr (sizeof(Tin) == sizeof(Tout)) {
    reinterpret_cast<int4*>(dst)[i] = Pack(acc, Tout());
  } else if constexpr (sizeof(Tout) == 4) {  // bfloat16 rows into float32 partials: 32 bytes
    float4* d = reinterpret_cast<float4*>(dst) + 2 * i;
    d[0] = make_float4(acc[0], acc[1], acc[2], acc[3]);
    d[1] = make_float4(acc[4], acc[5], acc[6], acc[7]);
  } else {  // float32 partials to bfloat16: 8 bytes
    static_assert(n == 4, "float32 in, bfloat16 out");
    uint2 v;
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&v);
    h[0] = __floats2bfloat162_rn(acc[0], acc[1]);
    h[1] = __floats2bfloat162_rn(acc[2], acc[3]);
    reinterpret_cast<uint2*>(dst)[i] = v;
  }
}

// One warp: dst = sum_d w[d] * src[d] over `elems` elements, float32 accumulation in d order.
template <typename Tin, typename Tout>
__device__ __forceinline__ void WeightedSum(Tout* dst, const Tin* const* src, const float* w,
                                            int n, int elems, int lane) {
  constexpr int kPer = 16 / sizeof(Tin);
  // Stores are 16 bytes, 8 (float32 in, bfloat16 out) or two of 16 (bfloat16 in, float32 out).
  constexpr int kStoreAlign = kPer * sizeof(Tout) < 16 ? 8 : 16;
  bool vec = elems % kPer == 0 && Aligned(dst, kStoreAlign);
  for (int d = 0; d < n; ++d) vec = vec && Aligned(src[d], 16);
  if (vec) {
    const int nv = elems / kPer;
    for (int i = lane; i < nv; i += 32) {
      float acc[kPer] = {};
      for (int d = 0; d < n; d += 8) {  // up to eight rows' loads in flight (n <= K <= 32)
        int4 v[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          v[j] = d + j < n ? __ldcg(reinterpret_cast<const int4*>(src[d + j]) + i)
                           : make_int4(0, 0, 0, 0);
        }
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          if (d + j < n) AccumulateScaled<Tin>(acc, v[j], w[d + j]);
        }
      }
      StoreVector<Tin, Tout>(dst, i, acc);
    }
  } else {
    for (int i = lane; i < elems; i += 32) {
      float acc = 0.f;
      for (int d = 0; d < n; ++d) acc += w[d] * static_cast<float>(src[d][i]);
      dst[i] = static_cast<Tout>(acc);
    }
  }
}

// One process: out[t] = sum over t's entries of w * y_rank[row], pulled from every rank.
template <typename T>
__global__ void __launch_bounds__(kCopyThreads, 1) GroupedCombineKernel(GroupedCombineArgs a) {
  Workspace* ws = a.ws;
  const int R = ws->num_ranks, K = a.num_topk;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __shared__ const T* s_y[kMaxRanks];
  __shared__ const float* s_w[kMaxRanks];
  __shared__ const T* s_rows[kCopyWarps][kMaxTopkIntranode];
  __shared__ float s_wt[kCopyWarps][kMaxTopkIntranode];
  if (threadIdx.x < R) {
    s_y[threadIdx.x] = static_cast<const T*>(LoadPublished(ws->peers[threadIdx.x], 0));
    s_w[threadIdx.x] = static_cast<const float*>(LoadPublished(ws->peers[threadIdx.x], 1));
  }
  __syncthreads();
  const unsigned lt = LaneMaskLt();
  const int stride = gridDim.x * kCopyWarps;
  for (int t = blockIdx.x * kCopyWarps + warp; t < a.num_tokens; t += stride) {
    int row = -1, r = -1;
    if (lane < K) {
      row = a.dest_row[static_cast<size_t>(t) * K + lane];
      r = a.dest_rank[static_cast<size_t>(t) * K + lane];
    }
    const bool has = row >= 0 && row < a.rows && r >= 0 && r < R;  // a foreign handle stays in bounds
    const unsigned mask = __ballot_sync(0xffffffffu, has);
    if (has) {
      const int q = __popc(mask & lt);
      s_rows[warp][q] = s_y[r] + static_cast<size_t>(row) * a.row_elems;
      s_wt[warp][q] = a.weighted ? __ldcg(s_w[r] + row) : 1.f;
    }
    __syncwarp();
    WeightedSum<T, T>(static_cast<T*>(a.out) + static_cast<size_t>(t) * a.row_elems,
                      s_rows[warp], s_wt[warp], __popc(mask), a.row_elems, lane);
    __syncwarp();
  }
}

// One process per GPU, step 1 on the expert rank: partial[s][t] = sum over the rows here of
// source s's token t of w * y[row] (float32), in this rank's stage.
template <typename T>
__global__ void __launch_bounds__(kCopyThreads, 1) GroupedPartialKernel(GroupedCombineArgs a) {
  Workspace* ws = a.ws;
  const int R = ws->num_ranks, me = ws->rank, K = a.num_topk, T_ = a.num_tokens;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __shared__ const int32_t* s_drow[kMaxRanks];
  __shared__ const int32_t* s_drank[kMaxRanks];
  __shared__ const T* s_rows[kCopyWarps][kMaxTopkIntranode];
  __shared__ float s_wt[kCopyWarps][kMaxTopkIntranode];
  if (threadIdx.x < R) {
    s_drow[threadIdx.x] = reinterpret_cast<const int32_t*>(ws->stage[threadIdx.x] + a.stage_layout.off[0]);
    s_drank[threadIdx.x] = reinterpret_cast<const int32_t*>(ws->stage[threadIdx.x] + a.stage_layout.off[1]);
  }
  __syncthreads();
  float* partial = reinterpret_cast<float*>(a.stage + a.stage_layout.off[2]);
  const T* y = static_cast<const T*>(a.y);
  const unsigned lt = LaneMaskLt();
  const int stride = gridDim.x * kCopyWarps;
  for (int i = blockIdx.x * kCopyWarps + warp; i < R * T_; i += stride) {
    const int s = i / T_, t = i - s * T_;
    int row = -1, r = -1;
    if (lane < K) {
      row = __ldcg(s_drow[s] + static_cast<size_t>(t) * K + lane);
      r = __ldcg(s_drank[s] + static_cast<size_t>(t) * K + lane);
    }
    const bool has = row >= 0 && row < a.rows && r == me;
    const unsigned mask = __ballot_sync(0xffffffffu, has);
    if (!mask) continue;
    if (has) {
      const int q = __popc(mask & lt);
      s_rows[warp][q] = y + static_cast<size_t>(row) * a.row_elems;
      s_wt[warp][q] = a.weighted ? a.weights[row] : 1.f;
    }
    __syncwarp();
    WeightedSum<T, float>(partial + static_cast<size_t>(i) * a.row_elems, s_rows[warp],
                          s_wt[warp], __popc(mask), a.row_elems, lane);
    __syncwarp();
  }
}

// Step 2 on the token's rank: out[t] = sum over the ranks holding t's rows of their partials.
template <typename T>
__global__ void __launch_bounds__(kCopyThreads, 1) GroupedFinishKernel(GroupedCombineArgs a) {
  Workspace* ws = a.ws;
  const int R = ws->num_ranks, me = ws->rank, K = a.num_topk, T_ = a.num_tokens;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __shared__ const float* s_part[kMaxRanks];
  __shared__ const float* s_rows[kCopyWarps][kMaxRanks];
  __shared__ float s_one[kMaxRanks];
  if (threadIdx.x < R) {
    s_part[threadIdx.x] = reinterpret_cast<const float*>(ws->stage[threadIdx.x] + a.stage_layout.off[2]);
    s_one[threadIdx.x] = 1.f;
  }
  __syncthreads();
  const int stride = gridDim.x * kCopyWarps;
  for (int t = blockIdx.x * kCopyWarps + warp; t < T_; t += stride) {
    int row = -1, r = -1;
    if (lane < K) {
      row = a.dest_row[static_cast<size_t>(t) * K + lane];
      r = a.dest_rank[static_cast<size_t>(t) * K + lane];
    }
    int n = 0;
    for (int p = 0; p < R; ++p) {  // ranks in order, as the pure-JAX backend adds partials
      if (__ballot_sync(0xffffffffu, row >= 0 && r == p)) {
        if (lane == 0) {
          s_rows[warp][n] = s_part[p] + (static_cast<size_t>(me) * T_ + t) * a.row_elems;
        }
        ++n;
      }
    }
    __syncwarp();
    WeightedSum<float, T>(static_cast<T*>(a.out) + static_cast<size_t>(t) * a.row_elems,
                          s_rows[warp], s_one, n, a.row_elems, lane);
    __syncwarp();
  }
}

// ---- weight gradient: out[t, k] = vals_rank[row] -------------------------------------------

__global__ void GroupedEntriesKernel(GroupedEntriesArgs a) {
  const Workspace* ws = a.ws;
  __shared__ const float* s_vals[kMaxRanks];
  if (threadIdx.x < ws->num_ranks) {
    s_vals[threadIdx.x] = ws->stage[threadIdx.x]
                              ? reinterpret_cast<const float*>(ws->stage[threadIdx.x])
                              : static_cast<const float*>(LoadPublished(ws->peers[threadIdx.x], 0));
  }
  __syncthreads();
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= a.num_tokens * a.num_topk) return;
  const int row = a.dest_row[i], r = a.dest_rank[i];
  a.out[i] = row >= 0 && row < a.rows && r >= 0 && r < ws->num_ranks ? __ldcg(s_vals[r] + row)
                                                                      : 0.f;
}

size_t LayoutSharedLimit() {
  int device = 0, optin = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) !=
          cudaSuccess) {
    return 48 * 1024;
  }
  const size_t most = GroupedLayoutSharedBytes(kMaxExpertsIntranode, kMaxGroupedExperts);
  return std::min(most, static_cast<size_t>(optin) - kLayoutStaticShared);
}

}  // namespace

size_t GroupedLayoutSharedBytes(int num_experts, int num_local_experts) {
  return sizeof(int32_t) * (static_cast<size_t>(num_experts) +
                            2 * static_cast<size_t>(kLayoutWarps) * num_local_experts);
}

StageLayout GroupedCombineStageLayout(int64_t num_ranks, int64_t tokens, int64_t num_topk,
                                      int64_t row_elems) {
  auto up = [](int64_t n) { return (n + 255) & ~int64_t{255}; };
  StageLayout l{};
  l.off[0] = 0;
  l.off[1] = up(tokens * num_topk * 4);
  l.off[2] = l.off[1] + up(tokens * num_topk * 4);
  l.bytes = l.off[2] + num_ranks * tokens * row_elems * 4;
  return l;
}

cudaError_t LaunchDispatchGrouped(const GroupedDispatchArgs& a, cudaStream_t stream) {
  const int64_t T = a.num_tokens, K = a.num_topk;
  if (a.stage) {
    const void* srcs[] = {a.x, a.scales, a.topk_idx, a.topk_weights};
    const int64_t bytes[] = {T * a.x_row_bytes, T * a.s_row_bytes, T * K * 4, T * K * 4};
    LaunchStage(a.stage, a.stage_layout, srcs, bytes, 4, stream);
  }
  const Published p{{a.x, a.scales, a.topk_idx, a.topk_weights}};
  PublishAllKernel<<<1, 32, 0, stream>>>(a.ws, p, kGroupedStart, a.timeout_ns);
  GroupedLayoutKernel<<<1, kLayoutThreads,
                        GroupedLayoutSharedBytes(a.num_experts, a.num_local_experts), stream>>>(a);
  GroupedGatherKernel<<<NumBlocks(a.num_sms), kCopyThreads, 0, stream>>>(a);
  BarrierKernel<<<1, 32, 0, stream>>>(a.ws, kGroupedEnd, a.timeout_ns);
  if (T * K > 0) {
    const int blocks = static_cast<int>((T * K + kEntryThreads - 1) / kEntryThreads);
    GroupedDestRowKernel<<<blocks, kEntryThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

cudaError_t LaunchCombineGrouped(const GroupedCombineArgs& a, cudaStream_t stream) {
  const int blocks = NumBlocks(a.num_sms);
  const bool bf16 = a.elem_bytes == 2;
  if (!a.stage) {
    const Published p{{a.y, a.weights, nullptr, nullptr}};
    PublishAllKernel<<<1, 32, 0, stream>>>(a.ws, p, kGroupedCombineStart, a.timeout_ns);
    if (bf16) {
      GroupedCombineKernel<__nv_bfloat16><<<blocks, kCopyThreads, 0, stream>>>(a);
    } else {
      GroupedCombineKernel<float><<<blocks, kCopyThreads, 0, stream>>>(a);
    }
  } else {
    const int64_t entries = static_cast<int64_t>(a.num_tokens) * a.num_topk * 4;
    const void* srcs[] = {a.dest_row, a.dest_rank};
    const int64_t bytes[] = {entries, entries};
    LaunchStage(a.stage, a.stage_layout, srcs, bytes, 2, stream);
    PublishAllKernel<<<1, 32, 0, stream>>>(a.ws, Published{}, kGroupedCombineStart,
                                           a.timeout_ns);
    if (bf16) {
      GroupedPartialKernel<__nv_bfloat16><<<blocks, kCopyThreads, 0, stream>>>(a);
    } else {
      GroupedPartialKernel<float><<<blocks, kCopyThreads, 0, stream>>>(a);
    }
    BarrierKernel<<<1, 32, 0, stream>>>(a.ws, kGroupedCombinePartials, a.timeout_ns);
    if (bf16) {
      GroupedFinishKernel<__nv_bfloat16><<<blocks, kCopyThreads, 0, stream>>>(a);
    } else {
      GroupedFinishKernel<float><<<blocks, kCopyThreads, 0, stream>>>(a);
    }
  }
  BarrierKernel<<<1, 32, 0, stream>>>(a.ws, kGroupedCombineEnd, a.timeout_ns);
  return cudaGetLastError();
}

cudaError_t LaunchGroupedEntries(const GroupedEntriesArgs& a, cudaStream_t stream) {
  if (a.stage) {
    const void* srcs[] = {a.vals};
    const int64_t bytes[] = {static_cast<int64_t>(a.rows) * 4};
    StageLayout layout{};
    layout.bytes = bytes[0];
    LaunchStage(a.stage, layout, srcs, bytes, 1, stream);
  }
  const Published p{{a.vals, nullptr, nullptr, nullptr}};
  PublishAllKernel<<<1, 32, 0, stream>>>(a.ws, p, kGroupedEntriesStart, a.timeout_ns);
  const int64_t n = static_cast<int64_t>(a.num_tokens) * a.num_topk;
  if (n > 0) {
    GroupedEntriesKernel<<<static_cast<int>((n + kEntryThreads - 1) / kEntryThreads),
                           kEntryThreads, 0, stream>>>(a);
  }
  BarrierKernel<<<1, 32, 0, stream>>>(a.ws, kGroupedEntriesEnd, a.timeout_ns);
  return cudaGetLastError();
}

cudaError_t LoadGroupedModule() {
  cudaFuncAttributes attr;
  const void* kernels[] = {
      reinterpret_cast<const void*>(&PublishAllKernel),
      reinterpret_cast<const void*>(&BarrierKernel),
      reinterpret_cast<const void*>(&StageKernel),
      reinterpret_cast<const void*>(&GroupedLayoutKernel),
      reinterpret_cast<const void*>(&GroupedGatherKernel),
      reinterpret_cast<const void*>(&GroupedDestRowKernel),
      reinterpret_cast<const void*>(&GroupedCombineKernel<__nv_bfloat16>),
      reinterpret_cast<const void*>(&GroupedCombineKernel<float>),
      reinterpret_cast<const void*>(&GroupedPartialKernel<__nv_bfloat16>),
      reinterpret_cast<const void*>(&GroupedPartialKernel<float>),
      reinterpret_cast<const void*>(&GroupedFinishKernel<__nv_bfloat16>),
      reinterpret_cast<const void*>(&GroupedFinishKernel<float>),
      reinterpret_cast<const void*>(&GroupedEntriesKernel),
  };
  for (const void* k : kernels) {
    if (cudaError_t e = cudaFuncGetAttributes(&attr, k); e != cudaSuccess) return e;
  }
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(&GroupedLayoutKernel),
                              cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(LayoutSharedLimit()));
}

size_t GroupedLayoutSharedLimit() { return LayoutSharedLimit(); }
}  // namespace jaxep
