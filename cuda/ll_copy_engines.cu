// Copy-engine dispatch sends, host side (see ll_copy_engines.h): the per-device streams and
// events, the cache of copy graphs, and LaunchLLDispatchSend, which runs the send kernel and,
// for a copy-engine send, enqueues its copies.
#include <cstddef>
#include <mutex>

#include <cuda_runtime_api.h>

#include "device_guard.h"
#include "ll_copy_engines.h"
#include "ll_kernels.h"
#include "low_latency.h"

namespace jaxep {

cudaError_t CreateLLCopyEngines(int num_ranks, const int* devices, LLWorkspace* const* workspaces,
                                const LLLayout& layout, LLCopyEngines* engines) {
  if (!layout.copy_engine) return cudaErrorInvalidValue;
  const DeviceGuard restore_device;
  cudaError_t err = cudaSuccess;
  for (int r = 0; r < num_ranks && err == cudaSuccess; ++r) {
    LLCopyEngines& c = engines[r];
    c.rank = r;
    c.num_ranks = num_ranks;
    c.layout = layout;
    for (int d = 0; d < num_ranks; ++d) c.peers[d] = workspaces[d];
    if ((err = cudaSetDevice(devices[r])) != cudaSuccess) break;
    if ((err = cudaEventCreateWithFlags(&c.packed, cudaEventDisableTiming)) != cudaSuccess) break;
    err = cudaStreamCreateWithFlags(&c.stream, cudaStreamNonBlocking);
  }
  if (err != cudaSuccess) DestroyLLCopyEngines(num_ranks, devices, engines);
  return err;
}

void DestroyLLCopyEngines(int num_ranks, const int* devices, LLCopyEngines* engines) {
  const DeviceGuard restore_device;
  for (int r = 0; r < num_ranks; ++r) {
    LLCopyEngines& c = engines[r];
    std::lock_guard<std::mutex> lock(c.mutex);
    if (cudaSetDevice(devices[r]) != cudaSuccess) continue;
    if (c.stream) cudaStreamSynchronize(c.stream);
    for (auto& per_buffer : c.graphs) {
      for (LLCopyGraph& g : per_buffer) {
        if (g.exec) cudaGraphExecDestroy(g.exec);
        g = LLCopyGraph{};
      }
    }
    if (c.stream) cudaStreamDestroy(c.stream);
    if (c.packed) cudaEventDestroy(c.packed);
    c.stream = nullptr;
    c.packed = nullptr;
  }
}

unsigned long long LLCopyEngineSends(LLCopyEngines& engines) {
  std::lock_guard<std::mutex> lock(engines.mutex);
  return engines.calls;
}

namespace {

// Instantiates the copy graph of `buffer` (2 or 3) for bundles of `bytes` (see LLCopyEngines).
cudaError_t BuildCopyGraph(const LLCopyEngines& c, int buffer, size_t bytes,
                           cudaGraphExec_t* exec) {
  const int me = c.rank, R = c.num_ranks;
  auto at = [](LLWorkspace* w, int64_t off) { return reinterpret_cast<char*>(w) + off; };
  cudaGraph_t graph = nullptr;
  cudaError_t err = cudaGraphCreate(&graph, 0);
  for (int d = 0; d < R && err == cudaSuccess; ++d) {
    if (d == me) continue;
    cudaGraphNode_t data = nullptr, signal = nullptr;
    err = cudaGraphAddMemcpyNode1D(&data, graph, nullptr, 0,
                                   at(c.peers[d], LLInboxOffset(c.layout, R, buffer, me)),
                                   at(c.peers[me], LLOutboxOffset(c.layout, R, buffer, d)), bytes,
                                   cudaMemcpyDeviceToDevice);
    if (err != cudaSuccess) break;
    err = cudaGraphAddMemcpyNode1D(
        &signal, graph, &data, 1,
        &c.peers[d]->dispatch_arrived[buffer][me], &c.peers[me]->dispatch_uses[buffer],
        sizeof(unsigned long long), cudaMemcpyDeviceToDevice);
  }
  if (err == cudaSuccess) err = cudaGraphInstantiate(exec, graph, 0);
  if (graph) cudaGraphDestroy(graph);
  return err;
}

// The cached copy graph of `buffer` for `bytes`, instantiated on first use (replacing the
// oldest of that buffer's; a replaced graph still running is freed when it completes).
cudaError_t CopyGraph(LLCopyEngines& c, int buffer, size_t bytes, cudaGraphExec_t* exec) {
  const int set = buffer - kLLFirstCopyBuffer;
  for (const LLCopyGraph& g : c.graphs[set]) {
    if (g.exec && g.bytes == bytes) {
      *exec = g.exec;
      return cudaSuccess;
    }
  }
  cudaGraphExec_t made = nullptr;
  if (cudaError_t err = BuildCopyGraph(c, buffer, bytes, &made); err != cudaSuccess) return err;
  LLCopyGraph& slot = c.graphs[set][c.next_slot[set]];
  c.next_slot[set] = (c.next_slot[set] + 1) % kLLCopyGraphsPerBuffer;
  if (slot.exec) cudaGraphExecDestroy(slot.exec);
  slot = LLCopyGraph{bytes, made};
  *exec = made;
  return cudaSuccess;
}

}  // namespace

cudaError_t LaunchLLDispatchSend(const LLDispatchSendArgs& args, cudaStream_t stream,
                                 LLCopyEngines* engines) {
  LLDispatchSendArgs a = args;
  a.buffer = -1;  // an SM send
  if (!engines) return LaunchLLDispatchSendKernel(a, stream);

  // Everything that may fail comes before the kernel, which claims the call.
  LLCopyEngines& c = *engines;
  std::lock_guard<std::mutex> lock(c.mutex);
  a.buffer = kLLFirstCopyBuffer + static_cast<int>(c.calls & 1);
  const int elem = static_cast<int>(LLElemBytes(a.fp8, a.x_elem_bytes));
  const size_t bytes = static_cast<size_t>(LLBundleUsedBytes(
      c.layout.counts_bytes, a.num_tokens, c.layout.meta_ints, elem, a.shape.hidden));
  cudaGraphExec_t copies = nullptr;
  cudaError_t err = CopyGraph(c, a.buffer, bytes, &copies);
  if (err != cudaSuccess) return err;
  if ((err = LaunchLLDispatchSendKernel(a, stream)) != cudaSuccess) return err;

  // The copy graph on jaxep's stream, after the kernel.
  ++c.calls;  // the kernel has claimed the buffer: the next send takes the other one
  if ((err = cudaEventRecord(c.packed, stream)) != cudaSuccess) return err;
  if ((err = cudaStreamWaitEvent(c.stream, c.packed, 0)) != cudaSuccess) return err;
  return cudaGraphLaunch(copies, c.stream);
}

}  // namespace jaxep
