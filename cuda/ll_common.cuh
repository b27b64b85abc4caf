// Helpers shared by the low-latency kernel files, ll_dispatch_kernels.cu and
// ll_combine_kernels.cu (see low_latency.h for the design and the protocol): workspace
// addressing, 16-channel lane vectors, call completion (signals, acknowledgements, waits),
// top-k listings, and the host side of their launches.
//
// Received data is read with ld.global.cg (L2; buffers are rewritten by later calls, so L1
// must never serve them), completion counters with acquire/release at system scope (one
// release per block and peer, side by side: SignalPeers); waits are bounded.
//
// Everything here is inline: each kernel file gets its own copy. A peer in another node is
// reached with NVSHMEM puts and signals instead of stores (rdma.cuh).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "intranode.h"  // DeviceSmCount
#include "low_latency.h"
#include "rdma.cuh"
#include "sync.cuh"

namespace jaxep {

inline constexpr int kThreads = 512;  // threads of every LL kernel's block
inline constexpr int kWarps = kThreads / 32;
inline constexpr int kPerLane = kLLChunk / 32;  // 16 channels per lane
inline constexpr unsigned kFull = 0xffffffffu;

// ---- workspace addressing (identical layout on every device) -------------------------------

__device__ __forceinline__ char* Region(LLWorkspace* w, int64_t off) {
  return reinterpret_cast<char*>(w) + off;
}

// ---- 16-channel lane vectors --------------------------------------------------------------

// Loads 16 elements of type T (bf16 or f32) as floats.
template <typename T>
__device__ __forceinline__ void Load16(const T* src, float* v, bool cache_global) {
  constexpr int kVec = sizeof(T);  // int4s per 16 elements
  int4 raw[kVec];
  const int4* s = reinterpret_cast<const int4*>(src);
#pragma unroll
  for (int i = 0; i < kVec; ++i) raw[i] = cache_global ? __ldcg(s + i) : s[i];
  if constexpr (sizeof(T) == 2) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(raw);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float2 f = __bfloat1622float2(h[i]);
      v[2 * i] = f.x;
      v[2 * i + 1] = f.y;
    }
  } else {
    const float* f = reinterpret_cast<const float*>(raw);
#pragma unroll
    for (int i = 0; i < 16; ++i) v[i] = f[i];
  }
}

// Packs 16 floats as 16 elements of type T (bf16 or f32) in sizeof(T) int4s.
template <typename T>
__device__ __forceinline__ void Pack16(const float* v, int4* raw) {
  if constexpr (sizeof(T) == 2) {
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(raw);
#pragma unroll
    for (int i = 0; i < 8; ++i) h[i] = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
  } else {
    float* f = reinterpret_cast<float*>(raw);
#pragma unroll
    for (int i = 0; i < 16; ++i) f[i] = v[i];
  }
}

template <typename T>
__device__ __forceinline__ void Store16(T* dst, const float* v) {
  constexpr int kVec = sizeof(T);
  int4 raw[kVec];
  Pack16<T>(v, raw);
  int4* d = reinterpret_cast<int4*>(dst);
#pragma unroll
  for (int i = 0; i < kVec; ++i) d[i] = raw[i];
}

// ---- call completion: counters (see low_latency.h) --------------------------------------------

// This block's share of its grid's kLLCallTotal at a counter.
__device__ __forceinline__ unsigned long long BlockShare() {
  return blockIdx.x == 0 ? kLLCallTotal - (gridDim.x - 1) : 1;
}

// Thread d < R of a block, after the block's __syncthreads: adds the block's share to rank d's
// counter(w), w = d's workspace as mapped here (a release, or relaxed, system-scope add) or, for
// a rank in another node, this rank's own, whose address the signal takes (rdma.cuh).
template <bool kRelease, typename Counter>
__device__ __forceinline__ void AddShare(LLWorkspace* ws, Counter counter) {
  const int d = static_cast<int>(threadIdx.x);
  if (d >= ws->num_ranks) return;
  if (Remote(ws, d)) {
    SignalAdd(ws, d, counter(ws), BlockShare());
  } else if (kRelease) {
    AddRelease(counter(ws->peers[d]), BlockShare());
  } else {
    AddRelaxed(counter(ws->peers[d]), BlockShare());
  }
}

// Every thread of a block, once the block's part of the call is done (its writes issued, its
// reads of a peer's data consumed): the block's share at every rank's counter, with release
// semantics (the __syncthreads brings in the other threads' operations); to a rank in another
// node after the block's puts are complete. The R releases of a block, and those of all
// blocks, run side by side.
template <typename Counter>
__device__ __forceinline__ void SignalPeers(LLWorkspace* ws, Counter counter) {
  PutsDone(ws);
  __syncthreads();
  AddShare<true>(ws, counter);
}

// Every thread of a block that has read peers' data into a buffer of its own, once it is done
// with it: the block's share at every rank's counter, telling it that it may rewrite the
// buffer. An acknowledgement orders reads only, and after the __syncthreads every read whose
// value the block uses has returned it (the values feed stores, shuffles or branches before
// it; a speculative load whose value is never used, such as the row of a token that was not
// sent, cannot matter), so a plain relaxed add does: no system-scope fence, which would make
// the block wait for its output writes first.
template <typename Counter>
__device__ __forceinline__ void AcknowledgePeers(LLWorkspace* ws, Counter counter) {
  __syncthreads();
  AddShare<false>(ws, counter);
}

// Every thread of a send, after SignalPeers (or a __syncthreads): true in one thread (not a
// signalling one) of the last block to get here, which then advances the call numbers: every
// block has read them, at its start (the ticket's acquire and release order those reads first).
__device__ __forceinline__ bool LastToFinish(LLWorkspace* ws, int ticket_index) {
  if (threadIdx.x != blockDim.x - 1) return false;
  if (AddAcqRelGpu(&ws->ticket[ticket_index], 1u) != gridDim.x - 1) return false;
  ws->ticket[ticket_index] = 0;  // for the next launch (stream-ordered after this one)
  return true;
}

// Threads s < R: wait until flags[s] >= want (bounded; `call` names the call in a timeout
// report: a dispatch's number at its buffer, a combine's sequence number); then the whole
// block continues.
__device__ __forceinline__ void WaitPeers(LLWorkspace* ws, const unsigned long long* flags,
                                          unsigned long long want, unsigned long long call,
                                          int phase, unsigned long long timeout_ns) {
  if (static_cast<int>(threadIdx.x) < ws->num_ranks) {
    const unsigned long long* f = flags + threadIdx.x;
    WaitFor([&] { return LoadAcquire(f) >= want; }, ws->error, ws->rank, threadIdx.x, phase,
            call, timeout_ns);
  }
  __syncthreads();
}

__device__ __forceinline__ unsigned long long CallNumber(const int32_t* lo_hi) {
  return static_cast<unsigned long long>(static_cast<uint32_t>(lo_hi[0])) |
         (static_cast<unsigned long long>(static_cast<uint32_t>(lo_hi[1])) << 32);
}

// ---- top-k listings --------------------------------------------------------------------------

// Every lane of the warp: the lowest lane of `group` whose `e` is valid and equal to this
// lane's (the first listing of an expert among a token's top-k entries, with the entries in
// increasing lanes of `group`); an invalid lane's own lane if it is in `group`, else -1.
__device__ __forceinline__ int FirstLane(int e, bool valid, unsigned group) {
  const int lane = static_cast<int>(threadIdx.x & 31);
  return __ffs(__match_any_sync(kFull, valid ? e : -2 - lane) & group) - 1;
}

// Every lane of the warp: true in the first listing of a valid expert (see FirstLane).
__device__ __forceinline__ bool FirstListing(int e, bool valid, unsigned group) {
  const int first = FirstLane(e, valid, group);  // every lane: the match is warp-wide
  return valid && first == static_cast<int>(threadIdx.x & 31);
}

// ---- launches (host) ---------------------------------------------------------------------------

inline int DefaultBlocks(int requested, int items_per_block_hint) {
  if (requested > 0) return min(requested, kLLMaxBlocks);  // a block's share must stay positive
  return max(1, min(DeviceSmCount(), items_per_block_hint));
}

// Launches a kernel whose blocks wait for one another (through the peers: the one-kernel ops,
// the pre-reduced combine send) cooperatively: the driver places every block at once or fails
// the launch, so no block spins for one that is kept off the GPU by other work (the caller
// keeps the grid at one block per SM, which fits).
template <typename... Params, typename... Args>
cudaError_t LaunchAllResident(void (*kernel)(Params...), int blocks, size_t smem,
                              cudaStream_t stream, const Args&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(blocks);
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeCooperative;
  attr[0].val.cooperative = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, kernel, args...);
}

inline int Chunks(int hidden) { return (hidden + kLLChunk - 1) / kLLChunk; }

template <typename K>
const void* Fn(K* k) {
  return reinterpret_cast<const void*>(k);
}

// Touches every kernel of a module now (no lazy loading while a peer spins) and lets it use up
// to kLLMaxSharedBytes of dynamic shared memory.
template <size_t N>
cudaError_t LoadKernels(const void* const (&kernels)[N]) {
  for (const void* k : kernels) {
    cudaError_t e = cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(kLLMaxSharedBytes));
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

}  // namespace jaxep
