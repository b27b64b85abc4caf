// Peers in another node, device side (see rdma.h): the kernels reach rank d with loads and
// stores through their workspace's peer table when it is in their node, else with NVSHMEM puts
// to d's PE at this rank's own workspace addresses (the regions are symmetric: the same offsets
// in every PE's). The low-latency kernels (LLWorkspace) and the normal-mode ones (Workspace,
// through its NormalRelay) share these helpers. Rows are staged in this rank's symmetric memory
// first (an RDMA NIC reads registered memory, not the caller's XLA buffers); a few words go as
// single-value puts. A block's puts are complete (nvshmem_quiet) before its signal: ordered on
// any transport.
#pragma once

#include <cstddef>
#include <cstdint>

#include "intranode.h"
#include "low_latency.h"

#if JAXEP_WITH_NVSHMEM
#include <nvshmem.h>
#include <nvshmemx.h>
#endif

namespace jaxep {

// Which ranks are in another node (bit d), and rank d's NVSHMEM PE, of either workspace.
__device__ __forceinline__ uint32_t RemoteMask(const LLWorkspace* ws) { return ws->remote; }
__device__ __forceinline__ uint32_t RemoteMask(const Workspace* ws) { return ws->relay.remote; }
__device__ __forceinline__ int PeOf(const LLWorkspace* ws, int d) { return ws->pe[d]; }
__device__ __forceinline__ int PeOf(const Workspace* ws, int d) { return ws->relay.pe[d]; }

template <typename W>
__device__ __forceinline__ bool Remote(const W* ws, int d) {
  return (RemoteMask(ws) >> d) & 1u;
}

// Without NVSHMEM's device library no workspace has remote peers (the host refuses them), so
// these are never reached there.
#if JAXEP_WITH_NVSHMEM
// Every lane of a warp: `bytes` from this rank's `src` to `dst` (an address in this rank's
// symmetric region: its counterpart at rank d), non-blocking.
template <typename W>
__device__ __forceinline__ void PutWarp(const W* ws, int d, void* dst, const void* src,
                                        size_t bytes) {
  nvshmemx_putmem_nbi_warp(dst, src, bytes, PeOf(ws, d));
}
template <typename W>
__device__ __forceinline__ void PutThread(const W* ws, int d, void* dst, const void* src,
                                          size_t bytes) {
  nvshmem_putmem_nbi(dst, src, bytes, PeOf(ws, d));
}
template <typename W>
__device__ __forceinline__ void PutInt(const W* ws, int d, int32_t* dst, int32_t v) {
  nvshmem_int32_p(dst, v, PeOf(ws, d));
}
template <typename W>
__device__ __forceinline__ void PutWord(const W* ws, int d, unsigned long long* dst,
                                        unsigned long long v) {
  nvshmem_uint64_p(reinterpret_cast<uint64_t*>(dst), v, PeOf(ws, d));
}
// Adds v to (SignalSet: sets to v) the counter at `dst`'s counterpart at rank d, after this
// thread's puts are delivered (the caller has made the block's puts complete: PutsDone, then
// __syncthreads; or they were made complete by an earlier kernel).
template <typename W>
__device__ __forceinline__ void SignalAdd(const W* ws, int d, unsigned long long* dst,
                                          unsigned long long v) {
  nvshmemx_signal_op(reinterpret_cast<uint64_t*>(dst), v, NVSHMEM_SIGNAL_ADD, PeOf(ws, d));
}
template <typename W>
__device__ __forceinline__ void SignalSet(const W* ws, int d, unsigned long long* dst,
                                          unsigned long long v) {
  nvshmemx_signal_op(reinterpret_cast<uint64_t*>(dst), v, NVSHMEM_SIGNAL_SET, PeOf(ws, d));
}
// Every thread that issued puts: they are complete (delivered at their destinations).
template <typename W>
__device__ __forceinline__ void PutsDone(const W* ws) {
  if (RemoteMask(ws)) nvshmem_quiet();
}
#else
template <typename W>
__device__ __forceinline__ void PutWarp(const W*, int, void*, const void*, size_t) {
  __trap();
}
template <typename W>
__device__ __forceinline__ void PutThread(const W*, int, void*, const void*, size_t) {
  __trap();
}
template <typename W>
__device__ __forceinline__ void PutInt(const W*, int, int32_t*, int32_t) {
  __trap();
}
template <typename W>
__device__ __forceinline__ void PutWord(const W*, int, unsigned long long*, unsigned long long) {
  __trap();
}
template <typename W>
__device__ __forceinline__ void SignalAdd(const W*, int, unsigned long long*, unsigned long long) {
  __trap();
}
template <typename W>
__device__ __forceinline__ void SignalSet(const W*, int, unsigned long long*, unsigned long long) {
  __trap();
}
template <typename W>
__device__ __forceinline__ void PutsDone(const W*) {}
#endif

}  // namespace jaxep
