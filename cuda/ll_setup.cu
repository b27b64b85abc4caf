// Low-latency workspaces, host side (see low_latency.h): the layout and sizes, and their
// creation (one process driving several GPUs), initialisation (one process per GPU, in
// symmetric memory that the caller allocated) and destruction.
#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "device_guard.h"
#include "ll_kernels.h"
#include "low_latency.h"

namespace jaxep {

LLLayout ComputeLLLayout(int num_ranks, int max_tokens, int num_topk, int num_local_experts,
                         int hidden, bool copy_engine, bool rdma, int relay_ranks) {
  auto up = [](int64_t n) { return (n + 255) & ~int64_t{255}; };
  LLLayout l{};
  l.slot_bytes = 4 * hidden;
  l.meta_ints = 1 + 2 * num_topk;
  l.counts_bytes = static_cast<int32_t>(LLAlign16(4 * int64_t{num_local_experts}));
  l.copy_engine = copy_engine ? 1 : 0;
  l.bundle_bytes = up(LLRowsOffset(l.counts_bytes, max_tokens, l.meta_ints) +
                      int64_t{max_tokens} * l.slot_bytes);
  const int64_t bundles = int64_t{num_ranks} * l.bundle_bytes;  // one buffer's
  const int inboxes = copy_engine ? kLLDispatchBuffers : kLLFirstCopyBuffer;
  const int outboxes = copy_engine ? kLLDispatchBuffers - kLLFirstCopyBuffer : 0;
  l.inbox_off = up(sizeof(LLWorkspace));
  l.outbox_off = l.inbox_off + inboxes * bundles;
  l.combine_slots = num_topk > num_ranks ? num_topk : num_ranks;
  l.combine_off = l.outbox_off + outboxes * bundles;
  l.weights_off = l.combine_off + up(2 * int64_t{max_tokens} * l.combine_slots * l.slot_bytes);
  l.staging_off = l.weights_off + up(2 * int64_t{num_ranks} * max_tokens * num_topk * 8);
  l.rdma = rdma ? 1 : 0;
  l.relay_ranks = rdma ? relay_ranks : 0;
  l.relay_off = l.staging_off;
  if (rdma) {
    l.relay_off += 2 * bundles + up(int64_t{num_ranks} * max_tokens * l.combine_slots *
                                    l.slot_bytes);
  }
  // A relay: [relay_ranks][counts] [T_max][relay_ranks][meta] [T_max] rows (LLRelay* below).
  l.relay_bytes = up(int64_t{l.relay_ranks} * l.counts_bytes +
                     LLAlign16(int64_t{max_tokens} * l.relay_ranks * l.meta_ints * 4) +
                     int64_t{max_tokens} * l.slot_bytes);
  l.total_bytes = l.relay_off + (l.relay_ranks ? 4 * int64_t{num_ranks} * l.relay_bytes : 0);
  return l;
}

size_t LLWorkspaceBytes(int num_ranks, int max_tokens, int num_topk, int num_local_experts,
                        int hidden, bool copy_engine, bool rdma, int relay_ranks) {
  return static_cast<size_t>(ComputeLLLayout(num_ranks, max_tokens, num_topk, num_local_experts,
                                             hidden, copy_engine, rdma, relay_ranks).total_bytes);
}

namespace {

// The constant header of rank `rank`'s workspace: sizes, layout and the peers' addresses as
// this rank sees them.
LLWorkspace LLHeader(int rank, int num_ranks, int max_tokens, int num_topk, int num_local_experts,
                     int hidden, const LLLayout& layout, ErrorRecord* error,
                     LLWorkspace* const* peers) {
  LLWorkspace h{};
  for (int p = 0; p < num_ranks; ++p) h.peers[p] = peers[p];
  h.error = error;
  h.rank = rank;
  h.num_ranks = num_ranks;
  h.max_tokens = max_tokens;
  h.num_topk = num_topk;
  h.num_local_experts = num_local_experts;
  h.hidden = hidden;
  h.layout = layout;
  return h;
}

bool LLSizesValid(int num_ranks, int max_tokens, int num_topk, int hidden) {
  return num_ranks >= 1 && num_ranks <= kMaxRanks && max_tokens >= 1 && num_topk >= 1 &&
         num_topk <= kLLMaxTopk && hidden % 16 == 0;
}

// Every kernel file's module, on the current device.
cudaError_t LoadLLModule() {
  if (cudaError_t e = LoadLLDispatchKernels(); e != cudaSuccess) return e;
  return LoadLLCombineKernels();
}

}  // namespace

cudaError_t CreateLLWorkspaces(int num_ranks, const int* devices, int max_tokens, int num_topk,
                               int num_local_experts, int hidden, bool copy_engine,
                               ErrorRecord* const* errors, LLWorkspace** workspaces) {
  if (!LLSizesValid(num_ranks, max_tokens, num_topk, hidden)) return cudaErrorInvalidValue;
  const DeviceGuard restore_device;
  for (int r = 0; r < num_ranks; ++r) workspaces[r] = nullptr;
  const LLLayout l =
      ComputeLLLayout(num_ranks, max_tokens, num_topk, num_local_experts, hidden, copy_engine);
  const size_t bytes = static_cast<size_t>(l.total_bytes);
  cudaError_t err = cudaSuccess;
  for (int r = 0; r < num_ranks && err == cudaSuccess; ++r) {
    if ((err = cudaSetDevice(devices[r])) != cudaSuccess) break;
    if ((err = cudaMalloc(&workspaces[r], bytes)) != cudaSuccess) break;
    if ((err = cudaMemset(workspaces[r], 0, bytes)) != cudaSuccess) break;
    err = LoadLLModule();
  }
  for (int r = 0; r < num_ranks && err == cudaSuccess; ++r) {
    const LLWorkspace h = LLHeader(r, num_ranks, max_tokens, num_topk, num_local_experts, hidden,
                                   l, errors[r], workspaces);
    if ((err = cudaSetDevice(devices[r])) == cudaSuccess) {
      err = cudaMemcpy(workspaces[r], &h, sizeof(h), cudaMemcpyHostToDevice);
    }
  }
  if (err != cudaSuccess) DestroyLLWorkspaces(num_ranks, devices, workspaces);
  return err;
}

cudaError_t InitProcessLLWorkspace(int device, int rank, int num_ranks, int max_tokens,
                                   int num_topk, int num_local_experts, int hidden,
                                   ErrorRecord* error, LLWorkspace* const* peers,
                                   int ranks_per_node, const int* pes, bool layered) {
  const int per_node = ranks_per_node > 0 && ranks_per_node < num_ranks ? ranks_per_node : 0;
  if (!LLSizesValid(num_ranks, max_tokens, num_topk, hidden) || rank < 0 || rank >= num_ranks ||
      (per_node && (num_ranks % per_node || !pes))) {
    return cudaErrorInvalidValue;
  }
  const uint32_t remote = RemoteRanks(rank, num_ranks, per_node);
  for (int p = 0; p < num_ranks; ++p) {
    if (!((remote >> p) & 1u) && !peers[p]) return cudaErrorInvalidValue;
  }
  layered = layered && per_node > 1;  // one rank per node: the relay is the destination
  const DeviceGuard restore_device;
  const LLLayout l = ComputeLLLayout(num_ranks, max_tokens, num_topk, num_local_experts, hidden,
                                     false, remote != 0, layered ? per_node : 0);
  cudaError_t err = cudaSetDevice(device);
  if (err == cudaSuccess) err = cudaMemset(peers[rank], 0, static_cast<size_t>(l.total_bytes));
  if (err == cudaSuccess) err = LoadLLModule();
  if (err == cudaSuccess) {
    LLWorkspace h = LLHeader(rank, num_ranks, max_tokens, num_topk, num_local_experts, hidden,
                             l, error, peers);
    h.remote = remote;
    for (int p = 0; p < num_ranks && remote; ++p) h.pe[p] = pes[p];
    h.ranks_per_node = per_node ? per_node : num_ranks;
    h.layered = layered ? 1 : 0;
    err = cudaMemcpy(peers[rank], &h, sizeof(h), cudaMemcpyHostToDevice);
  }
  if (err == cudaSuccess) err = cudaDeviceSynchronize();
  return err;
}

cudaError_t DestroyLLWorkspaces(int num_ranks, const int* devices, LLWorkspace** workspaces) {
  const DeviceGuard restore_device;
  cudaError_t first = cudaSuccess;
  for (int r = 0; r < num_ranks; ++r) {
    if (!workspaces[r] || cudaSetDevice(devices[r]) != cudaSuccess) continue;
    cudaError_t e = cudaDeviceSynchronize();
    e = e != cudaSuccess ? e : cudaFree(workspaces[r]);
    workspaces[r] = nullptr;
    if (first == cudaSuccess) first = e;
  }
  return first;
}

}  // namespace jaxep
