// Peers in another node, device side (see rdma.h): the low-latency kernels reach rank d with
// loads and stores through ws->peers[d] when it is in their node, else with NVSHMEM puts to
// PE ws->pe[d] at this rank's own workspace addresses (the workspaces are symmetric: the same
// offsets in every PE's region). Rows are staged in this rank's workspace first (an RDMA NIC
// reads registered memory, not the caller's XLA buffers); a few words go as single-value puts.
// A block's puts are complete (nvshmem_quiet) before its signal: ordered on any transport.
#pragma once

#include <cstddef>
#include <cstdint>

#include "low_latency.h"

#if JAXEP_WITH_NVSHMEM
#include <nvshmem.h>
#include <nvshmemx.h>
#endif

namespace jaxep {

__device__ __forceinline__ bool Remote(const LLWorkspace* ws, int d) {
  return (ws->remote >> d) & 1u;
}

// Without NVSHMEM's device library no workspace has remote peers (the host refuses them), so
// these are never reached there.
#if JAXEP_WITH_NVSHMEM
// Every lane of a warp: `bytes` from this rank's `src` to `dst` (an address in this rank's
// workspace: its counterpart at rank d), non-blocking.
__device__ __forceinline__ void PutWarp(const LLWorkspace* ws, int d, void* dst, const void* src,
                                        size_t bytes) {
  nvshmemx_putmem_nbi_warp(dst, src, bytes, ws->pe[d]);
}
__device__ __forceinline__ void PutThread(const LLWorkspace* ws, int d, void* dst,
                                          const void* src, size_t bytes) {
  nvshmem_putmem_nbi(dst, src, bytes, ws->pe[d]);
}
__device__ __forceinline__ void PutInt(const LLWorkspace* ws, int d, int32_t* dst, int32_t v) {
  nvshmem_int32_p(dst, v, ws->pe[d]);
}
__device__ __forceinline__ void PutWord(const LLWorkspace* ws, int d, unsigned long long* dst,
                                        unsigned long long v) {
  nvshmem_uint64_p(reinterpret_cast<uint64_t*>(dst), v, ws->pe[d]);
}
// Adds v to the counter at `dst`'s counterpart at rank d, after this thread's puts are
// delivered (the caller has made the block's puts complete: PutsDone, then __syncthreads).
__device__ __forceinline__ void SignalAdd(const LLWorkspace* ws, int d, unsigned long long* dst,
                                          unsigned long long v) {
  nvshmemx_signal_op(reinterpret_cast<uint64_t*>(dst), v, NVSHMEM_SIGNAL_ADD, ws->pe[d]);
}
// Every thread that issued puts: they are complete (delivered at their destinations).
__device__ __forceinline__ void PutsDone(const LLWorkspace* ws) {
  if (ws->remote) nvshmem_quiet();
}
#else
__device__ __forceinline__ void PutWarp(const LLWorkspace*, int, void*, const void*, size_t) {
  __trap();
}
__device__ __forceinline__ void PutThread(const LLWorkspace*, int, void*, const void*, size_t) {
  __trap();
}
__device__ __forceinline__ void PutInt(const LLWorkspace*, int, int32_t*, int32_t) { __trap(); }
__device__ __forceinline__ void PutWord(const LLWorkspace*, int, unsigned long long*,
                                        unsigned long long) {
  __trap();
}
__device__ __forceinline__ void SignalAdd(const LLWorkspace*, int, unsigned long long*,
                                          unsigned long long) {
  __trap();
}
__device__ __forceinline__ void PutsDone(const LLWorkspace*) {}
#endif

}  // namespace jaxep
