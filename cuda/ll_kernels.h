// What the low-latency kernel files (ll_dispatch_kernels.cu, ll_combine_kernels.cu) give the
// host-side LL sources (ll_setup.cu, ll_copy_engines.cu); not for the FFI handlers.
#pragma once

#include <cuda_runtime_api.h>

#include "low_latency.h"

namespace jaxep {

// Each kernel file is a module of its own: these touch every kernel of theirs on the current
// device now (no lazy loading while a peer spins) and let it use kLLMaxSharedBytes of dynamic
// shared memory. Every workspace creation calls both.
cudaError_t LoadLLDispatchKernels();
cudaError_t LoadLLCombineKernels();

// The dispatch send kernel alone, into a.buffer as the caller set it (-1: an SM send, else a
// copy-engine buffer); LaunchLLDispatchSend (ll_copy_engines.cu) wraps it.
cudaError_t LaunchLLDispatchSendKernel(const LLDispatchSendArgs& a, cudaStream_t stream);

// A kernel of the extension's CUDA module (rdma.cu finds the module through it).
const void* LLDispatchKernelAddress();

}  // namespace jaxep
