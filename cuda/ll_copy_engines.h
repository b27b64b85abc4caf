// Copy-engine dispatch sends, host side only (the kernels never include this): the state that
// picks a copy-engine send's buffer and enqueues its copies. See low_latency.h for the protocol.
#pragma once

#include <cstddef>
#include <mutex>

#include <cuda_runtime_api.h>

#include "intranode.h"  // kMaxRanks
#include "low_latency.h"

namespace jaxep {

// Per-device state of copy-engine dispatch sends (host side; only with LLLayout::copy_engine).
// The call's buffer is 2 + (calls & 1): the host picks it, since the copies' addresses are fixed
// when they are enqueued. After the send kernel on the caller's stream, a copy-engine send records
// `packed` there, makes `stream` wait for it and launches there a small CUDA graph: per peer d,
// the bundle copy (outbox -> d's inbox) and then the flag copy (dispatch_uses[buffer] -> d's
// dispatch_arrived). One graph launch costs the host a fraction of 2 (R - 1) cudaMemcpyAsync
// calls; the graphs are instantiated on first use, per buffer and copy size. Nothing joins
// `stream` back: the receiver's recv kernel waits for the flag. `mutex` serialises the sends of
// one device (the buffer choice and the launch order must agree) and the reads of `calls`.
struct LLCopyGraph {
  size_t bytes = 0;
  cudaGraphExec_t exec = nullptr;
};
inline constexpr int kLLCopyGraphsPerBuffer = 4;  // copy sizes cached per buffer
struct LLCopyEngines {
  std::mutex mutex;
  cudaStream_t stream = nullptr;
  cudaEvent_t packed = nullptr;
  LLCopyGraph graphs[2][kLLCopyGraphsPerBuffer];  // [buffer - 2][slot]
  int next_slot[2] = {};                         // round-robin replacement
  LLWorkspace* peers[kMaxRanks] = {};  // device pointers of every rank's workspace
  LLLayout layout{};
  int rank = -1, num_ranks = 0;
  unsigned long long calls = 0;  // copy-engine sends so far
};
// engines[r] must be freshly constructed; the workspaces must have copy-engine buffers.
cudaError_t CreateLLCopyEngines(int num_ranks, const int* devices, LLWorkspace* const* workspaces,
                                const LLLayout& layout, LLCopyEngines* engines);
void DestroyLLCopyEngines(int num_ranks, const int* devices, LLCopyEngines* engines);
unsigned long long LLCopyEngineSends(LLCopyEngines& engines);

}  // namespace jaxep
