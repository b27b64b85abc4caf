// Device helpers shared by the normal-mode kernels (intranode.cu, grouped_kernels.cu): the
// workspace's tables, peers' inputs, the block barrier, row copies, float32 accumulation of
// 16-byte vectors, the stage copy. Each including file gets its own copies (unnamed namespace):
// its module loads them with its kernels.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include "grouped.h"
#include "intranode.h"
#include "rdma.cuh"
#include "sync.cuh"

namespace jaxep {
namespace {

constexpr int kCopyThreads = 1024;
constexpr int kCopyWarps = kCopyThreads / 32;

// The int32 tables after the Workspace header (WorkspaceBytes): pos [R][max_tokens], then the
// grouped dispatch's row table [R][max_tokens][K], group counts and offsets.
__device__ __forceinline__ int32_t* PosTable(Workspace* ws) {
  return reinterpret_cast<int32_t*>(ws + 1);
}
__device__ __forceinline__ int32_t* RowTable(Workspace* ws) {
  return PosTable(ws) + static_cast<size_t>(ws->num_ranks) * ws->max_tokens;
}
__device__ __forceinline__ int32_t* GroupCounts(Workspace* ws) {  // [kMaxGroupedExperts]
  return RowTable(ws) + static_cast<size_t>(ws->num_ranks) * ws->max_tokens * ws->num_topk;
}
__device__ __forceinline__ int32_t* GroupOffsets(Workspace* ws) {  // [kMaxGroupedExperts + 1]
  return GroupCounts(ws) + kMaxGroupedExperts;
}

__device__ __forceinline__ const void* LoadPublished(const Workspace* peer, int i) {
  return reinterpret_cast<const void*>(
      __ldcg(reinterpret_cast<const unsigned long long*>(&peer->published[i])));
}

// Input `i` of peer `s` for this call: in the relay slot it put it into when the peer is in
// another node, in its stage when it is another process, else the XLA buffer it published.
__device__ __forceinline__ const char* PeerInput(const Workspace* ws, const StageLayout& stage,
                                                 int s, int i) {
  if (const char* relay = ws->relay.in[s]) return relay + ws->relay.data_off + stage.off[i];
  const char* base = ws->stage[s];
  return base ? base + stage.off[i] : static_cast<const char*>(LoadPublished(ws->peers[s], i));
}

// Source s's counts [R] and positions [R][max_tokens] (PosTable) for this call: its workspace's,
// or the copies it put into the relay slot when it is in another node.
__device__ __forceinline__ const int32_t* SourceCounts(const Workspace* ws, int s) {
  if (const char* relay = ws->relay.in[s]) return reinterpret_cast<const int32_t*>(relay);
  return ws->peers[s]->counts;
}
__device__ __forceinline__ const int32_t* SourcePos(const Workspace* ws, int s) {
  if (const char* relay = ws->relay.in[s]) {
    return reinterpret_cast<const int32_t*>(relay + ws->relay.pos_off);
  }
  return PosTable(ws->peers[s]);
}

// Copies this call's inputs into this rank's stage (one process per GPU), all blocks
// grid-striding over 16-byte words; a misaligned or ragged input falls back to bytes.
struct StageCopy {
  char* dst;
  const char* src[kMaxPublished];
  int64_t off[kMaxPublished], bytes[kMaxPublished];
};

__global__ void StageKernel(StageCopy c) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int i = 0; i < kMaxPublished; ++i) {
    if (!c.src[i] || c.bytes[i] == 0) continue;
    const char* src = c.src[i];
    char* dst = c.dst + c.off[i];
    const int64_t n = c.bytes[i];
    if ((reinterpret_cast<uintptr_t>(src) & 15) == 0) {
      const int64_t words = n >> 4;
      const int4* s = reinterpret_cast<const int4*>(src);
      int4* d = reinterpret_cast<int4*>(dst);
      for (int64_t j = first; j < words; j += stride) d[j] = s[j];
      for (int64_t j = (words << 4) + first; j < n; j += stride) dst[j] = src[j];
    } else {
      for (int64_t j = first; j < n; j += stride) dst[j] = src[j];
    }
  }
}

// All threads of one block: make this device's prior writes visible system-wide, announce
// arrival to every peer, and wait (bounded) until every peer has announced the same barrier.
__device__ void BlockBarrier(Workspace* ws, int phase, unsigned long long timeout_ns) {
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned long long s = ws->seq + 1;
    ws->seq = s;
    const int num_ranks = ws->num_ranks, me = ws->rank;
    for (int p = 0; p < num_ranks; ++p) {
      if (Remote(ws, p)) {
        SignalSet(ws, p, &ws->flags[me], s);
      } else {
        StoreRelease(&ws->peers[p]->flags[me], s);
      }
    }
    for (int p = 0; p < num_ranks; ++p) {
      WaitAtLeast(&ws->flags[p], s, ws->error, me, p, phase, timeout_ns);
    }
  }
  __syncthreads();
}

__global__ void BarrierKernel(Workspace* ws, int phase, unsigned long long timeout_ns) {
  BlockBarrier(ws, phase, timeout_ns);
}

__global__ void PublishKernel(Workspace* ws, const void* ptr, int phase,
                              unsigned long long timeout_ns) {
  if (threadIdx.x == 0) ws->published[0] = ptr;
  BlockBarrier(ws, phase, timeout_ns);
}

// ---- row copies (one warp per row) ------------------------------------------------------

__device__ __forceinline__ bool Aligned(const void* p, int a) {
  return (reinterpret_cast<uintptr_t>(p) & (a - 1)) == 0;
}

__device__ __forceinline__ void CopyRow(char* dst, const char* src, int bytes, int lane) {
  if ((bytes & 15) == 0 && Aligned(dst, 16) && Aligned(src, 16)) {
    const int n = bytes >> 4;
    const int4* s = reinterpret_cast<const int4*>(src);
    int4* d = reinterpret_cast<int4*>(dst);
    int i = lane;
    for (; i + 96 < n; i += 128) {  // four 16-byte loads in flight per lane
      const int4 v0 = __ldcg(s + i), v1 = __ldcg(s + i + 32), v2 = __ldcg(s + i + 64),
                 v3 = __ldcg(s + i + 96);
      d[i] = v0;
      d[i + 32] = v1;
      d[i + 64] = v2;
      d[i + 96] = v3;
    }
    for (; i < n; i += 32) d[i] = __ldcg(s + i);
  } else if ((bytes & 3) == 0 && Aligned(dst, 4) && Aligned(src, 4)) {
    const int* s = reinterpret_cast<const int*>(src);
    int* d = reinterpret_cast<int*>(dst);
    for (int i = lane; i < (bytes >> 2); i += 32) d[i] = __ldcg(s + i);
  } else {
    for (int i = lane; i < bytes; i += 32) dst[i] = src[i];
  }
}

__device__ __forceinline__ void ZeroRow(char* dst, int bytes, int lane) {
  if ((bytes & 15) == 0 && Aligned(dst, 16)) {
    int4* d = reinterpret_cast<int4*>(dst);
    for (int i = lane; i < (bytes >> 4); i += 32) d[i] = make_int4(0, 0, 0, 0);
  } else {
    for (int i = lane; i < bytes; i += 32) dst[i] = 0;
  }
}

__device__ __forceinline__ void Accumulate(float* acc, const int4& v, __nv_bfloat16) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    acc[2 * i] += f.x;
    acc[2 * i + 1] += f.y;
  }
}

__device__ __forceinline__ void Accumulate(float* acc, const int4& v, float) {
  const float* f = reinterpret_cast<const float*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) acc[i] += f[i];
}

// acc[0..n) += p[0..n) (float32, 16-byte aligned, n a multiple of 4).
template <int n>
__device__ __forceinline__ void AccumulateFloats(float* acc, const float* p) {
#pragma unroll
  for (int e = 0; e < n / 4; ++e) {
    const float4 f = __ldcg(reinterpret_cast<const float4*>(p) + e);
    acc[4 * e] += f.x;
    acc[4 * e + 1] += f.y;
    acc[4 * e + 2] += f.z;
    acc[4 * e + 3] += f.w;
  }
}

__device__ __forceinline__ int4 Pack(const float* acc, __nv_bfloat16) {
  int4 v;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(acc[2 * i], acc[2 * i + 1]);
  return v;
}

__device__ __forceinline__ int4 Pack(const float* acc, float) {
  int4 v;
  float* f = reinterpret_cast<float*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) f[i] = acc[i];
  return v;
}

inline int NumBlocks(int requested) { return requested > 0 ? requested : DeviceSmCount(); }

// Process-per-GPU: the copy of a call's inputs into this rank's stage, before the barrier
// that lets the peers read them.
inline void LaunchStage(char* stage, const StageLayout& layout, const void* const* srcs,
                 const int64_t* bytes, int n, cudaStream_t stream) {
  StageCopy c{};
  c.dst = stage;
  for (int i = 0; i < n; ++i) {
    c.src[i] = static_cast<const char*>(srcs[i]);
    c.off[i] = layout.off[i];
    c.bytes[i] = srcs[i] ? bytes[i] : 0;
  }
  StageKernel<<<DeviceSmCount(), kCopyThreads, 0, stream>>>(c);
}

}  // namespace
}  // namespace jaxep
