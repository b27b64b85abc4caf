// XLA FFI handlers of the low-latency dispatch ops (one process, several GPUs):
//   jaxep_ll_dispatch_send_ffi -> jaxep::LaunchLLDispatchSend (SM send)
//   jaxep_ll_dispatch_send_ce_ffi -> jaxep::LaunchLLDispatchSend (copy-engine send)
//   jaxep_ll_dispatch_recv_ffi -> jaxep::LaunchLLDispatchRecv
//   jaxep_ll_dispatch_ffi      -> jaxep::LaunchLLDispatch (both phases, one kernel)
// Each finds its device's low-latency buffers in the registry, validates every buffer against
// them, and only enqueues one kernel (a copy-engine dispatch send also its copies, on jaxep's
// streams). A send returns a small `info` array that its recv takes as an operand: the data
// dependency orders the two phases in XLA's schedule.
#ifdef JAXEP_WITH_CUDA

#include <cstdint>
#include <string>
#include <utility>

#include <cuda_runtime_api.h>

#include "attrs.h"
#include "checks.h"
#include "handlers.h"
#include "ll_common.h"
#include "lookup.h"
#include "low_latency.h"
#include "registry.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jaxep {
namespace {

// The attributes of each dispatch target: CommAttrs, then the target's own (JAXEP_REGISTER_ATTRS
// below lists them by name, in this order).
struct LLDispatchSendAttrs {  // jaxep_ll_dispatch_send_ffi and jaxep_ll_dispatch_send_ce_ffi
  CommAttrs comm;
  bool fp8, round_scale;
  bool copy_engine;  // true exactly for the copy-engine target
};
struct LLDispatchRecvAttrs {  // jaxep_ll_dispatch_recv_ffi
  CommAttrs comm;
  bool ue8m0, zero_padding, weighted;
};
struct LLDispatchAttrs {  // jaxep_ll_dispatch_ffi
  CommAttrs comm;
  bool fp8, round_scale, ue8m0, zero_padding;
};

// The copy-engine state of a send that asks for it (else null). Its copies must be enqueued by
// the host on every call: its FFI target is not command-buffer compatible, and should a capture
// take it anyway, it runs as an SM send.
ffi::Error CopyEngines(const char* op, bool requested, cudaStream_t stream,
                       const WorkspaceRef& ref, LLCopyEngines** engines) {
  *engines = nullptr;
  if (!requested) return ffi::Error::Success();
  if (!ref.ll_ce) {
    return Invalid(op, "this communicator has no copy-engine buffers (EPConfig.ll_copy_engine)");
  }
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  JAXEP_RETURN_IF_ERROR(LaunchStatus(op, cudaStreamIsCapturing(stream, &status)));
  if (status == cudaStreamCaptureStatusNone) *engines = ref.ll_ce;
  return ffi::Error::Success();
}

// Validates the operands of a dispatch send (weights: null or [T, K]) and fills its launch
// arguments, but for info and buffer.
ffi::Error DispatchSendArgs(const char* op, const WorkspaceRef& ref, ffi::AnyBuffer x,
                            ffi::Buffer<ffi::S32> topk_idx, const ffi::Buffer<ffi::F32>* weights,
                            ffi::Buffer<ffi::S32> expert_rank, ffi::Buffer<ffi::S32> expert_slot,
                            const CommAttrs& comm, bool fp8, bool round_scale,
                            LLDispatchSendArgs& a) {
  const int64_t R = ref.num_ranks, H = ref.ll_shape.hidden, K = ref.ll_topk;
  const int64_t El = ref.ll_shape.num_local_experts;
  auto idx_dims = topk_idx.dimensions();
  if (idx_dims.size() != 2 || idx_dims[1] != K) {
    return Invalid(op, "topk_idx must be [T, K=" + Str(K) + "], got " + Dims(idx_dims));
  }
  const int64_t T = idx_dims[0];
  JAXEP_RETURN_IF_ERROR(CheckTokens(op, T, ref));
  const int x_elem = RowElemBytes(x.element_type());
  if (x_elem != 2 && x_elem != 4) return Invalid(op, "x must be bfloat16 or float32");
  JAXEP_RETURN_IF_ERROR(Shape(op, "x", x, {T, H}));
  if (fp8 && H % 128) return Invalid(op, "fp8 needs hidden % 128 == 0, got " + Str(H));
  const int64_t E = R * El;
  JAXEP_RETURN_IF_ERROR(Shape(op, "expert_rank", expert_rank, {E}));
  JAXEP_RETURN_IF_ERROR(Shape(op, "expert_slot", expert_slot, {E}));
  if (weights) JAXEP_RETURN_IF_ERROR(Shape(op, "weights", *weights, {T, K}));
  const size_t smem =
      LLSendSharedBytes(static_cast<int>(T), static_cast<int>(K), static_cast<int>(E));
  if (smem > kLLMaxSharedBytes) {
    return Invalid(op, "routing tables need " + Str(smem) + " bytes of shared memory, over the " +
                           Str(kLLMaxSharedBytes) + " limit (T=" + Str(T) + ", E=" + Str(E) + ")");
  }
  a = LLArgs<LLDispatchSendArgs>(ref, comm);
  a.num_tokens = static_cast<int>(T);
  a.num_topk = static_cast<int>(K);
  a.num_experts = static_cast<int>(E);
  a.x_elem_bytes = x_elem;
  a.fp8 = fp8;
  a.round_scale = round_scale;
  a.x = x.untyped_data();
  a.topk_idx = topk_idx.typed_data();
  a.weights = weights ? weights->typed_data() : nullptr;
  a.expert_rank = expert_rank.typed_data();
  a.expert_slot = expert_slot.typed_data();
  return ffi::Error::Success();
}

ffi::Error LLDispatchSendImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer x,
                              ffi::Buffer<ffi::S32> topk_idx, ffi::Buffer<ffi::F32> weights,
                              ffi::Buffer<ffi::S32> expert_rank, ffi::Buffer<ffi::S32> expert_slot,
                              ffi::ResultBuffer<ffi::S32> info, LLDispatchSendAttrs attrs) {
  const char* op = attrs.copy_engine ? "ll_dispatch_send_ce" : "ll_dispatch_send";  // targets
  WorkspaceRef ref;
  JAXEP_RETURN_IF_ERROR(LookupLL(op, attrs.comm.comm_id, device, ref));
  LLDispatchSendArgs a;
  JAXEP_RETURN_IF_ERROR(DispatchSendArgs(op, ref, x, topk_idx,
                                         weights.element_count() > 0 ? &weights : nullptr,
                                         expert_rank, expert_slot, attrs.comm, attrs.fp8,
                                         attrs.round_scale, a));
  JAXEP_RETURN_IF_ERROR(Shape(op, "info", *info, {4}));
  a.info = info->typed_data();
  LLCopyEngines* engines = nullptr;
  JAXEP_RETURN_IF_ERROR(CopyEngines(op, attrs.copy_engine, stream, ref, &engines));
  return LaunchStatus(op, LaunchLLDispatchSend(a, stream, engines));
}

// Validates the results of a dispatch recv (T: its rows per source) and fills its launch
// arguments, but for info.
ffi::Error DispatchRecvArgs(const char* op, const WorkspaceRef& ref,
                            ffi::Result<ffi::AnyBuffer> x, ffi::Result<ffi::AnyBuffer> scales,
                            ffi::ResultBuffer<ffi::S32> counts,
                            ffi::ResultBuffer<ffi::S32> src_index,
                            ffi::ResultBuffer<ffi::S32> src_topk,
                            ffi::ResultBuffer<ffi::S32> recv_rows,
                            ffi::ResultBuffer<ffi::S32> num_invalid, const CommAttrs& comm,
                            bool ue8m0, bool zero_padding, bool weighted,
                            LLDispatchRecvArgs& a, int64_t& T) {
  const int64_t R = ref.num_ranks, H = ref.ll_shape.hidden, El = ref.ll_shape.num_local_experts;
  auto dims = x->dimensions();
  if (dims.size() != 3 || dims[0] != El || dims[1] % R || dims[2] != H) {
    return Invalid(op, "x must be [E_l=" + Str(El) + ", R*T, H=" + Str(H) + "] with R=" + Str(R) +
                           ", got " + Dims(dims));
  }
  const int64_t RT = dims[1];
  T = RT / R;
  JAXEP_RETURN_IF_ERROR(CheckTokens(op, T, ref));
  const int elem = RowElemBytes(x->element_type());
  if (!elem) return Invalid(op, "x must be float8_e4m3fn, bfloat16 or float32");
  const bool fp8 = elem == 1;
  if (weighted && fp8) return Invalid(op, "weighted rows need bfloat16 or float32");
  if (fp8) {
    const int64_t G = H / 128, GW = (G + 3) / 4;
    if (ue8m0) {
      if (scales->element_type() != ffi::DataType::S32) return Invalid(op, "ue8m0 scales must be int32");
      JAXEP_RETURN_IF_ERROR(Shape(op, "scales", *scales, {El, RT, GW}));
    } else {
      if (scales->element_type() != ffi::DataType::F32) return Invalid(op, "scales must be float32");
      JAXEP_RETURN_IF_ERROR(Shape(op, "scales", *scales, {El, RT, G}));
    }
  } else if (scales->element_count() != 0) {
    return Invalid(op, "scales must be empty without fp8, got " + Dims(scales->dimensions()));
  }
  JAXEP_RETURN_IF_ERROR(Shape(op, "counts", *counts, {El}));
  JAXEP_RETURN_IF_ERROR(Shape(op, "src_index", *src_index, {El, RT}));
  JAXEP_RETURN_IF_ERROR(Shape(op, "src_topk", *src_topk, {El, RT}));
  JAXEP_RETURN_IF_ERROR(Shape(op, "recv_rows", *recv_rows, {RT, int64_t{ref.ll_topk}}));
  JAXEP_RETURN_IF_ERROR(Shape(op, "num_invalid", *num_invalid, {}));
  a = LLArgs<LLDispatchRecvArgs>(ref, comm);
  a.num_tokens = static_cast<int>(T);
  a.elem_bytes = elem;
  a.fp8 = fp8;
  a.ue8m0 = ue8m0;
  a.zero_padding = zero_padding;
  a.weighted = weighted;
  a.x = x->untyped_data();
  a.scales = fp8 ? scales->untyped_data() : nullptr;
  a.counts = counts->typed_data();
  a.src_index = src_index->typed_data();
  a.src_topk = src_topk->typed_data();
  a.recv_rows = recv_rows->typed_data();
  a.num_invalid = num_invalid->typed_data();
  return ffi::Error::Success();
}

ffi::Error LLDispatchRecvImpl(cudaStream_t stream, int32_t device, ffi::Buffer<ffi::S32> info,
                              ffi::Result<ffi::AnyBuffer> x, ffi::Result<ffi::AnyBuffer> scales,
                              ffi::ResultBuffer<ffi::S32> counts,
                              ffi::ResultBuffer<ffi::S32> src_index,
                              ffi::ResultBuffer<ffi::S32> src_topk,
                              ffi::ResultBuffer<ffi::S32> recv_rows,
                              ffi::ResultBuffer<ffi::S32> num_invalid, LLDispatchRecvAttrs attrs) {
  const char* op = "ll_dispatch_recv";
  WorkspaceRef ref;
  JAXEP_RETURN_IF_ERROR(LookupLL(op, attrs.comm.comm_id, device, ref));
  JAXEP_RETURN_IF_ERROR(Shape(op, "info", info, {4}));
  LLDispatchRecvArgs a;
  int64_t T = 0;
  JAXEP_RETURN_IF_ERROR(DispatchRecvArgs(op, ref, x, scales, counts, src_index, src_topk,
                                         recv_rows, num_invalid, attrs.comm, attrs.ue8m0,
                                         attrs.zero_padding, attrs.weighted, a, T));
  a.info = info.typed_data();
  return LaunchStatus(op, LaunchLLDispatchRecv(a, stream));
}

// ll_dispatch in one kernel: the operands of an SM send, the results of its recv.
ffi::Error LLDispatchImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer x,
                          ffi::Buffer<ffi::S32> topk_idx, ffi::Buffer<ffi::S32> expert_rank,
                          ffi::Buffer<ffi::S32> expert_slot, ffi::Result<ffi::AnyBuffer> out,
                          ffi::Result<ffi::AnyBuffer> scales, ffi::ResultBuffer<ffi::S32> counts,
                          ffi::ResultBuffer<ffi::S32> src_index,
                          ffi::ResultBuffer<ffi::S32> src_topk,
                          ffi::ResultBuffer<ffi::S32> recv_rows,
                          ffi::ResultBuffer<ffi::S32> num_invalid, LLDispatchAttrs attrs) {
  const char* op = "ll_dispatch";
  WorkspaceRef ref;
  JAXEP_RETURN_IF_ERROR(LookupLL(op, attrs.comm.comm_id, device, ref));
  const bool fp8 = attrs.fp8;
  LLDispatchSendArgs s;
  JAXEP_RETURN_IF_ERROR(DispatchSendArgs(op, ref, x, topk_idx, nullptr, expert_rank, expert_slot,
                                         attrs.comm, fp8, attrs.round_scale, s));
  s.info = nullptr;
  LLDispatchRecvArgs r;
  int64_t T = 0;
  JAXEP_RETURN_IF_ERROR(DispatchRecvArgs(op, ref, out, scales, counts, src_index, src_topk,
                                         recv_rows, num_invalid, attrs.comm, attrs.ue8m0,
                                         attrs.zero_padding, /*weighted=*/false, r, T));
  if (T != s.num_tokens) {
    return Invalid(op, "x has T=" + Str(s.num_tokens) + " tokens, the output rows are for T=" +
                           Str(T));
  }
  const int want_elem = fp8 ? 1 : RowElemBytes(x.element_type());
  if (r.elem_bytes != want_elem) {
    return Invalid(op, "output payload must have " + Str(want_elem) + "-byte elements (fp8=" +
                           (fp8 ? "true" : "false") + "), got " + Str(r.elem_bytes));
  }
  r.info = nullptr;
  return LaunchStatus(op, LaunchLLDispatch(s, r, stream));
}

}  // namespace
}  // namespace jaxep

JAXEP_REGISTER_ATTRS(jaxep::LLDispatchSendAttrs, ffi::StructMember<bool>("fp8"),
                     ffi::StructMember<bool>("round_scale"),
                     ffi::StructMember<bool>("copy_engine"));
JAXEP_REGISTER_ATTRS(jaxep::LLDispatchRecvAttrs, ffi::StructMember<bool>("ue8m0"),
                     ffi::StructMember<bool>("zero_padding"),
                     ffi::StructMember<bool>("weighted"));
JAXEP_REGISTER_ATTRS(jaxep::LLDispatchAttrs, ffi::StructMember<bool>("fp8"),
                     ffi::StructMember<bool>("round_scale"), ffi::StructMember<bool>("ue8m0"),
                     ffi::StructMember<bool>("zero_padding"));

namespace {
using jaxep::LLBind;

// Both dispatch send targets bind the same operands and attributes.
auto LLDispatchSendBinding() {
  return LLBind()
      .Arg<ffi::AnyBuffer>()         // x [T, H] bf16 / f32
      .Arg<ffi::Buffer<ffi::S32>>()  // topk_idx [T, K]
      .Arg<ffi::Buffer<ffi::F32>>()  // weights [T, K] or [0]
      .Arg<ffi::Buffer<ffi::S32>>()  // expert_rank [E]
      .Arg<ffi::Buffer<ffi::S32>>()  // expert_slot [E]
      .Ret<ffi::Buffer<ffi::S32>>()  // info [4]
      .Attrs<jaxep::LLDispatchSendAttrs>();
}

// The results of a dispatch receive (the recv target and the one-kernel target), after a
// binding's operands.
template <typename Binding>
auto WithDispatchResults(Binding b) {
  return std::move(b)
      .template Ret<ffi::AnyBuffer>()          // x [E_l, R*T, H]
      .template Ret<ffi::AnyBuffer>()          // scales (empty without fp8)
      .template Ret<ffi::Buffer<ffi::S32>>()   // counts [E_l]
      .template Ret<ffi::Buffer<ffi::S32>>()   // src_index [E_l, R*T]
      .template Ret<ffi::Buffer<ffi::S32>>()   // src_topk [E_l, R*T]
      .template Ret<ffi::Buffer<ffi::S32>>()   // recv_rows [R*T, K]
      .template Ret<ffi::Buffer<ffi::S32>>();  // num_invalid []
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxepLLDispatchSendFfi, jaxep::LLDispatchSendImpl,
                              LLDispatchSendBinding(), {ffi::Traits::kCmdBufferCompatible});

// The copy-engine send: the same handler, but not command-buffer compatible, so that XLA runs
// it outside its CUDA graphs and the host enqueues the copies of every call.
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxepLLDispatchSendCeFfi, jaxep::LLDispatchSendImpl,
                              LLDispatchSendBinding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxepLLDispatchRecvFfi, jaxep::LLDispatchRecvImpl,
                              WithDispatchResults(
                                  LLBind().Arg<ffi::Buffer<ffi::S32>>())  // info [4] of the send
                                  .Attrs<jaxep::LLDispatchRecvAttrs>(),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxepLLDispatchFfi, jaxep::LLDispatchImpl,
                              WithDispatchResults(
                                  LLBind()
                                      .Arg<ffi::AnyBuffer>()           // x [T, H] bf16 / f32
                                      .Arg<ffi::Buffer<ffi::S32>>()    // topk_idx [T, K]
                                      .Arg<ffi::Buffer<ffi::S32>>()    // expert_rank [E]
                                      .Arg<ffi::Buffer<ffi::S32>>())   // expert_slot [E]
                                  .Attrs<jaxep::LLDispatchAttrs>(),
                              {ffi::Traits::kCmdBufferCompatible});

#endif  // JAXEP_WITH_CUDA
