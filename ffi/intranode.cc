// XLA FFI handlers of the intranode normal-mode ops (one process, several GPUs):
//   jaxep_dispatch_ffi       -> jaxep::LaunchDispatch
//   jaxep_combine_ffi        -> jaxep::LaunchCombine
//   jaxep_dispatch_rows_ffi  -> jaxep::LaunchDispatchRows   (dispatch along a cached handle)
// Across nodes (one process per GPU) the same targets run through the relays (NormalRelay).
// Each handler finds its device's workspace in the registry (communicator id attribute + the
// device ordinal XLA passes), validates every buffer, and only enqueues work on the stream.
#ifdef JAXEP_WITH_CUDA

#include <cstddef>
#include <cstdint>
#include <string>

#include <cuda_runtime_api.h>

#include "attrs.h"
#include "checks.h"
#include "handlers.h"
#include "intranode.h"
#include "lookup.h"
#include "registry.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jaxep {
namespace {

ffi::Error DispatchImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer x,
                        ffi::AnyBuffer scales, ffi::Buffer<ffi::S32> topk_idx,
                        ffi::Buffer<ffi::F32> topk_weights, ffi::Buffer<ffi::S32> expert_rank,
                        ffi::Buffer<ffi::S32> expert_slot, ffi::Result<ffi::AnyBuffer> recv_x,
                        ffi::Result<ffi::AnyBuffer> recv_scales,
                        ffi::ResultBuffer<ffi::S32> recv_topk,
                        ffi::ResultBuffer<ffi::F32> recv_weights,
                        ffi::ResultBuffer<ffi::S32> src_index,
                        ffi::ResultBuffer<ffi::S32> send_slot,
                        ffi::ResultBuffer<ffi::S32> tokens_per_expert,
                        ffi::ResultBuffer<ffi::S32> meta, CommAttrs attrs) {
  const char* op = "dispatch";
  WorkspaceRef ref;
  JAXEP_RETURN_IF_ERROR(Lookup(op, attrs.comm_id, device, ref));
  const int64_t R = ref.num_ranks;
  auto idx_dims = topk_idx.dimensions();
  if (idx_dims.size() != 2) return Invalid(op, "topk_idx must be [T, K], got " + Dims(idx_dims));
  const int64_t T = idx_dims[0], K = idx_dims[1];
  const int64_t E = expert_rank.dimensions().size() == 1 ? expert_rank.dimensions()[0] : -1;
  const int64_t C = recv_x->dimensions().size() == 0 ? -1 : recv_x->dimensions()[0];
  JAXEP_RETURN_IF_ERROR(CheckTokens(op, T, ref));
  if (K > kMaxTopkIntranode) {
    return Invalid(op, "K must be <= " + std::to_string(kMaxTopkIntranode) + ", got " +
                           std::to_string(K));
  }
  if (E < 1 || E % R || E > kMaxExpertsIntranode) {
    return Invalid(op, "expert_rank must be [E] with E a multiple of R=" + std::to_string(R) +
                           " and at most " + std::to_string(kMaxExpertsIntranode) + ", got " +
                           Dims(expert_rank.dimensions()));
  }
  if (x.dimensions().size() == 0 || x.dimensions()[0] != T || scales.dimensions().size() == 0 ||
      scales.dimensions()[0] != T) {
    return Invalid(op, "x and scales must have T=" + std::to_string(T) + " rows, got " +
                           Dims(x.dimensions()) + " and " + Dims(scales.dimensions()));
  }
  if (C < 0 || recv_x->element_type() != x.element_type() ||
      RowBytes(*recv_x) != RowBytes(x) || recv_scales->dimensions().size() == 0 ||
      recv_scales->dimensions()[0] != C || RowBytes(*recv_scales) != RowBytes(scales)) {
    return Invalid(op, "recv_x / recv_scales must be x / scales with C rows, got " +
                           Dims(recv_x->dimensions()) + " / " + Dims(recv_scales->dimensions()));
  }
  JAXEP_RETURN_IF_ERROR(Shape(op, "topk_weights", topk_weights, {T, K}));
  JAXEP_RETURN_IF_ERROR(Shape(op, "expert_slot", expert_slot, {E}));
  JAXEP_RETURN_IF_ERROR(Shape(op, "recv_topk", *recv_topk, {C, K}));
  JAXEP_RETURN_IF_ERROR(Shape(op, "recv_weights", *recv_weights, {C, K}));
  JAXEP_RETURN_IF_ERROR(Shape(op, "src_index", *src_index, {C}));
  JAXEP_RETURN_IF_ERROR(Shape(op, "send_slot", *send_slot, {T, R}));
  JAXEP_RETURN_IF_ERROR(Shape(op, "tokens_per_expert", *tokens_per_expert, {E / R}));
  JAXEP_RETURN_IF_ERROR(Shape(op, "meta", *meta, {3}));

  DispatchArgs a{};
  a.ws = ref.ws;
  a.num_tokens = static_cast<int>(T);
  a.num_topk = static_cast<int>(K);
  a.num_experts = static_cast<int>(E);
  a.num_local_experts = static_cast<int>(E / R);
  a.capacity = static_cast<int>(C);
  a.topk_idx = topk_idx.typed_data();
  a.topk_weights = topk_weights.typed_data();
  a.expert_rank = expert_rank.typed_data();
  a.expert_slot = expert_slot.typed_data();
  a.x = x.untyped_data();
  a.x_row_bytes = static_cast<int>(RowBytes(x));
  a.s_row_bytes = static_cast<int>(RowBytes(scales));
  a.scales = a.s_row_bytes ? scales.untyped_data() : nullptr;
  a.recv_x = recv_x->untyped_data();
  a.recv_scales = a.s_row_bytes ? recv_scales->untyped_data() : nullptr;
  a.recv_topk = recv_topk->typed_data();
  a.recv_weights = recv_weights->typed_data();
  a.src_index = src_index->typed_data();
  a.send_slot = send_slot->typed_data();
  a.tokens_per_expert = tokens_per_expert->typed_data();
  a.meta = meta->typed_data();
  a.num_sms = attrs.num_sms;
  a.timeout_ns = static_cast<unsigned long long>(attrs.timeout_ns);
  if (ref.stage) {
    a.stage = ref.stage;
    a.stage_layout = DispatchStageLayout(T, a.x_row_bytes, a.s_row_bytes, K);
    JAXEP_RETURN_IF_ERROR(CheckStage(op, a.stage_layout, ref));
  }
  a.across_nodes = ref.ranks_per_node > 0;
  return LaunchStatus(op, LaunchDispatch(a, stream));
}

ffi::Error CombineImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer y,
                       ffi::Buffer<ffi::S32> send_slot, ffi::Result<ffi::AnyBuffer> out,
                       CommAttrs attrs) {
  const char* op = "combine";
  WorkspaceRef ref;
  JAXEP_RETURN_IF_ERROR(Lookup(op, attrs.comm_id, device, ref));
  const auto type = y.element_type();
  const int elem = RowElemBytes(type);
  if (elem != 2 && elem != 4) return Invalid(op, "y must be bfloat16 or float32");
  auto slot_dims = send_slot.dimensions();
  if (slot_dims.size() != 2 || slot_dims[1] != ref.num_ranks) {
    return Invalid(op, "send_slot must be [T, R=" + std::to_string(ref.num_ranks) + "], got " +
                           Dims(slot_dims));
  }
  const int64_t T = slot_dims[0];
  const int64_t C = y.dimensions().size() == 0 ? 0 : y.dimensions()[0];
  const int64_t row_elems = C ? static_cast<int64_t>(y.element_count()) / C : 0;
  if (out->element_type() != type || out->dimensions().size() == 0 || out->dimensions()[0] != T ||
      static_cast<int64_t>(out->element_count()) != T * row_elems) {
    return Invalid(op, "out must be y's rows for T=" + std::to_string(T) + " tokens, got " +
                           Dims(out->dimensions()) + " for y " + Dims(y.dimensions()));
  }
  CombineArgs a{};
  a.ws = ref.ws;
  a.num_tokens = static_cast<int>(T);
  a.row_elems = static_cast<int>(row_elems);
  a.elem_bytes = elem;
  a.y = y.untyped_data();
  a.send_slot = send_slot.typed_data();
  a.out = out->untyped_data();
  a.num_sms = attrs.num_sms;
  a.timeout_ns = static_cast<unsigned long long>(attrs.timeout_ns);
  if (ref.stage) {
    a.stage = ref.stage;
    a.stage_layout = RowsStageLayout(C, static_cast<int64_t>(y.size_bytes()) / (C ? C : 1));
    JAXEP_RETURN_IF_ERROR(CheckStage(op, a.stage_layout, ref));
  }
  a.across_nodes = ref.ranks_per_node > 0;
  JAXEP_RETURN_IF_ERROR(CheckTokens(op, T, ref));
  // Across nodes a token's partial sum is a float32 row in the relay, sized for `hidden`.
  if (a.across_nodes && row_elems > ref.ll_shape.hidden) {
    return Invalid(op, "across nodes a row may have at most hidden=" +
                           std::to_string(ref.ll_shape.hidden) + " elements, got " +
                           std::to_string(row_elems));
  }
  return LaunchStatus(op, LaunchCombine(a, stream));
}

ffi::Error DispatchRowsImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer rows,
                            ffi::Buffer<ffi::S32> src_index, ffi::Buffer<ffi::S32> send_slot,
                            ffi::Result<ffi::AnyBuffer> out, CommAttrs attrs) {
  const char* op = "dispatch_rows";
  WorkspaceRef ref;
  JAXEP_RETURN_IF_ERROR(Lookup(op, attrs.comm_id, device, ref));
  if (src_index.dimensions().size() != 1 || rows.dimensions().size() == 0) {
    return Invalid(op, "src_index must be [C] and rows [T, ...], got " +
                           Dims(src_index.dimensions()) + " and " + Dims(rows.dimensions()));
  }
  const int64_t C = src_index.dimensions()[0], T = rows.dimensions()[0];
  JAXEP_RETURN_IF_ERROR(CheckTokens(op, T, ref));
  if (out->element_type() != rows.element_type() || out->dimensions().size() == 0 ||
      out->dimensions()[0] != C || RowBytes(*out) != RowBytes(rows)) {
    return Invalid(op, "out must be rows' rows for C=" + std::to_string(C) + ", got " +
                           Dims(out->dimensions()) + " for rows " + Dims(rows.dimensions()));
  }
  DispatchRowsArgs a{};
  a.ws = ref.ws;
  a.num_tokens = static_cast<int>(T);
  a.capacity = static_cast<int>(C);
  a.row_bytes = static_cast<int>(RowBytes(rows));
  a.rows = rows.untyped_data();
  a.src_index = src_index.typed_data();
  a.send_slot = send_slot.typed_data();
  a.out = out->untyped_data();
  a.num_sms = attrs.num_sms;
  a.timeout_ns = static_cast<unsigned long long>(attrs.timeout_ns);
  if (ref.stage) {
    a.stage = ref.stage;
    a.stage_layout = RowsStageLayout(T, a.row_bytes);
    JAXEP_RETURN_IF_ERROR(CheckStage(op, a.stage_layout, ref));
  }
  // Across nodes send_slot says which nodes need which rows; within one it may be [0, R].
  a.across_nodes = ref.ranks_per_node > 0;
  const int64_t slot_rows = a.across_nodes ? T : 0;
  auto slot_dims = send_slot.dimensions();
  if (slot_dims.size() != 2 || slot_dims[1] != ref.num_ranks ||
      (slot_dims[0] != T && slot_dims[0] != slot_rows)) {
    return Invalid(op, "send_slot must be [T=" + std::to_string(T) + ", R=" +
                           std::to_string(ref.num_ranks) + "]" +
                           (a.across_nodes ? "" : " or [0, R]") + ", got " + Dims(slot_dims));
  }
  return LaunchStatus(op, LaunchDispatchRows(a, stream));
}

}  // namespace
}  // namespace jaxep

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxepDispatchFfi, jaxep::DispatchImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::AnyBuffer>()              // x [T, ...]
                                  .Arg<ffi::AnyBuffer>()              // scales [T, G] (G may be 0)
                                  .Arg<ffi::Buffer<ffi::S32>>()       // topk_idx [T, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()       // topk_weights [T, K]
                                  .Arg<ffi::Buffer<ffi::S32>>()       // expert_rank [E]
                                  .Arg<ffi::Buffer<ffi::S32>>()       // expert_slot [E]
                                  .Ret<ffi::AnyBuffer>()              // recv_x [C, ...]
                                  .Ret<ffi::AnyBuffer>()              // recv_scales [C, G]
                                  .Ret<ffi::Buffer<ffi::S32>>()       // recv_topk [C, K]
                                  .Ret<ffi::Buffer<ffi::F32>>()       // recv_weights [C, K]
                                  .Ret<ffi::Buffer<ffi::S32>>()       // src_index [C]
                                  .Ret<ffi::Buffer<ffi::S32>>()       // send_slot [T, R]
                                  .Ret<ffi::Buffer<ffi::S32>>()       // tokens_per_expert [E_l]
                                  .Ret<ffi::Buffer<ffi::S32>>()       // meta [3]
                                  .Attrs<jaxep::CommAttrs>(),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxepCombineFfi, jaxep::CombineImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::AnyBuffer>()         // y [C, ...]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // send_slot [T, R]
                                  .Ret<ffi::AnyBuffer>()         // out [T, ...]
                                  .Attrs<jaxep::CommAttrs>(),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxepDispatchRowsFfi, jaxep::DispatchRowsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::AnyBuffer>()         // rows [T, ...]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // src_index [C]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // send_slot [T, R] or [0, R]
                                  .Ret<ffi::AnyBuffer>()         // out [C, ...]
                                  .Attrs<jaxep::CommAttrs>(),
                              {ffi::Traits::kCmdBufferCompatible});

#endif  // JAXEP_WITH_CUDA
