// Normal mode across nodes (see NormalRelay in intranode.h; docs/design.md, "Across nodes"):
// the puts into the rail peers' relays, and the forwarders' partial sums of combine.
//
// A source puts each row once per other node that needs it, to the rank of that node on its
// own rail; the node's ranks then pull it from there over NVLink, with the single-node kernels
// (PeerInput, SourceCounts and SourcePos read the relay slot). Combine runs the other way: the
// rail peer sums its node's rows of a token (float32) and puts one partial row back. Every
// thread that issued puts makes them complete (nvshmem_quiet) before its kernel ends, so the
// barrier after it (a signal to the other nodes) is ordered behind the data.
#include <cstdint>

#include <cuda_bf16.h>

#include "intranode.h"
#include "intranode_common.cuh"

namespace jaxep {
namespace {

__device__ __forceinline__ int MyNode(const Workspace* ws) {
  return ws->rank / ws->relay.ranks_per_node;
}
// The rank of node m on this rank's rail: the one this rank exchanges with there.
__device__ __forceinline__ int RailPeer(const Workspace* ws, int m) {
  const int g = ws->relay.ranks_per_node;
  return m * g + ws->rank % g;
}
// Slot m of this rank's relay; as a put destination, the same slot at the peer.
__device__ __forceinline__ char* Slot(const Workspace* ws, int m) {
  return ws->relay.mine + m * ws->relay.slot_bytes;
}

// Whether token t goes to some rank of node m: `pos` rows [R][stride] (>= 0: sent there).
__device__ __forceinline__ bool NodeNeeds(const int32_t* table, int64_t rank_stride,
                                          int64_t token_stride, int t, int m, int g) {
  bool need = false;
  for (int d = m * g; d < (m + 1) * g; ++d) {
    need = need || table[d * rank_stride + t * token_stride] >= 0;
  }
  return need;
}

// ---- dispatch ------------------------------------------------------------------------------

// After the positions (DispatchPrepare part 1): to each other node's rail peer, my counts, my
// positions for that node's ranks, my top-k ids and weights, and the rows (and scales) of the
// tokens some rank of that node receives, each at its token's offset in my stage's layout.
__global__ void __launch_bounds__(kCopyThreads, 1) DispatchRelayKernel(DispatchArgs a) {
  Workspace* ws = a.ws;
  const int warp = threadIdx.x >> 5;
  const int g = ws->relay.ranks_per_node, nodes = ws->num_ranks / g, me_node = MyNode(ws);
  const int T = a.num_tokens, max_tokens = ws->max_tokens;
  const int32_t* pos = PosTable(ws);
  char* dst_slot = Slot(ws, me_node);  // my slot at each rail peer
  const char* stage = a.stage;
  const StageLayout& l = a.stage_layout;
  if (blockIdx.x == 0) {  // the small tables: one warp per (node, table)
    for (int i = warp; i < nodes * 4; i += kCopyWarps) {
      const int m = i / 4, what = i % 4;
      if (m == me_node) continue;
      const int p = RailPeer(ws, m);
      if (what == 0) {
        PutWarp(ws, p, dst_slot, ws->counts, sizeof(int32_t) * kMaxRanks);
      } else if (what == 1) {
        const size_t off = sizeof(int32_t) * static_cast<size_t>(m * g) * max_tokens;
        for (int d = 0; d < g; ++d) {
          const size_t o = off + sizeof(int32_t) * static_cast<size_t>(d) * max_tokens;
          PutWarp(ws, p, dst_slot + ws->relay.pos_off + o, reinterpret_cast<const char*>(pos) + o,
                 sizeof(int32_t) * T);
        }
      } else {  // top-k ids (2) and weights (3)
        PutWarp(ws, p, dst_slot + ws->relay.data_off + l.off[what], stage + l.off[what],
               sizeof(int32_t) * static_cast<size_t>(T) * a.num_topk);
      }
    }
  }
  const int stride = gridDim.x * kCopyWarps;
  for (int i = blockIdx.x * kCopyWarps + warp; i < nodes * T; i += stride) {
    const int m = i / T, t = i - m * T;
    if (m == me_node || !NodeNeeds(pos, max_tokens, 1, t, m, g)) continue;
    const int p = RailPeer(ws, m);
    const size_t xo = l.off[0] + static_cast<size_t>(t) * a.x_row_bytes;
    PutWarp(ws, p, dst_slot + ws->relay.data_off + xo, stage + xo, a.x_row_bytes);
    if (a.s_row_bytes) {
      const size_t so = l.off[1] + static_cast<size_t>(t) * a.s_row_bytes;
      PutWarp(ws, p, dst_slot + ws->relay.data_off + so, stage + so, a.s_row_bytes);
    }
  }
  PutsDone(ws);
}

// ---- dispatch of rows along a handle ---------------------------------------------------------

// Before the start barrier: to each other node's rail peer, the rows some rank of that node
// receives (send_slot >= 0), at their token's offset.
__global__ void __launch_bounds__(kCopyThreads, 1) RowsRelayKernel(DispatchRowsArgs a) {
  Workspace* ws = a.ws;
  const int warp = threadIdx.x >> 5;
  const int g = ws->relay.ranks_per_node, nodes = ws->num_ranks / g, me_node = MyNode(ws);
  const int T = a.num_tokens, R = ws->num_ranks;
  char* dst_slot = Slot(ws, me_node);
  const int stride = gridDim.x * kCopyWarps;
  for (int i = blockIdx.x * kCopyWarps + warp; i < nodes * T; i += stride) {
    const int m = i / T, t = i - m * T;
    if (m == me_node || !NodeNeeds(a.send_slot, 1, R, t, m, g)) continue;
    const size_t o = static_cast<size_t>(t) * a.row_bytes;
    PutWarp(ws, RailPeer(ws, m), dst_slot + ws->relay.data_off + o, a.stage + o, a.row_bytes);
  }
  PutsDone(ws);
}

// ---- combine ---------------------------------------------------------------------------------

// One block, before the start barrier: send_slot [T, R] into my position table (symmetric: a
// put source; positions are only read during a dispatch), then to each other node's rail peer.
__global__ void __launch_bounds__(kCopyThreads, 1) CombineSlotsKernel(CombineArgs a) {
  Workspace* ws = a.ws;
  const int warp = threadIdx.x >> 5;
  const int g = ws->relay.ranks_per_node, nodes = ws->num_ranks / g, me_node = MyNode(ws);
  const int n = a.num_tokens * ws->num_ranks;
  int32_t* copy = PosTable(ws);
  for (int i = threadIdx.x; i < n; i += blockDim.x) copy[i] = a.send_slot[i];
  __syncthreads();
  for (int m = warp; m < nodes; m += kCopyWarps) {
    if (m == me_node) continue;
    PutWarp(ws, RailPeer(ws, m), Slot(ws, me_node) + ws->relay.pos_off, copy,
           sizeof(int32_t) * static_cast<size_t>(n));
  }
  PutsDone(ws);
}

// After the start barrier, as the rail peer of each other node's source s: for each token of s
// with rows in my node, their float32 sum (in my node's rank order) into my slot for s's node,
// then put to s's slot for my node (partial rows). CombineReduce adds it in: float32 all the
// way, as within one node.
template <typename T>
__global__ void __launch_bounds__(kCopyThreads, 1) CombineForwardKernel(CombineArgs a) {
  constexpr int kPer = 16 / sizeof(T);
  Workspace* ws = a.ws;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = ws->relay.ranks_per_node, nodes = ws->num_ranks / g, me_node = MyNode(ws);
  const int R = ws->num_ranks, Tn = a.num_tokens, row = a.row_elems;
  const size_t row_bytes = sizeof(float) * static_cast<size_t>(row);  // a partial row
  __shared__ const T* s_y[kMaxRanks];  // my node's ranks' y
  if (threadIdx.x < g) {
    s_y[threadIdx.x] =
        reinterpret_cast<const T*>(PeerInput(ws, a.stage_layout, me_node * g + threadIdx.x, 0));
  }
  __syncthreads();
  const bool vec = row % kPer == 0;
  const int stride = gridDim.x * kCopyWarps;
  for (int i = blockIdx.x * kCopyWarps + warp; i < nodes * Tn; i += stride) {
    const int m = i / Tn, t = i - m * Tn;
    if (m == me_node) continue;
    const int32_t* slots_of = reinterpret_cast<const int32_t*>(Slot(ws, m) + ws->relay.pos_off);
    const int mine = lane < g ? __ldcg(slots_of + static_cast<size_t>(t) * R + me_node * g + lane)
                              : -1;
    if (!__any_sync(0xffffffffu, mine >= 0)) continue;  // no row of t in my node
    int slots[kMaxRanks];
#pragma unroll
    for (int j = 0; j < kMaxRanks; ++j) slots[j] = __shfl_sync(0xffffffffu, mine, j);
    float* out = reinterpret_cast<float*>(Slot(ws, m) + ws->relay.data_off + t * row_bytes);
    if (vec) {
      const int n = row / kPer;
      for (int v = lane; v < n; v += 32) {
        float acc[kPer] = {};
#pragma unroll
        for (int j = 0; j < kMaxRanks; ++j) {
          if (j < g && slots[j] >= 0) {
            const int4* src =
                reinterpret_cast<const int4*>(s_y[j] + static_cast<size_t>(slots[j]) * row);
            Accumulate(acc, __ldcg(src + v), T());
          }
        }
#pragma unroll
        for (int e = 0; e < kPer; e += 4) {
          reinterpret_cast<float4*>(out)[v * (kPer / 4) + e / 4] =
              make_float4(acc[e], acc[e + 1], acc[e + 2], acc[e + 3]);
        }
      }
    } else {
      for (int e = lane; e < row; e += 32) {
        float acc = 0.f;
        for (int j = 0; j < g; ++j) {
          if (slots[j] >= 0) acc += static_cast<float>(s_y[j][static_cast<size_t>(slots[j]) * row + e]);
        }
        out[e] = acc;
      }
    }
    __syncwarp();  // the put's lanes read what the others wrote
    PutWarp(ws, RailPeer(ws, m), Slot(ws, me_node) + ws->relay.partial_off + t * row_bytes, out,
           row_bytes);
  }
  PutsDone(ws);
}

inline int Blocks(int requested, int fallback) { return requested > 0 ? requested : fallback; }

}  // namespace

cudaError_t LaunchDispatchRelay(const DispatchArgs& a, cudaStream_t stream) {
  DispatchRelayKernel<<<NumBlocks(a.num_sms), kCopyThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

cudaError_t LaunchRowsRelay(const DispatchRowsArgs& a, cudaStream_t stream) {
  RowsRelayKernel<<<NumBlocks(a.num_sms), kCopyThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

cudaError_t LaunchCombineSlots(const CombineArgs& a, cudaStream_t stream) {
  CombineSlotsKernel<<<1, kCopyThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

cudaError_t LaunchCombineForward(const CombineArgs& a, cudaStream_t stream) {
  const int blocks = Blocks(a.num_sms, 32);
  if (a.elem_bytes == 2) {
    CombineForwardKernel<__nv_bfloat16><<<blocks, kCopyThreads, 0, stream>>>(a);
  } else {
    CombineForwardKernel<float><<<blocks, kCopyThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

cudaError_t LoadInternodeModule() {  // see LoadModule (intranode.cu): nothing loads lazily
  cudaFuncAttributes attr;
  const void* kernels[] = {
      reinterpret_cast<const void*>(&DispatchRelayKernel),
      reinterpret_cast<const void*>(&RowsRelayKernel),
      reinterpret_cast<const void*>(&CombineSlotsKernel),
      reinterpret_cast<const void*>(&CombineForwardKernel<__nv_bfloat16>),
      reinterpret_cast<const void*>(&CombineForwardKernel<float>),
  };
  for (const void* k : kernels) {
    if (cudaError_t e = cudaFuncGetAttributes(&attr, k); e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

}  // namespace jaxep
