// Intranode normal-mode dispatch / combine kernels (see intranode.h for the design).
//
// One call = three launches on the caller's stream:
//   dispatch:      Prepare (1 block: positions, counts, publish, barrier, routing)
//                  -> Gather (num_sms blocks: pull rows from peers) -> Barrier (end)
//   combine:       Publish (publish y, barrier) -> Reduce (num_sms blocks) -> Barrier (end)
//   dispatch_rows: Publish -> GatherRows -> Barrier
// Remote data is read with ld.global.cg (L2, never a stale L1 line), barrier flags with
// acquire/release at system scope; waits are bounded by %globaltimer.
#include "intranode.h"

#include <algorithm>

#include <cuda_bf16.h>

#include "device_guard.h"
#include "grouped.h"
#include "intranode_common.cuh"

namespace jaxep {
namespace {

constexpr int kPrepThreads = 1024;
// Combine's default SM count: pulling with more SMs only adds NVLink contention
// (benchmarks/RESULTS.md).
constexpr int kCombineDefaultBlocks = 32;

// ---- dispatch ----------------------------------------------------------------------------

// part 0: all of it; across nodes part 1 (positions and counts) and part 2 (from the barrier
// on) run as two launches, with the puts into the relays between them.
__global__ void __launch_bounds__(kPrepThreads, 1) DispatchPrepareKernel(DispatchArgs a,
                                                                         int part) {
  Workspace* ws = a.ws;
  const int num_ranks = ws->num_ranks, me = ws->rank, max_tokens = ws->max_tokens;
  const int T = a.num_tokens, K = a.num_topk, E = a.num_experts, C = a.capacity;
  const int tid = static_cast<int>(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  int32_t* pos = PosTable(ws);

  __shared__ int s_warp[kPrepThreads / 32][kMaxRanks];
  __shared__ int s_running[kMaxRanks];
  __shared__ int s_invalid;
  __shared__ int s_cnt[kMaxRanks][kMaxRanks];
  __shared__ int s_off_in[kMaxRanks + 1];
  __shared__ int s_off_out[kMaxRanks];

  extern __shared__ int32_t s_rank_of[];  // [E]: expert -> rank, no dependent global loads
  for (int e = tid; e < E; e += kPrepThreads) s_rank_of[e] = a.expert_rank[e];
  if (tid < kMaxRanks) s_running[tid] = 0;
  if (tid == 0) s_invalid = 0;
  __syncthreads();

  if (part != 2) {
  // 1. Local positions: pos[r][t] = index of token t among my tokens sent to rank r.
  constexpr int kIds = 8;  // a token's ids are loaded together, not one round trip each
  int invalid = 0;
  for (int t0 = 0; t0 < T; t0 += kPrepThreads) {
    const int t = t0 + tid;
    unsigned mask = 0;
    if (t < T) {
      const int32_t* row = a.topk_idx + static_cast<size_t>(t) * K;
      for (int k0 = 0; k0 < K; k0 += kIds) {
        int ids[kIds];
#pragma unroll
        for (int i = 0; i < kIds; ++i) ids[i] = k0 + i < K ? row[k0 + i] : -1;
#pragma unroll
        for (int i = 0; i < kIds; ++i) {
          const int e = ids[i];
          if (e < -1 || e >= E) {
            ++invalid;
          } else if (e >= 0) {
            const int r = s_rank_of[e];
            if (static_cast<unsigned>(r) < static_cast<unsigned>(num_ranks)) mask |= 1u << r;
          }
        }
      }
    }
    unsigned votes[kMaxRanks];
#pragma unroll
    for (int r = 0; r < kMaxRanks; ++r) votes[r] = __ballot_sync(0xffffffffu, (mask >> r) & 1u);
    if (lane == 0) {
#pragma unroll
      for (int r = 0; r < kMaxRanks; ++r) s_warp[warp][r] = __popc(votes[r]);
    }
    __syncthreads();
    if (tid < num_ranks) {  // exclusive prefix over warps, carried across rounds
      int acc = s_running[tid];
      for (int w = 0; w < kPrepThreads / 32; ++w) {
        const int c = s_warp[w][tid];
        s_warp[w][tid] = acc;
        acc += c;
      }
      s_running[tid] = acc;
    }
    __syncthreads();
    if (t < T) {
      const unsigned below = (1u << lane) - 1u;
#pragma unroll
      for (int r = 0; r < kMaxRanks; ++r) {
        if (r < num_ranks) {
          pos[r * max_tokens + t] =
              (mask >> r) & 1u ? s_warp[warp][r] + __popc(votes[r] & below) : -1;
        }
      }
    }
    __syncthreads();
  }
  if (invalid) atomicAdd(&s_invalid, invalid);
  __syncthreads();
  if (tid < num_ranks) ws->counts[tid] = s_running[tid];
  if (tid == 0) {
    ws->published[0] = a.x;
    ws->published[1] = a.scales;
    ws->published[2] = a.topk_idx;
    ws->published[3] = a.topk_weights;
    a.meta[2] = s_invalid;
  }
  }
  if (part == 1) return;

  // 2. Every rank's positions and counts are ready.
  BlockBarrier(ws, kDispatchStart, a.timeout_ns);

  // 3. Routing on the receiver: rows from source s start at sum_{s' < s} count[s' -> me].
  if (tid < num_ranks * num_ranks) {
    const int s = tid / num_ranks, j = tid - s * num_ranks;
    s_cnt[s][j] = __ldcg(SourceCounts(ws, s) + j);
  }
  __syncthreads();
  if (tid == 0) {
    int acc = 0;
    for (int s = 0; s < num_ranks; ++s) {
      s_off_in[s] = acc;
      acc += s_cnt[s][me];
    }
    s_off_in[num_ranks] = acc;
    const int kept = min(acc, C);
    a.meta[0] = kept;
    a.meta[1] = acc - kept;
  }
  if (tid < num_ranks) {
    int acc = 0;
    for (int s = 0; s < me; ++s) acc += s_cnt[s][tid];
    s_off_out[tid] = acc;
  }
  for (int c = tid; c < C; c += kPrepThreads) a.src_index[c] = -1;
  for (int e = tid; e < a.num_local_experts; e += kPrepThreads) a.tokens_per_expert[e] = 0;
  __syncthreads();
  // Each thread loads a batch of peers' positions before storing any: the remote loads are in
  // flight together instead of one round trip each.
  constexpr int kBatch = 8;
  const int total = num_ranks * T;
  for (int base = 0; base < total; base += kPrepThreads * kBatch) {
    int p[kBatch];
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      const int i = base + b * kPrepThreads + tid;  // i = s * T + t
      const int s = i / T;
      p[b] = i < total ? __ldcg(SourcePos(ws, s) + static_cast<size_t>(me) * max_tokens +
                                (i - s * T))
                       : -1;
    }
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      const int i = base + b * kPrepThreads + tid;
      if (p[b] >= 0) {
        const int row = s_off_in[i / T] + p[b];
        if (row < C) a.src_index[row] = i;
      }
    }
  }
  for (int j = 0; j < num_ranks; ++j) {
    const int32_t* mine = pos + static_cast<size_t>(j) * max_tokens;
    for (int t = tid; t < T; t += kPrepThreads) {
      const int q = mine[t];
      const int row = s_off_out[j] + q;
      a.send_slot[static_cast<size_t>(t) * num_ranks + j] = (q >= 0 && row < C) ? row : -1;
    }
  }
}

__global__ void __launch_bounds__(kCopyThreads, 1) DispatchGatherKernel(DispatchArgs a) {
  Workspace* ws = a.ws;
  const int me = ws->rank, T = a.num_tokens, K = a.num_topk, E = a.num_experts;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int num_ranks = ws->num_ranks;
  __shared__ const char* s_src[kMaxRanks][kMaxPublished];
  __shared__ int s_incoming[kMaxRanks];
  if (threadIdx.x < num_ranks * kMaxPublished) {
    const int s = threadIdx.x / kMaxPublished, i = threadIdx.x % kMaxPublished;
    s_src[s][i] = PeerInput(ws, a.stage_layout, s, i);
  }
  if (threadIdx.x < num_ranks) s_incoming[threadIdx.x] = __ldcg(SourceCounts(ws, threadIdx.x) + me);
  __syncthreads();
  // Rows are grouped by source rank. Start at the rows of source me+1 (wrapping), so that at
  // any moment the receivers pull from different sources instead of all from source 0.
  int kept = 0, start = 0;
  for (int s = 0; s < num_ranks; ++s) {
    if (s == (me + 1) % num_ranks) start = kept;
    kept += s_incoming[s];
  }
  kept = min(kept, a.capacity);
  const int stride = gridDim.x * kCopyWarps;
  for (int i = blockIdx.x * kCopyWarps + warp; i < a.capacity; i += stride) {
    const int c = i < kept ? (i + start) % kept : i;
    const int si = a.src_index[c];
    char* dx = static_cast<char*>(a.recv_x) + static_cast<size_t>(c) * a.x_row_bytes;
    char* ds = a.recv_scales
                   ? static_cast<char*>(a.recv_scales) + static_cast<size_t>(c) * a.s_row_bytes
                   : nullptr;
    int slot = -1;
    float w = 0.f;
    if (si < 0) {
      ZeroRow(dx, a.x_row_bytes, lane);
      if (ds) ZeroRow(ds, a.s_row_bytes, lane);
    } else {
      const int s = si / T, t = si - s * T;
      int e = -1;
      if (lane < K) {  // issued before the row copy, so the round trip overlaps it
        const size_t o = static_cast<size_t>(t) * K + lane;
        e = __ldcg(reinterpret_cast<const int*>(s_src[s][2]) + o);
        w = __ldcg(reinterpret_cast<const float*>(s_src[s][3]) + o);
      }
      CopyRow(dx, s_src[s][0] + static_cast<size_t>(t) * a.x_row_bytes, a.x_row_bytes, lane);
      if (ds) {
        CopyRow(ds, s_src[s][1] + static_cast<size_t>(t) * a.s_row_bytes, a.s_row_bytes, lane);
      }
      if (e >= 0 && e < E && a.expert_rank[e] == me) {
        slot = a.expert_slot[e];
      } else {
        w = 0.f;
      }
    }
    if (lane < K) {
      a.recv_topk[static_cast<size_t>(c) * K + lane] = slot;
      a.recv_weights[static_cast<size_t>(c) * K + lane] = w;
    }
    // A row counts once per local expert, however often its top-k lists it.
    const unsigned same = __match_any_sync(0xffffffffu, slot);
    if (slot >= 0 && lane == __ffs(same) - 1) atomicAdd(&a.tokens_per_expert[slot], 1);
  }
}

// ---- dispatch of rows along a handle --------------------------------------------------------

__global__ void __launch_bounds__(kCopyThreads, 1) GatherRowsKernel(DispatchRowsArgs a) {
  Workspace* ws = a.ws;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __shared__ const char* s_src[kMaxRanks];
  if (threadIdx.x < ws->num_ranks) s_src[threadIdx.x] = PeerInput(ws, a.stage_layout, threadIdx.x, 0);
  __syncthreads();
  // Rows are grouped by source rank: start near source me+1's rows (see DispatchGatherKernel).
  const int start = static_cast<int>(static_cast<long long>(a.capacity) *
                                     ((ws->rank + 1) % ws->num_ranks) / ws->num_ranks);
  const int stride = gridDim.x * kCopyWarps;
  for (int i = blockIdx.x * kCopyWarps + warp; i < a.capacity; i += stride) {
    const int c = (i + start) % a.capacity;
    const int si = a.src_index[c];
    char* d = static_cast<char*>(a.out) + static_cast<size_t>(c) * a.row_bytes;
    if (si < 0) {
      ZeroRow(d, a.row_bytes, lane);
    } else {
      const int s = si / a.num_tokens, t = si - s * a.num_tokens;
      CopyRow(d, s_src[s] + static_cast<size_t>(t) * a.row_bytes, a.row_bytes, lane);
    }
  }
}

// ---- combine -------------------------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kCopyThreads, 1) CombineReduceKernel(CombineArgs a) {
  constexpr int kPer = 16 / sizeof(T);  // elements per 16-byte vector
  Workspace* ws = a.ws;
  const int num_ranks = ws->num_ranks;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  // Across nodes the rows held by another node's ranks arrive as that node's float32 partial
  // sum (CombineForwardKernel), in the relay slot of the node, at row t.
  __shared__ const T* s_y[kMaxRanks];
  __shared__ const float* s_partial[kMaxRanks];  // by node
  const uint32_t remote = ws->relay.remote;
  const int per_node = ws->relay.ranks_per_node;
  if (threadIdx.x < num_ranks) {
    const int j = threadIdx.x;
    s_y[j] = Remote(ws, j) ? nullptr
                                : reinterpret_cast<const T*>(PeerInput(ws, a.stage_layout, j, 0));
    if (remote && j < num_ranks / per_node) {
      const NormalRelay& r = ws->relay;
      s_partial[j] = reinterpret_cast<const float*>(r.mine + j * r.slot_bytes + r.partial_off);
    }
  }
  __syncthreads();
  const int row = a.row_elems;
  const bool vec = row % kPer == 0;
  const int stride = gridDim.x * kCopyWarps;
  for (int t = blockIdx.x * kCopyWarps + warp; t < a.num_tokens; t += stride) {
    const int mine = lane < num_ranks ? a.send_slot[static_cast<size_t>(t) * num_ranks + lane] : -1;
    int slots[kMaxRanks];
#pragma unroll
    for (int j = 0; j < kMaxRanks; ++j) slots[j] = __shfl_sync(0xffffffffu, mine, j);
    uint32_t partials = 0;  // bit m: node m (another node) holds rows of t: its partial
    if (remote) {
#pragma unroll
      for (int j = 0; j < kMaxRanks; ++j) {
        if (!((remote >> j) & 1u)) continue;
        if (slots[j] >= 0) partials |= 1u << (j / per_node);
        slots[j] = -1;
      }
    }
    T* dst = static_cast<T*>(a.out) + static_cast<size_t>(t) * row;
    if (vec) {
      const int n = row / kPer;
      const int4* src[kMaxRanks];
#pragma unroll
      for (int j = 0; j < kMaxRanks; ++j) {
        src[j] = (j < num_ranks && slots[j] >= 0)
                     ? reinterpret_cast<const int4*>(s_y[j] + static_cast<size_t>(slots[j]) * row)
                     : nullptr;
      }
      for (int i = lane; i < n; i += 64) {  // two vectors per lane per step: 2R loads in flight
        const bool second = i + 32 < n;
        int4 v[kMaxRanks], w[kMaxRanks];
#pragma unroll
        for (int j = 0; j < kMaxRanks; ++j) {
          v[j] = src[j] ? __ldcg(src[j] + i) : make_int4(0, 0, 0, 0);
          w[j] = src[j] && second ? __ldcg(src[j] + i + 32) : make_int4(0, 0, 0, 0);
        }
        float acc[kPer] = {}, acc2[kPer] = {};
#pragma unroll
        for (int j = 0; j < kMaxRanks; ++j) {
          Accumulate(acc, v[j], T());
          Accumulate(acc2, w[j], T());
        }
        for (uint32_t m = partials; m; m &= m - 1) {
          const float* part = s_partial[__ffs(m) - 1] + static_cast<size_t>(t) * row;
          AccumulateFloats<kPer>(acc, part + static_cast<size_t>(i) * kPer);
          if (second) AccumulateFloats<kPer>(acc2, part + static_cast<size_t>(i + 32) * kPer);
        }
        reinterpret_cast<int4*>(dst)[i] = Pack(acc, T());
        if (second) reinterpret_cast<int4*>(dst)[i + 32] = Pack(acc2, T());
      }
    } else {
      for (int i = lane; i < row; i += 32) {
        float acc = 0.f;
        for (int j = 0; j < num_ranks; ++j) {
          if (slots[j] >= 0) acc += static_cast<float>(s_y[j][static_cast<size_t>(slots[j]) * row + i]);
        }
        for (uint32_t m = partials; m; m &= m - 1) {
          acc += __ldcg(s_partial[__ffs(m) - 1] + static_cast<size_t>(t) * row + i);
        }
        dst[i] = static_cast<T>(acc);
      }
    }
  }
}

}  // namespace

int DeviceSmCount() {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    return 132;
  }
  return sms;
}

size_t WorkspaceBytes(int num_ranks, int max_tokens, int num_topk) {
  const size_t tokens = static_cast<size_t>(num_ranks) * max_tokens;
  return sizeof(Workspace) +
         sizeof(int32_t) * (tokens * (1 + num_topk) + 2 * kMaxGroupedExperts + 1);
}

cudaError_t LaunchDispatch(const DispatchArgs& a, cudaStream_t stream) {
  if (a.stage) {
    const void* srcs[] = {a.x, a.scales, a.topk_idx, a.topk_weights};
    const int64_t T = a.num_tokens, K = a.num_topk;
    const int64_t bytes[] = {T * a.x_row_bytes, T * a.s_row_bytes, T * K * 4, T * K * 4};
    LaunchStage(a.stage, a.stage_layout, srcs, bytes, 4, stream);
  }
  const size_t smem = sizeof(int32_t) * a.num_experts;
  if (a.across_nodes) {  // the puts into the relays need the positions, the barrier the puts
    DispatchPrepareKernel<<<1, kPrepThreads, smem, stream>>>(a, 1);
    if (cudaError_t e = LaunchDispatchRelay(a, stream); e != cudaSuccess) return e;
    DispatchPrepareKernel<<<1, kPrepThreads, smem, stream>>>(a, 2);
  } else {
    DispatchPrepareKernel<<<1, kPrepThreads, smem, stream>>>(a, 0);
  }
  DispatchGatherKernel<<<NumBlocks(a.num_sms), kCopyThreads, 0, stream>>>(a);
  BarrierKernel<<<1, 32, 0, stream>>>(a.ws, kDispatchEnd, a.timeout_ns);
  return cudaGetLastError();
}

cudaError_t LaunchCombine(const CombineArgs& a, cudaStream_t stream) {
  if (a.stage) {
    const void* srcs[] = {a.y};
    const int64_t bytes[] = {a.stage_layout.bytes};
    LaunchStage(a.stage, a.stage_layout, srcs, bytes, 1, stream);
  }
  if (a.across_nodes) {
    if (cudaError_t e = LaunchCombineSlots(a, stream); e != cudaSuccess) return e;
  }
  PublishKernel<<<1, 32, 0, stream>>>(a.ws, a.y, kCombineStart, a.timeout_ns);
  if (a.across_nodes) {  // the partial sums of the other nodes' rows, then the barrier
    if (cudaError_t e = LaunchCombineForward(a, stream); e != cudaSuccess) return e;
    BarrierKernel<<<1, 32, 0, stream>>>(a.ws, kCombineForward, a.timeout_ns);
  }
  const int blocks = a.num_sms > 0 ? a.num_sms : kCombineDefaultBlocks;
  if (a.elem_bytes == 2) {
    CombineReduceKernel<__nv_bfloat16><<<blocks, kCopyThreads, 0, stream>>>(a);
  } else {
    CombineReduceKernel<float><<<blocks, kCopyThreads, 0, stream>>>(a);
  }
  BarrierKernel<<<1, 32, 0, stream>>>(a.ws, kCombineEnd, a.timeout_ns);
  return cudaGetLastError();
}

cudaError_t LaunchDispatchRows(const DispatchRowsArgs& a, cudaStream_t stream) {
  if (a.stage) {
    const void* srcs[] = {a.rows};
    const int64_t bytes[] = {a.stage_layout.bytes};
    LaunchStage(a.stage, a.stage_layout, srcs, bytes, 1, stream);
  }
  if (a.across_nodes) {
    if (cudaError_t e = LaunchRowsRelay(a, stream); e != cudaSuccess) return e;
  }
  PublishKernel<<<1, 32, 0, stream>>>(a.ws, a.rows, kRowsStart, a.timeout_ns);
  GatherRowsKernel<<<NumBlocks(a.num_sms), kCopyThreads, 0, stream>>>(a);
  BarrierKernel<<<1, 32, 0, stream>>>(a.ws, kRowsEnd, a.timeout_ns);
  return cudaGetLastError();
}

// ---- setup ----------------------------------------------------------------------------------

namespace {

cudaError_t LoadModule() {  // touch every kernel so the module is loaded now, not lazily
  cudaFuncAttributes attr;
  const void* kernels[] = {
      reinterpret_cast<const void*>(&BarrierKernel),
      reinterpret_cast<const void*>(&PublishKernel),
      reinterpret_cast<const void*>(&DispatchPrepareKernel),
      reinterpret_cast<const void*>(&DispatchGatherKernel),
      reinterpret_cast<const void*>(&GatherRowsKernel),
      reinterpret_cast<const void*>(&CombineReduceKernel<__nv_bfloat16>),
      reinterpret_cast<const void*>(&CombineReduceKernel<float>),
      reinterpret_cast<const void*>(&StageKernel),
  };
  for (const void* k : kernels) {
    if (cudaError_t e = cudaFuncGetAttributes(&attr, k); e != cudaSuccess) return e;
  }
  if (cudaError_t e = LoadGroupedModule(); e != cudaSuccess) return e;
  return LoadInternodeModule();
}

// The constant header of rank `rank`'s workspace: the peers' workspaces (and, one process per
// GPU, their stages; null in one process) as this rank addresses them, its error record.
Workspace WorkspaceHeader(int rank, int num_ranks, int max_tokens, int num_topk, ErrorRecord* error,
                          Workspace* const* peers, const char* const* stages,
                          const NormalRelay* relay = nullptr) {
  Workspace h{};
  if (relay) h.relay = *relay;
  for (int p = 0; p < num_ranks; ++p) {
    h.peers[p] = peers[p];
    h.stage[p] = stages ? stages[p] : nullptr;
  }
  h.error = error;
  h.rank = rank;
  h.num_ranks = num_ranks;
  h.max_tokens = max_tokens;
  h.num_topk = num_topk;
  return h;
}

}  // namespace

cudaError_t CreateWorkspaces(int num_ranks, const int* devices, int max_tokens, int num_topk,
                             Workspace** workspaces, ErrorRecord** host_errors) {
  if (num_ranks < 1 || num_ranks > kMaxRanks || max_tokens < 1) return cudaErrorInvalidValue;
  const DeviceGuard restore_device;
  ErrorRecord* device_errors[kMaxRanks] = {};
  for (int r = 0; r < num_ranks; ++r) workspaces[r] = nullptr, host_errors[r] = nullptr;
  const size_t bytes = WorkspaceBytes(num_ranks, max_tokens, num_topk);
  cudaError_t err = cudaSuccess;
  for (int r = 0; r < num_ranks && err == cudaSuccess; ++r) {
    if ((err = cudaSetDevice(devices[r])) != cudaSuccess) break;
    for (int p = 0; p < num_ranks && err == cudaSuccess; ++p) {
      if (devices[p] == devices[r]) continue;
      int can = 0;
      err = cudaDeviceCanAccessPeer(&can, devices[r], devices[p]);
      if (err == cudaSuccess && !can) err = cudaErrorPeerAccessUnsupported;
      if (err == cudaSuccess) {
        err = cudaDeviceEnablePeerAccess(devices[p], 0);
        if (err == cudaErrorPeerAccessAlreadyEnabled) {
          cudaGetLastError();
          err = cudaSuccess;
        }
      }
    }
    if (err == cudaSuccess) err = cudaMalloc(&workspaces[r], bytes);
    if (err == cudaSuccess) err = cudaMemset(workspaces[r], 0, bytes);
    if (err == cudaSuccess) {
      err = cudaHostAlloc(&host_errors[r], sizeof(ErrorRecord),
                          cudaHostAllocMapped | cudaHostAllocPortable);
    }
    if (err == cudaSuccess) {
      *host_errors[r] = ErrorRecord{};
      err = cudaHostGetDevicePointer(&device_errors[r], host_errors[r], 0);
    }
    if (err == cudaSuccess) err = LoadModule();
  }
  for (int r = 0; r < num_ranks && err == cudaSuccess; ++r) {
    const Workspace header =
        WorkspaceHeader(r, num_ranks, max_tokens, num_topk, device_errors[r], workspaces, nullptr);
    if ((err = cudaSetDevice(devices[r])) == cudaSuccess) {
      err = cudaMemcpy(workspaces[r], &header, sizeof(header), cudaMemcpyHostToDevice);
    }
  }
  if (err != cudaSuccess) DestroyWorkspaces(num_ranks, devices, workspaces, host_errors);
  return err;
}

namespace {
int64_t Align256(int64_t n) { return (n + 255) & ~int64_t{255}; }
}  // namespace

StageLayout DispatchStageLayout(int64_t tokens, int64_t x_row_bytes, int64_t s_row_bytes,
                                int64_t num_topk) {
  StageLayout l{};
  const int64_t sizes[kMaxPublished] = {tokens * x_row_bytes, tokens * s_row_bytes,
                                        tokens * num_topk * 4, tokens * num_topk * 4};
  for (int i = 0; i < kMaxPublished; ++i) {
    l.off[i] = l.bytes;
    l.bytes += Align256(sizes[i]);
  }
  return l;
}

StageLayout RowsStageLayout(int64_t rows, int64_t row_bytes) {
  StageLayout l{};
  l.bytes = rows * row_bytes;
  return l;
}

size_t StageBytes(int num_ranks, int max_tokens, int capacity, int num_topk, int hidden) {
  const int64_t groups = (hidden + 127) / 128;
  const int64_t dispatch = DispatchStageLayout(max_tokens, 4 * int64_t{hidden}, 4 * groups,
                                               num_topk).bytes;
  const int64_t rows = RowsStageLayout(capacity > max_tokens ? capacity : max_tokens,
                                       4 * int64_t{hidden}).bytes;
  const int64_t grouped = GroupedCombineStageLayout(num_ranks, max_tokens, num_topk, hidden).bytes;
  return static_cast<size_t>(Align256(std::max({dispatch, rows, grouped})));
}

RelayLayout NormalRelayLayout(int num_ranks, int ranks_per_node, int max_tokens, int hidden,
                              size_t stage_bytes) {
  RelayLayout l{};
  if (ranks_per_node <= 0 || ranks_per_node >= num_ranks) return l;
  const int64_t partial = Align256(int64_t{max_tokens} * 4 * hidden);  // float32 rows at most
  l.pos_off = 256;  // after int32 counts[kMaxRanks]
  l.data_off = Align256(l.pos_off + int64_t{4} * num_ranks * max_tokens);
  l.partial_off = l.data_off + std::max(Align256(static_cast<int64_t>(stage_bytes)), partial);
  l.slot_bytes = l.partial_off + partial;
  l.bytes = l.slot_bytes * (num_ranks / ranks_per_node);
  return l;
}

cudaError_t InitProcessWorkspace(int device, int rank, int num_ranks, int max_tokens, int num_topk,
                                 Workspace* const* peers, const char* const* stages,
                                 const NormalRelay* relay, ErrorRecord** host_error) {
  if (num_ranks < 1 || num_ranks > kMaxRanks || rank < 0 || rank >= num_ranks ||
      max_tokens < 1) {
    return cudaErrorInvalidValue;
  }
  const DeviceGuard restore_device;
  *host_error = nullptr;
  ErrorRecord* device_error = nullptr;
  Workspace* mine = peers[rank];
  cudaError_t err = cudaSetDevice(device);
  if (err == cudaSuccess) err = cudaMemset(mine, 0, WorkspaceBytes(num_ranks, max_tokens, num_topk));
  if (err == cudaSuccess) {
    err = cudaHostAlloc(host_error, sizeof(ErrorRecord),
                        cudaHostAllocMapped | cudaHostAllocPortable);
  }
  if (err == cudaSuccess) {
    **host_error = ErrorRecord{};
    err = cudaHostGetDevicePointer(&device_error, *host_error, 0);
  }
  if (err == cudaSuccess) err = LoadModule();
  if (err == cudaSuccess) {
    const Workspace header =
        WorkspaceHeader(rank, num_ranks, max_tokens, num_topk, device_error, peers, stages, relay);
    err = cudaMemcpy(mine, &header, sizeof(header), cudaMemcpyHostToDevice);
  }
  if (err == cudaSuccess) err = cudaDeviceSynchronize();
  if (err != cudaSuccess && *host_error) {
    cudaFreeHost(*host_error);
    *host_error = nullptr;
  }
  return err;
}

cudaError_t DestroyWorkspaces(int num_ranks, const int* devices, Workspace** workspaces,
                              ErrorRecord** host_errors) {
  const DeviceGuard restore_device;
  cudaError_t first = cudaSuccess;
  for (int r = 0; r < num_ranks; ++r) {
    if (cudaSetDevice(devices[r]) != cudaSuccess) continue;
    cudaError_t e = cudaDeviceSynchronize();
    if (workspaces[r]) e = e != cudaSuccess ? e : cudaFree(workspaces[r]);
    if (host_errors[r]) e = e != cudaSuccess ? e : cudaFreeHost(host_errors[r]);
    workspaces[r] = nullptr;
    host_errors[r] = nullptr;
    if (first == cudaSuccess) first = e;
  }
  return first;
}

}  // namespace jaxep
