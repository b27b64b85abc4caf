// Device-side synchronisation primitives shared by the transport kernels (intranode.cu,
// ll_dispatch_kernels.cu, ll_combine_kernels.cu): system-scope release/acquire flags and bounded
// waits that report a missing peer in the host-mapped ErrorRecord, then trap (never an infinite
// hang).
#pragma once

#include <cstdio>

#include "intranode.h"

namespace jaxep {

__device__ __forceinline__ void StoreRelease(unsigned long long* p, unsigned long long v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

// Adds v to *p (a peer's memory too) at system scope, ordered after this thread's earlier memory
// operations and those it has observed (a release: a __syncthreads before it brings in the
// block's).
__device__ __forceinline__ void AddRelease(unsigned long long* p, unsigned long long v) {
  asm volatile("red.release.sys.global.add.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

// Adds v to *p at system scope, unordered with this thread's other memory operations.
__device__ __forceinline__ void AddRelaxed(unsigned long long* p, unsigned long long v) {
  asm volatile("red.relaxed.sys.global.add.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

// Atomic add at GPU scope, acquire and release; returns the old value.
__device__ __forceinline__ unsigned AddAcqRelGpu(unsigned* p, unsigned v) {
  unsigned old;
  asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], %2;" : "=r"(old) : "l"(p), "r"(v)
               : "memory");
  return old;
}

__device__ __forceinline__ unsigned long long LoadAcquire(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ unsigned long long GlobalTimer() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Records (rank, peer, phase, seq, via) in the host-mapped ErrorRecord, prints it and traps.
__device__ __noinline__ inline void ReportTimeout(ErrorRecord* e, int rank, int peer, int phase,
                                                  unsigned long long seq, int via = -1) {
  e->rank = rank;
  e->peer = peer;
  e->phase = phase;
  e->via = via;
  e->seq = seq;
  __threadfence_system();
  atomicExch(&e->code, 1);
  __threadfence_system();
  if (via >= 0) {
    printf("jaxep: rank %d timed out waiting for peer %d via rank %d (phase %d, call %llu)\n",
           rank, peer, via, phase, seq);
  } else {
    printf("jaxep: rank %d timed out waiting for peer %d (phase %d, call %llu)\n", rank, peer,
           phase, seq);
  }
  __trap();
}

// Polls ready() until it returns true, bounded by timeout_ns (then reports call `seq` waiting
// for `peer` in `phase`, relayed by rank `via` if >= 0, and traps).
template <typename Ready>
__device__ __forceinline__ void WaitFor(Ready ready, ErrorRecord* error, int rank, int peer,
                                        int phase, unsigned long long seq,
                                        unsigned long long timeout_ns, int via = -1) {
  if (ready()) return;
  const unsigned long long start = GlobalTimer();
  while (!ready()) {
    if (GlobalTimer() - start > timeout_ns) ReportTimeout(error, rank, peer, phase, seq, via);
  }
}

// Waits (bounded by timeout_ns) until *flag >= want; acquire at system scope.
__device__ __forceinline__ void WaitAtLeast(const unsigned long long* flag, unsigned long long want,
                                            ErrorRecord* error, int rank, int peer, int phase,
                                            unsigned long long timeout_ns) {
  WaitFor([&] { return LoadAcquire(flag) >= want; }, error, rank, peer, phase, want, timeout_ns);
}

}  // namespace jaxep
