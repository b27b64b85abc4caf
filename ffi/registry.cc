#ifdef JAXEP_WITH_CUDA

#include "registry.h"

#include <map>
#include <memory>
#include <mutex>
#include <utility>

#include <cuda_runtime_api.h>

#include "ll_copy_engines.h"
#include "rdma.h"

namespace jaxep {
namespace {

struct Group {
  std::vector<int> devices;  // this process's devices of the group
  std::vector<int> ranks;    // their ranks (0..n-1 in one process)
  int num_ranks = 0;
  bool external = false;     // one process per GPU: the memory is the caller's symmetric region
  char* stage = nullptr;     // with `external`: this rank's stage
  size_t stage_bytes = 0;
  std::vector<Workspace*> ws;
  std::vector<ErrorRecord*> errors;
  int max_tokens = 0;
  std::vector<LLWorkspace*> ll;  // empty when the low-latency buffers were not requested
  LLConfig ll_cfg;
  int ranks_per_node = 0;  // one process per GPU across nodes: ranks p, q share a node when
                           // p / ranks_per_node == q / ranks_per_node (0: one node)
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
    case kCombineForward: return "combine forward (barrier after the partial sums of other nodes)";
    case kRowsStart: return "dispatch along handle (start barrier)";
    case kRowsEnd: return "dispatch along handle (end barrier)";
    case kGroupedStart: return "dispatch_grouped (start barrier)";
    case kGroupedEnd: return "dispatch_grouped (end barrier)";
    case kGroupedCombineStart: return "combine_grouped (start barrier)";
    case kGroupedCombinePartials: return "combine_grouped (partial rows barrier)";
    case kGroupedCombineEnd: return "combine_grouped (end barrier)";
    case kGroupedEntriesStart: return "dispatch_grouped weight gradient (start barrier)";
    case kGroupedEntriesEnd: return "dispatch_grouped weight gradient (end barrier)";
    case kLLDispatchSend: return "ll_dispatch send (waiting for the destination to release its buffer)";
    case kLLDispatchRecv: return "ll_dispatch receive (waiting for the source's rows)";
    case kLLCombineSend: return "ll_combine send (waiting for the destination to release its buffer)";
    case kLLCombineRecv: return "ll_combine receive (waiting for the expert rank's rows)";
    case kLLCombineWeights: return "ll_combine send, pre-reduced (waiting for the source's top-k weights)";
    case kLLDispatchForward: return "ll_dispatch forward, layered (waiting for the source's relayed rows)";
    default: return "unknown phase";
  }
}

void Free(Group& g) {
  if (g.external) {  // only the host-mapped error records are ours
    for (ErrorRecord* e : g.errors) cudaFreeHost(e);
    return;
  }
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
    Group g;
    g.devices = devices;
    for (int r = 0; r < n; ++r) g.ranks.push_back(r);
    g.num_ranks = n;
    g.ws.assign(n, nullptr);
    g.errors.assign(n, nullptr);
    g.max_tokens = max_tokens;
    g.ll_cfg = ll;
    cudaError_t err =
        CreateWorkspaces(n, g.devices.data(), max_tokens, ll.num_topk, g.ws.data(),
                         g.errors.data());
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
    *bytes_per_device = WorkspaceBytes(n, max_tokens, ll.num_topk);
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

ProcessRegion ProcessRegionLayout(int num_ranks, int max_tokens, int capacity, const LLConfig& ll) {
  auto up = [](size_t n) { return (n + 4095) & ~size_t{4095}; };
  ProcessRegion p;
  p.workspace_off = 0;
  p.stage_off = up(WorkspaceBytes(num_ranks, max_tokens, ll.num_topk));
  p.stage_bytes = StageBytes(num_ranks, max_tokens, capacity, ll.num_topk, ll.hidden);
  p.ll_off = up(p.stage_off + p.stage_bytes);
  p.total = p.ll_off;
  if (ll.enabled) {
    p.total += up(LLWorkspaceBytes(num_ranks, max_tokens, ll.num_topk, ll.num_local_experts,
                                   ll.hidden, false, ll.rdma, ll.relay_ranks));
  }
  p.relay_off = p.total;
  if (ll.rdma) {
    p.relay = NormalRelayLayout(num_ranks, ll.ranks_per_node, max_tokens, ll.hidden,
                                p.stage_bytes);
    p.total += up(static_cast<size_t>(p.relay.bytes));
  }
  return p;
}

std::string RegisterProcessRank(int device, int rank, const std::vector<uintptr_t>& bases,
                                int max_tokens, int capacity, const LLConfig& ll, int64_t* id,
                                const std::vector<int>& pes) {
  const int n = static_cast<int>(bases.size());
  if (n < 1 || n > kMaxRanks || rank < 0 || rank >= n) {
    return "an EP group across processes must have 1.." + std::to_string(kMaxRanks) +
           " ranks with this process's rank among them, got rank " + std::to_string(rank) +
           " of " + std::to_string(n);
  }
  if (ll.copy_engine) return "copy-engine low-latency sends are not available across processes";
  const int per_node = ll.rdma && ll.ranks_per_node > 0 ? ll.ranks_per_node : n;
  if (n % per_node != 0) {
    return "ranks_per_node must divide the EP group's " + std::to_string(n) + " ranks, got " +
           std::to_string(per_node);
  }
  const uint32_t remote = RemoteRanks(rank, n, per_node);
  if (ll.relay_ranks != 0 && (remote == 0 || ll.relay_ranks != per_node || per_node < 2)) {
    return "the layered dispatch needs an EP group across nodes of 2 or more ranks (relay "
           "width " + std::to_string(ll.relay_ranks) + ", " + std::to_string(per_node) +
           " ranks per node)";
  }
  if (remote != 0) {
    if (static_cast<int>(pes.size()) != n) {
      return "an EP group across nodes needs every rank's NVSHMEM PE: got " +
             std::to_string(pes.size()) + " for " + std::to_string(n) + " ranks";
    }
    if (std::string e = InitNvshmemDevice(); !e.empty()) {
      return "initialising NVSHMEM's device state for the internode kernels failed: " + e;
    }
  }
  const ProcessRegion region = ProcessRegionLayout(n, max_tokens, capacity, ll);
  Workspace* peers[kMaxRanks] = {};
  const char* stages[kMaxRanks] = {};
  LLWorkspace* ll_peers[kMaxRanks] = {};
  for (int p = 0; p < n; ++p) {
    char* base = reinterpret_cast<char*>(bases[p]);
    if (!base && ((remote >> p) & 1u)) continue;  // reached with puts only
    if (!base) return "rank " + std::to_string(p) + "'s region is not addressable from rank " +
                      std::to_string(rank);
    peers[p] = reinterpret_cast<Workspace*>(base + region.workspace_off);
    stages[p] = base + region.stage_off;
    ll_peers[p] = reinterpret_cast<LLWorkspace*>(base + region.ll_off);
  }
  // Across nodes: the normal-mode relay. Source s of another node puts into its slot at the
  // rank of my node on its rail.
  NormalRelay relay{};
  if (remote) {
    const RelayLayout& l = region.relay;
    auto relay_of = [&](int p) { return reinterpret_cast<char*>(bases[p]) + region.relay_off; };
    relay.mine = relay_of(rank);
    for (int s = 0; s < n; ++s) {
      relay.pe[s] = pes[s];
      if (!((remote >> s) & 1u)) continue;
      const int rail = (rank / per_node) * per_node + s % per_node;
      relay.in[s] = relay_of(rail) + (s / per_node) * l.slot_bytes;
    }
    relay.pos_off = l.pos_off;
    relay.data_off = l.data_off;
    relay.partial_off = l.partial_off;
    relay.slot_bytes = l.slot_bytes;
    relay.remote = remote;
    relay.ranks_per_node = per_node;
  }
  std::lock_guard<std::mutex> lock(Mutex());
  Group g;
  g.devices = {device};
  g.ranks = {rank};
  g.num_ranks = n;
  g.external = true;
  g.max_tokens = max_tokens;
  g.ll_cfg = ll;
  g.ranks_per_node = remote ? per_node : 0;
  g.ws = {peers[rank]};
  g.stage = const_cast<char*>(stages[rank]);
  g.stage_bytes = region.stage_bytes;
  g.errors = {nullptr};
  cudaError_t err = InitProcessWorkspace(device, rank, n, max_tokens, ll.num_topk, peers, stages,
                                         remote ? &relay : nullptr, &g.errors[0]);
  if (err != cudaSuccess) {
    return std::string("initialising the process-per-GPU workspace failed: ") +
           cudaGetErrorName(err) + ": " + cudaGetErrorString(err);
  }
  if (ll.enabled) {
    ErrorRecord* device_error = nullptr;
    err = cudaHostGetDevicePointer(reinterpret_cast<void**>(&device_error), g.errors[0], 0);
    if (err == cudaSuccess) {
      err = InitProcessLLWorkspace(device, rank, n, max_tokens, ll.num_topk, ll.num_local_experts,
                                   ll.hidden, device_error, ll_peers, remote ? per_node : 0,
                                   pes.data(), ll.relay_ranks > 0);
    }
    if (err != cudaSuccess) {
      Free(g);
      return std::string("initialising the process-per-GPU low-latency buffers failed: ") +
             cudaGetErrorName(err) + ": " + cudaGetErrorString(err);
    }
    g.ll = {ll_peers[rank]};
  }
  *id = Table().next_id++;
  std::vector<Group> groups;
  groups.push_back(std::move(g));
  Table().live[*id] = std::move(groups);
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
        const int n = g.num_ranks;
        return {g.ws[r], g.errors[r], g.ranks[r], n, g.max_tokens,
                g.ll.empty() ? nullptr : g.ll[r],
                LLShape{n, g.ll_cfg.num_local_experts, g.ll_cfg.hidden,
                        g.ll_cfg.relay_ranks > 0},
                g.ll_cfg.num_topk,
                g.ll_ce ? &g.ll_ce[r] : nullptr, g.stage, g.stage_bytes, g.ll_cfg.num_topk,
                g.ranks_per_node};
      }
    }
  }
  return {};
}

std::string DescribeError(const ErrorRecord& e, int ranks_per_node) {
  if (e.code == 0) return "";
  auto node = [&](int r) {
    return ranks_per_node > 0 ? " (node " + std::to_string(r / ranks_per_node) + ")" : "";
  };
  const std::string via =
      e.via >= 0 ? " via rank " + std::to_string(e.via) + node(e.via) : std::string();
  return "jaxep: rank " + std::to_string(e.rank) + node(e.rank) + " timed out waiting for peer " +
         std::to_string(e.peer) + node(e.peer) + via + " in " + PhaseName(e.phase) + " (barrier " +
         std::to_string(e.seq) + "); the peer never arrived: a crashed or stalled device, or "
         "mismatched calls across ranks";
}

std::string FirstError(int64_t* id) {
  std::lock_guard<std::mutex> lock(Mutex());
  for (const auto& [comm, groups] : Table().live) {
    for (const auto& g : groups) {
      for (const ErrorRecord* e : g.errors) {
        if (std::string s = DescribeError(*e, g.ranks_per_node); !s.empty()) {
          *id = comm;
          return s;
        }
      }
    }
  }
  return "";
}

std::string DescribeError(int64_t id) {
  std::lock_guard<std::mutex> lock(Mutex());
  auto it = Table().live.find(id);
  if (it == Table().live.end()) return "";
  for (const auto& g : it->second) {
    for (const ErrorRecord* e : g.errors) {
      if (std::string s = DescribeError(*e, g.ranks_per_node); !s.empty()) return s;
    }
  }
  return "";
}

}  // namespace jaxep

#endif  // JAXEP_WITH_CUDA
