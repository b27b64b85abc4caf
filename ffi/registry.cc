#ifdef JAXEP_WITH_CUDA

#include "registry.h"

#include <map>
#include <memory>
#include <mutex>
#include <utility>

#include <cuda_runtime_api.h>

namespace jaxep {
namespace {

struct Group {
  std::vector<int> devices;
  std::vector<Workspace*> ws;
  std::vector<ErrorRecord*> errors;
  int max_tokens = 0;
  std::vector<LLWorkspace*> ll;  // empty when the low-latency buffers were not requested
  LLConfig ll_cfg;
  // Per rank, with ll and LLConfig::copy_engine; on the heap, as the handlers keep pointers
  // (LLCopyEngines holds a mutex: built in place, never copied).
  std::unique_ptr<LLCopyEngines[]> ll_ce;
};

std::mutex& Mutex() {
  static std::mutex m;
  return m;
}

struct State {
  std::map<int64_t, std::vector<Group>> live;
  std::vector<Group> retired;  // kept allocated until the process exits (see ReleaseCommunicator)
  int64_t next_id = 1;
};

State& Table() {
  static auto* t = new State();  // never destroyed
  return *t;
}

const char* PhaseName(int phase) {
  switch (phase) {
    case kDispatchStart: return "dispatch (start barrier)";
    case kDispatchEnd: return "dispatch (end barrier)";
    case kCombineStart: return "combine (start barrier)";
    case kCombineEnd: return "combine (end barrier)";
    case kRowsStart: return "dispatch along handle (start barrier)";
    case kRowsEnd: return "dispatch along handle (end barrier)";
    case kLLDispatchSend: return "ll_dispatch send (waiting for the destination to release its buffer)";
    case kLLDispatchRecv: return "ll_dispatch receive (waiting for the source's rows)";
    case kLLCombineSend: return "ll_combine send (waiting for the destination to release its buffer)";
    case kLLCombineRecv: return "ll_combine receive (waiting for the expert rank's rows)";
    case kLLCombineWeights: return "ll_combine send, pre-reduced (waiting for the source's top-k weights)";
    default: return "unknown phase";
  }
}

void Free(Group& g) {
  if (g.ll_ce) DestroyLLCopyEngines(static_cast<int>(g.devices.size()), g.devices.data(), g.ll_ce.get());
  if (!g.ll.empty()) {
    DestroyLLWorkspaces(static_cast<int>(g.devices.size()), g.devices.data(), g.ll.data());
  }
  DestroyWorkspaces(static_cast<int>(g.devices.size()), g.devices.data(), g.ws.data(),
                    g.errors.data());
}

}  // namespace

std::string RegisterCommunicator(const std::vector<std::vector<int>>& groups, int max_tokens,
                                 const LLConfig& ll, int64_t* id, size_t* bytes_per_device) {
  std::lock_guard<std::mutex> lock(Mutex());
  std::vector<Group> made;
  for (const auto& devices : groups) {
    const int n = static_cast<int>(devices.size());
    if (n < 1 || n > kMaxRanks) {
      for (auto& g : made) Free(g);
      return "an EP group must have 1.." + std::to_string(kMaxRanks) + " GPUs of this process, got " +
             std::to_string(n);
    }
    Group g{devices, std::vector<Workspace*>(n), std::vector<ErrorRecord*>(n), max_tokens, {},
            ll};
    cudaError_t err =
        CreateWorkspaces(n, g.devices.data(), max_tokens, g.ws.data(), g.errors.data());
    if (err != cudaSuccess) {
      for (auto& done : made) Free(done);
      return std::string("creating the intranode workspaces failed: ") + cudaGetErrorName(err) +
             ": " + cudaGetErrorString(err);
    }
    if (ll.enabled) {
      std::vector<ErrorRecord*> device_errors(n);
      for (int r = 0; r < n && err == cudaSuccess; ++r) {
        err = cudaHostGetDevicePointer(reinterpret_cast<void**>(&device_errors[r]), g.errors[r], 0);
      }
      g.ll.assign(n, nullptr);
      if (err == cudaSuccess) {
        err = CreateLLWorkspaces(n, g.devices.data(), max_tokens, ll.num_topk,
                                 ll.num_local_experts, ll.hidden, ll.copy_engine,
                                 device_errors.data(), g.ll.data());
        if (err != cudaSuccess) g.ll.clear();  // CreateLLWorkspaces freed them
      }
      if (err == cudaSuccess && ll.copy_engine) {
        g.ll_ce = std::make_unique<LLCopyEngines[]>(n);
        const LLLayout layout = ComputeLLLayout(n, max_tokens, ll.num_topk,
                                                ll.num_local_experts, ll.hidden, true);
        err = CreateLLCopyEngines(n, g.devices.data(), g.ll.data(), layout, g.ll_ce.get());
        if (err != cudaSuccess) g.ll_ce.reset();  // CreateLLCopyEngines cleaned up
      }
      if (err != cudaSuccess) {
        Free(g);
        for (auto& done : made) Free(done);
        return std::string("creating the low-latency buffers failed: ") + cudaGetErrorName(err) +
               ": " + cudaGetErrorString(err);
      }
    }
    made.push_back(std::move(g));
  }
  if (bytes_per_device && !groups.empty()) {
    const int n = static_cast<int>(groups[0].size());
    *bytes_per_device = WorkspaceBytes(n, max_tokens);
    if (ll.enabled) {
      *bytes_per_device +=
          LLWorkspaceBytes(n, max_tokens, ll.num_topk, ll.num_local_experts, ll.hidden,
                           ll.copy_engine);
    }
  }
  *id = Table().next_id++;
  Table().live[*id] = std::move(made);
  return "";
}

void ReleaseCommunicator(int64_t id) {
  std::lock_guard<std::mutex> lock(Mutex());
  auto it = Table().live.find(id);
  if (it == Table().live.end()) return;
  for (auto& g : it->second) Table().retired.push_back(std::move(g));
  Table().live.erase(it);
}

WorkspaceRef FindWorkspace(int64_t id, int device) {
  std::lock_guard<std::mutex> lock(Mutex());
  auto it = Table().live.find(id);
  if (it == Table().live.end()) return {};
  for (auto& g : it->second) {
    for (size_t r = 0; r < g.devices.size(); ++r) {
      if (g.devices[r] == device) {
        const int n = static_cast<int>(g.devices.size());
        return {g.ws[r], g.errors[r], static_cast<int>(r), n, g.max_tokens,
                g.ll.empty() ? nullptr : g.ll[r],
                LLShape{n, g.ll_cfg.num_local_experts, g.ll_cfg.hidden}, g.ll_cfg.num_topk,
                g.ll_ce ? &g.ll_ce[r] : nullptr};
      }
    }
  }
  return {};
}

std::string DescribeError(const ErrorRecord& e) {
  if (e.code == 0) return "";
  return "jaxep: rank " + std::to_string(e.rank) + " timed out waiting for peer " +
         std::to_string(e.peer) + " in " + PhaseName(e.phase) + " (barrier " +
         std::to_string(e.seq) + "); the peer never arrived: a crashed or stalled device, or "
         "mismatched calls across ranks";
}

std::string DescribeError(int64_t id) {
  std::lock_guard<std::mutex> lock(Mutex());
  auto it = Table().live.find(id);
  if (it == Table().live.end()) return "";
  for (const auto& g : it->second) {
    for (const ErrorRecord* e : g.errors) {
      if (std::string s = DescribeError(*e); !s.empty()) return s;
    }
  }
  return "";
}

}  // namespace jaxep

#endif  // JAXEP_WITH_CUDA
