// nanobind module jaxep._jaxep_ext: exposes the XLA FFI handlers to Python.
//   has_cuda()      -> bool: whether the CUDA kernels were compiled in
//   registrations() -> dict[str, capsule]: FFI target name -> handler, for
//                      jax.ffi.register_ffi_target(name, capsule, platform="CUDA");
//                      empty without CUDA.
//   intranode_create(groups, max_tokens) -> (id, bytes per device)  (CUDA builds)
//   process_region_bytes(...), process_create(...) -> (id, bytes)  (one process per GPU)
//   intranode_release(id), intranode_error(id) -> str ("" when none), first_error() -> (id, str)
//   ll_copy_engine_sends(id, device) -> copy-engine dispatch sends enqueued so far
//   ll_workspace_bytes(...), ll_shared_bytes(...): sizes of the low-latency buffers / kernels
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <stdexcept>

#include "handlers.h"
#ifdef JAXEP_WITH_CUDA
#include "layout.h"
#endif
#include "registry.h"
#include "grouped.h"
#ifdef JAXEP_WITH_CUDA
#include "ll_copy_engines.h"  // LLCopyEngineSends
#include "rdma.h"              // NvshmemDeviceLinked
#endif

namespace nb = nanobind;

namespace {

template <typename Fn>
nb::capsule Encapsulate(Fn* fn) {
  return nb::capsule(reinterpret_cast<void*>(fn));
}

#ifdef JAXEP_WITH_CUDA
// The buffers of one rank of a process-per-GPU group of n ranks: across nodes when
// ranks_per_node is in (0, n) (the staging area, the normal-mode relay), layered where a node
// has 2+ ranks and `layered` asks for it. process_region_bytes and process_create agree on it.
jaxep::LLConfig ProcessConfig(int n, bool low_latency, int num_topk, int num_local_experts,
                              int hidden, int ranks_per_node, bool layered) {
  const bool rdma = ranks_per_node > 0 && ranks_per_node < n;
  const int relay = rdma && layered && ranks_per_node > 1 ? ranks_per_node : 0;
  return jaxep::LLConfig{low_latency, num_topk, num_local_experts, hidden,
                         false,       rdma,     relay,             rdma ? ranks_per_node : 0};
}
#endif

}  // namespace

NB_MODULE(_jaxep_ext, m) {
  m.doc() = "jaxep compiled extension: XLA FFI handlers for the CUDA backend.";

  m.def(
      "has_cuda",
      []() {
#ifdef JAXEP_WITH_CUDA
        return true;
#else
        return false;
#endif
      },
      "True if the CUDA kernels and their FFI handlers were compiled in.");

  m.def(
      "registrations",
      []() {
        nb::dict d;
#ifdef JAXEP_WITH_CUDA
        d["jaxep_dispatch_layout_ffi"] = Encapsulate(JaxepDispatchLayoutFfi);
        d["jaxep_dispatch_ffi"] = Encapsulate(JaxepDispatchFfi);
        d["jaxep_combine_ffi"] = Encapsulate(JaxepCombineFfi);
        d["jaxep_dispatch_rows_ffi"] = Encapsulate(JaxepDispatchRowsFfi);
        d["jaxep_dispatch_grouped_ffi"] = Encapsulate(JaxepDispatchGroupedFfi);
        d["jaxep_combine_grouped_ffi"] = Encapsulate(JaxepCombineGroupedFfi);
        d["jaxep_grouped_entries_ffi"] = Encapsulate(JaxepGroupedEntriesFfi);
        d["jaxep_ll_dispatch_send_ffi"] = Encapsulate(JaxepLLDispatchSendFfi);
        d["jaxep_ll_dispatch_send_ce_ffi"] = Encapsulate(JaxepLLDispatchSendCeFfi);
        d["jaxep_ll_dispatch_recv_ffi"] = Encapsulate(JaxepLLDispatchRecvFfi);
        d["jaxep_ll_dispatch_ffi"] = Encapsulate(JaxepLLDispatchFfi);
        d["jaxep_ll_combine_send_ffi"] = Encapsulate(JaxepLLCombineSendFfi);
        d["jaxep_ll_combine_send_reduced_ffi"] = Encapsulate(JaxepLLCombineSendReducedFfi);
        d["jaxep_ll_combine_recv_ffi"] = Encapsulate(JaxepLLCombineRecvFfi);
        d["jaxep_ll_combine_ffi"] = Encapsulate(JaxepLLCombineFfi);
#endif
        return d;
      },
      "Mapping of FFI target name -> handler capsule (platform CUDA); empty without CUDA.");

#ifdef JAXEP_WITH_CUDA
  m.def(
      "limits",
      []() {
        nb::dict d;
        d["max_ranks"] = jaxep::kMaxRanks;
        d["max_topk"] = jaxep::kMaxTopkIntranode;
        d["max_experts"] = jaxep::kMaxExpertsIntranode;
        d["grouped_max_local_experts"] = jaxep::kMaxGroupedExperts;
        d["layout_max_ranks"] = jaxep::kLayoutMaxRanks;
        d["layout_max_experts"] = jaxep::kLayoutMaxExperts;
        d["ll_max_topk"] = jaxep::kLLMaxTopk;
        return d;
      },
      "The kernels' compile-time limits (EP group size, K, E, ...), by name.");
  m.def(
      "intranode_create",
      [](const std::vector<std::vector<int>>& groups, int max_tokens, bool low_latency,
         int num_topk, int num_local_experts, int hidden, bool copy_engine) {
        size_t bytes = 0;
        int64_t id = 0;
        jaxep::LLConfig ll{low_latency, num_topk, num_local_experts, hidden, copy_engine};
        std::string err = jaxep::RegisterCommunicator(groups, max_tokens, ll, &id, &bytes);
        if (!err.empty()) throw std::runtime_error(err);
        return nb::make_tuple(id, bytes);
      },
      nb::arg("groups"), nb::arg("max_tokens"), nb::arg("low_latency") = false,
      nb::arg("num_topk") = 0, nb::arg("num_local_experts") = 0, nb::arg("hidden") = 0,
      nb::arg("copy_engine") = false,
      "Allocate the intranode workspaces of a new communicator (groups[g][r] = device ordinal "
      "of rank r of EP group g), with the low-latency buffers when `low_latency` (and those of "
      "copy-engine sends when `copy_engine`); returns (id, bytes allocated per device).");
  m.def(
      "process_region_bytes",
      [](int num_ranks, int max_tokens, int capacity, bool low_latency, int num_topk,
         int num_local_experts, int hidden, int ranks_per_node, bool layered) {
        const jaxep::LLConfig ll = ProcessConfig(num_ranks, low_latency, num_topk,
                                                 num_local_experts, hidden, ranks_per_node,
                                                 layered);
        return jaxep::ProcessRegionLayout(num_ranks, max_tokens, capacity, ll).total;
      },
      nb::arg("num_ranks"), nb::arg("max_tokens"), nb::arg("capacity"), nb::arg("low_latency"),
      nb::arg("num_topk"), nb::arg("num_local_experts"), nb::arg("hidden"),
      nb::arg("ranks_per_node") = 0, nb::arg("layered") = false,
      "Bytes of one rank's symmetric region (one process per GPU): the same on every rank. "
      "ranks_per_node in (0, num_ranks): the group spans nodes (the low-latency staging area "
      "and the normal-mode relay are included); layered: with the layered dispatch's relays.");
  m.def(
      "process_create",
      [](int device, int rank, const std::vector<uint64_t>& bases, int max_tokens, int capacity,
         bool low_latency, int num_topk, int num_local_experts, int hidden, int ranks_per_node,
         const std::vector<int>& pes, bool layered) {
        const int n = static_cast<int>(bases.size());
        const jaxep::LLConfig ll = ProcessConfig(n, low_latency, num_topk, num_local_experts,
                                                 hidden, ranks_per_node, layered);
        std::vector<uintptr_t> b(bases.begin(), bases.end());
        int64_t id = 0;
        std::string err = jaxep::RegisterProcessRank(device, rank, b, max_tokens, capacity, ll,
                                                     &id, pes);
        if (!err.empty()) throw std::runtime_error(err);
        return nb::make_tuple(id, jaxep::ProcessRegionLayout(n, max_tokens, capacity, ll).total);
      },
      nb::arg("device"), nb::arg("rank"), nb::arg("bases"), nb::arg("max_tokens"),
      nb::arg("capacity"), nb::arg("low_latency"), nb::arg("num_topk"),
      nb::arg("num_local_experts"), nb::arg("hidden"), nb::arg("ranks_per_node") = 0,
      nb::arg("pes") = std::vector<int>{}, nb::arg("layered") = false,
      "Register this process's rank of an EP group spanning processes (one GPU each): bases[p] "
      "is rank p's symmetric region as this process addresses it (0 for a rank in another "
      "node); ranks_per_node in (0, n): the group spans nodes, pes[p] is rank p's NVSHMEM PE, "
      "layered: the low-latency dispatch relays rows once per node (nodes of 2+ ranks); "
      "returns (id, bytes per rank).");
  m.def("nvshmem_device_linked", &jaxep::NvshmemDeviceLinked,
        "True when the kernels were built with NVSHMEM's device library (internode paths).");
  m.def(
      "ll_workspace_bytes",
      [](int num_ranks, int max_tokens, int num_topk, int num_local_experts, int hidden,
         bool copy_engine, bool rdma, int relay_ranks) {
        return jaxep::LLWorkspaceBytes(num_ranks, max_tokens, num_topk, num_local_experts,
                                       hidden, copy_engine, rdma, relay_ranks);
      },
      nb::arg("num_ranks"), nb::arg("max_tokens"), nb::arg("num_topk"),
      nb::arg("num_local_experts"), nb::arg("hidden"), nb::arg("copy_engine") = false,
      nb::arg("rdma") = false, nb::arg("relay_ranks") = 0,
      "Bytes per device of the low-latency buffers for these sizes (rdma: across nodes, with "
      "the staging area; relay_ranks: the layered dispatch's relays).");
  m.def(
      "ll_shared_bytes",
      [](int num_ranks, int max_tokens, int num_topk, int num_experts) {
        const size_t send = jaxep::LLSendSharedBytes(max_tokens, num_topk, num_experts);
        const size_t recv = jaxep::LLRecvSharedBytes(num_ranks, num_experts / num_ranks);
        return nb::make_tuple(send > recv ? send : recv, jaxep::kLLMaxSharedBytes);
      },
      "(shared memory the low-latency kernels need, the limit) for these sizes.");
  m.def(
      "intranode_release", [](int64_t id) { jaxep::ReleaseCommunicator(id); },
      "Retire communicator `id` (its memory stays allocated until the process exits).");
  m.def(
      "intranode_error", [](int64_t id) { return jaxep::DescribeError(id); },
      "A recorded kernel failure of communicator `id` (e.g. a barrier timeout), or ''.");
  m.def(
      "first_error",
      []() {
        int64_t id = 0;
        std::string msg = jaxep::FirstError(&id);
        return nb::make_tuple(id, msg);
      },
      "(id, message) of the first recorded kernel failure of any live communicator, or (0, '').");
  m.def(
      "ll_copy_engine_sends",
      [](int64_t id, int device) -> int64_t {
        const jaxep::WorkspaceRef ref = jaxep::FindWorkspace(id, device);
        return ref.ll_ce ? static_cast<int64_t>(jaxep::LLCopyEngineSends(*ref.ll_ce)) : -1;
      },
      "Copy-engine dispatch sends enqueued so far on `device` by communicator `id` (-1: none).");
#endif
}
