// XLA FFI handlers of the low-latency combine ops (one process, several GPUs):
//   jaxep_ll_combine_send_ffi  -> jaxep::LaunchLLCombineSend
//   jaxep_ll_combine_send_reduced_ffi -> jaxep::LaunchLLCombineSendReduced
//   jaxep_ll_combine_recv_ffi  -> jaxep::LaunchLLCombineRecv
//   jaxep_ll_combine_ffi       -> jaxep::LaunchLLCombine(Reduced) (both phases, one kernel)
// Each finds its device's low-latency buffers in the registry, validates every buffer against
// them, and only enqueues one kernel. A send returns a small `info` array that its recv takes
// as an operand: the data dependency orders the two phases in XLA's schedule.
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

// The attributes of the combine targets that take `prereduce` (JAXEP_REGISTER_ATTRS below);
// jaxep_ll_combine_send_ffi has CommAttrs only.
struct LLCombineAttrs {
  CommAttrs comm;
  int32_t prereduce;  // Prereduce (attrs.h)
};

// The `prereduce` attribute (attrs.h) as the kernels' flags: whether the send pre-reduced, and
// in float32. `send`: the pre-reduced send's, which has no kPrereduceNone.
ffi::Error DecodePrereduce(const char* op, int32_t prereduce, bool send, bool& reduced,
                           bool& float32_partials) {
  if (prereduce < (send ? kPrereduceOutDtype : kPrereduceNone) || prereduce > kPrereduceFloat32) {
    return Invalid(op, "prereduce must be " + std::string(send ? "" : "0 (none), ") +
                           "1 (partials in y's dtype) or 2 (float32 partials), got " +
                           std::to_string(prereduce));
  }
  reduced = prereduce != kPrereduceNone;
  float32_partials = prereduce == kPrereduceFloat32;
  return ffi::Error::Success();
}

// y [E_l, R*T, H] of a combine send, bfloat16 or float32: its element bytes, R*T and T.
ffi::Error CheckCombineY(const char* op, const ffi::AnyBuffer& y, const WorkspaceRef& ref,
                         int& elem, int64_t& RT, int64_t& T) {
  const int64_t R = ref.num_ranks, H = ref.ll_shape.hidden, El = ref.ll_shape.num_local_experts;
  elem = RowElemBytes(y.element_type());
  if (elem != 2 && elem != 4) return Invalid(op, "y must be bfloat16 or float32");
  auto dims = y.dimensions();
  if (dims.size() != 3 || dims[0] != El || dims[1] % R || dims[2] != H) {
    return Invalid(op, "y must be [E_l=" + Str(El) + ", R*T, H=" + Str(H) + "] with R=" + Str(R) +
                           ", got " + Dims(dims));
  }
  RT = dims[1];
  T = RT / R;
  return CheckTokens(op, T, ref);
}

// Validates the operands of a combine send and fills its launch arguments, but for info; T: the
// dispatch's tokens per rank.
ffi::Error CombineSendArgs(const char* op, const WorkspaceRef& ref, ffi::AnyBuffer y,
                           ffi::Buffer<ffi::S32> src_index, ffi::Buffer<ffi::S32> src_topk,
                           ffi::Buffer<ffi::S32> counts, const CommAttrs& comm,
                           LLCombineSendArgs& a, int64_t& T) {
  const int64_t El = ref.ll_shape.num_local_experts;
  int elem = 0;
  int64_t RT = 0;
  JAXEP_RETURN_IF_ERROR(CheckCombineY(op, y, ref, elem, RT, T));
  JAXEP_RETURN_IF_ERROR(Shape(op, "src_index", src_index, {El, RT}));
  JAXEP_RETURN_IF_ERROR(Shape(op, "src_topk", src_topk, {El, RT}));
  JAXEP_RETURN_IF_ERROR(Shape(op, "counts", counts, {El}));
  a = LLArgs<LLCombineSendArgs>(ref, comm);
  a.num_tokens = static_cast<int>(T);
  a.elem_bytes = elem;
  a.y = y.untyped_data();
  a.src_index = src_index.typed_data();
  a.src_topk = src_topk.typed_data();
  a.counts = counts.typed_data();
  return ffi::Error::Success();
}

// The same for a pre-reduced combine send.
ffi::Error CombineSendReducedArgs(const char* op, const WorkspaceRef& ref, ffi::AnyBuffer y,
                                  ffi::Buffer<ffi::S32> recv_rows, ffi::Buffer<ffi::S32> topk_idx,
                                  ffi::Buffer<ffi::F32> weights, bool float32_partials,
                                  const CommAttrs& comm, LLCombineSendReducedArgs& a,
                                  int64_t& T) {
  const int64_t R = ref.num_ranks, El = ref.ll_shape.num_local_experts, K = ref.ll_topk;
  int elem = 0;
  int64_t RT = 0;
  JAXEP_RETURN_IF_ERROR(CheckCombineY(op, y, ref, elem, RT, T));
  JAXEP_RETURN_IF_ERROR(Shape(op, "recv_rows", recv_rows, {RT, K}));
  JAXEP_RETURN_IF_ERROR(Shape(op, "topk_idx", topk_idx, {T, K}));
  JAXEP_RETURN_IF_ERROR(Shape(op, "topk_weights", weights, {T, K}));
  a = LLArgs<LLCombineSendReducedArgs>(ref, comm);
  a.num_tokens = static_cast<int>(T);
  a.num_experts = static_cast<int>(R * El);
  a.elem_bytes = elem;
  a.y = y.untyped_data();
  a.recv_rows = recv_rows.typed_data();
  a.topk_idx = topk_idx.typed_data();
  a.weights = weights.typed_data();
  a.float32_partials = float32_partials;
  return ffi::Error::Success();
}

// Validates the operands and results of a combine recv and fills its launch arguments, but
// for info.
ffi::Error CombineRecvArgs(const char* op, const WorkspaceRef& ref, ffi::Buffer<ffi::S32> topk_idx,
                           ffi::Buffer<ffi::F32> weights, ffi::Buffer<ffi::S32> expert_rank,
                           ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> rows,
                           const CommAttrs& comm, bool reduced, bool float32_partials,
                           LLCombineRecvArgs& a) {
  const int64_t R = ref.num_ranks, H = ref.ll_shape.hidden, K = ref.ll_topk;
  auto idx_dims = topk_idx.dimensions();
  if (idx_dims.size() != 2 || idx_dims[1] != K) {
    return Invalid(op, "topk_idx must be [T, K=" + Str(K) + "], got " + Dims(idx_dims));
  }
  const int64_t T = idx_dims[0];
  JAXEP_RETURN_IF_ERROR(CheckTokens(op, T, ref));
  JAXEP_RETURN_IF_ERROR(Shape(op, "topk_weights", weights, {T, K}));
  const int elem = RowElemBytes(out->element_type());
  if (elem != 2 && elem != 4) return Invalid(op, "out must be bfloat16 or float32");
  JAXEP_RETURN_IF_ERROR(Shape(op, "out", *out, {T, H}));
  JAXEP_RETURN_IF_ERROR(Shape(op, "expert_rank", expert_rank, {R * ref.ll_shape.num_local_experts}));
  const bool want_rows = rows->element_count() > 0;
  if (want_rows && reduced) return Invalid(op, "a pre-reduced combine has no per-entry rows");
  if (want_rows) {
    if (rows->element_type() != out->element_type()) return Invalid(op, "rows must match out's dtype");
    JAXEP_RETURN_IF_ERROR(Shape(op, "rows", *rows, {T, K, H}));
  }
  a = LLArgs<LLCombineRecvArgs>(ref, comm);
  a.num_tokens = static_cast<int>(T);
  a.num_topk = static_cast<int>(K);
  a.num_experts = static_cast<int>(R * ref.ll_shape.num_local_experts);
  a.elem_bytes = elem;
  a.topk_idx = topk_idx.typed_data();
  a.weights = weights.typed_data();
  a.expert_rank = expert_rank.typed_data();
  a.reduced = reduced;
  a.float32_partials = reduced && float32_partials;
  a.out = out->untyped_data();
  a.rows = want_rows ? rows->untyped_data() : nullptr;
  return ffi::Error::Success();
}

ffi::Error LLCombineSendImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer y,
                             ffi::Buffer<ffi::S32> src_index, ffi::Buffer<ffi::S32> src_topk,
                             ffi::Buffer<ffi::S32> counts, ffi::ResultBuffer<ffi::S32> info,
                             CommAttrs attrs) {
  const char* op = "ll_combine_send";
  WorkspaceRef ref;
  JAXEP_RETURN_IF_ERROR(LookupLL(op, attrs.comm_id, device, ref));
  LLCombineSendArgs a;
  int64_t T = 0;
  JAXEP_RETURN_IF_ERROR(CombineSendArgs(op, ref, y, src_index, src_topk, counts, attrs, a, T));
  JAXEP_RETURN_IF_ERROR(Shape(op, "info", *info, {2}));
  a.info = info->typed_data();
  return LaunchStatus(op, LaunchLLCombineSend(a, stream));
}

ffi::Error LLCombineSendReducedImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer y,
                                    ffi::Buffer<ffi::S32> recv_rows, ffi::Buffer<ffi::S32> topk_idx,
                                    ffi::Buffer<ffi::F32> weights, ffi::ResultBuffer<ffi::S32> info,
                                    LLCombineAttrs attrs) {
  const char* op = "ll_combine_send_reduced";
  bool reduced = true, float32_partials = false;
  JAXEP_RETURN_IF_ERROR(
      DecodePrereduce(op, attrs.prereduce, /*send=*/true, reduced, float32_partials));
  WorkspaceRef ref;
  JAXEP_RETURN_IF_ERROR(LookupLL(op, attrs.comm.comm_id, device, ref));
  LLCombineSendReducedArgs a;
  int64_t T = 0;
  JAXEP_RETURN_IF_ERROR(CombineSendReducedArgs(op, ref, y, recv_rows, topk_idx, weights,
                                               float32_partials, attrs.comm, a, T));
  JAXEP_RETURN_IF_ERROR(Shape(op, "info", *info, {2}));
  a.info = info->typed_data();
  return LaunchStatus(op, LaunchLLCombineSendReduced(a, stream));
}

ffi::Error LLCombineRecvImpl(cudaStream_t stream, int32_t device, ffi::Buffer<ffi::S32> info,
                             ffi::Buffer<ffi::S32> topk_idx, ffi::Buffer<ffi::F32> weights,
                             ffi::Buffer<ffi::S32> expert_rank, ffi::Result<ffi::AnyBuffer> out,
                             ffi::Result<ffi::AnyBuffer> rows, LLCombineAttrs attrs) {
  const char* op = "ll_combine_recv";
  bool reduced = false, float32_partials = false;
  JAXEP_RETURN_IF_ERROR(
      DecodePrereduce(op, attrs.prereduce, /*send=*/false, reduced, float32_partials));
  WorkspaceRef ref;
  JAXEP_RETURN_IF_ERROR(LookupLL(op, attrs.comm.comm_id, device, ref));
  JAXEP_RETURN_IF_ERROR(Shape(op, "info", info, {2}));
  LLCombineRecvArgs a;
  JAXEP_RETURN_IF_ERROR(CombineRecvArgs(op, ref, topk_idx, weights, expert_rank, out, rows,
                                        attrs.comm, reduced, float32_partials, a));
  a.info = info.typed_data();
  return LaunchStatus(op, LaunchLLCombineRecv(a, stream));
}

// ll_combine in one kernel: the operands of the send (every handle array; `prereduce` picks
// which the send reads) and of the recv, the recv's results.
ffi::Error LLCombineImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer y,
                         ffi::Buffer<ffi::S32> src_index, ffi::Buffer<ffi::S32> src_topk,
                         ffi::Buffer<ffi::S32> counts, ffi::Buffer<ffi::S32> recv_rows,
                         ffi::Buffer<ffi::S32> topk_idx, ffi::Buffer<ffi::F32> weights,
                         ffi::Buffer<ffi::S32> expert_rank, ffi::Result<ffi::AnyBuffer> out,
                         ffi::Result<ffi::AnyBuffer> rows, LLCombineAttrs attrs) {
  const char* op = "ll_combine";
  bool reduced = false, float32_partials = false;
  JAXEP_RETURN_IF_ERROR(
      DecodePrereduce(op, attrs.prereduce, /*send=*/false, reduced, float32_partials));
  WorkspaceRef ref;
  JAXEP_RETURN_IF_ERROR(LookupLL(op, attrs.comm.comm_id, device, ref));
  LLCombineRecvArgs r;
  JAXEP_RETURN_IF_ERROR(CombineRecvArgs(op, ref, topk_idx, weights, expert_rank, out, rows,
                                        attrs.comm, reduced, float32_partials, r));
  if (y.element_type() != out->element_type()) return Invalid(op, "out must match y's dtype");
  r.info = nullptr;
  int64_t T = 0;
  if (reduced) {
    LLCombineSendReducedArgs s;
    JAXEP_RETURN_IF_ERROR(CombineSendReducedArgs(op, ref, y, recv_rows, topk_idx, weights,
                                                 float32_partials, attrs.comm, s, T));
    s.info = nullptr;
    return LaunchStatus(op, LaunchLLCombineReduced(s, r, stream));
  }
  LLCombineSendArgs s;
  JAXEP_RETURN_IF_ERROR(
      CombineSendArgs(op, ref, y, src_index, src_topk, counts, attrs.comm, s, T));
  if (T != r.num_tokens) {
    return Invalid(op, "y has rows for T=" + Str(T) + " tokens per rank, topk_idx has T=" +
                           Str(r.num_tokens));
  }
  JAXEP_RETURN_IF_ERROR(Shape(op, "recv_rows", recv_rows, {T * ref.num_ranks, ref.ll_topk}));
  s.info = nullptr;
  // This rank's own entries stay in y: the receive part reads them there (recv_rows).
  s.skip_local = true;
  r.y = y.untyped_data();
  r.local_rows = recv_rows.typed_data();
  return LaunchStatus(op, LaunchLLCombine(s, r, stream));
}

}  // namespace
}  // namespace jaxep

JAXEP_REGISTER_ATTRS(jaxep::LLCombineAttrs, ffi::StructMember<int32_t>("prereduce"));

namespace {
using jaxep::LLBind;

// The results of a combine receive (the recv target and the one-kernel target), then their
// attributes, after a binding's operands.
template <typename Binding>
auto WithCombineResults(Binding b) {
  return std::move(b)
      .template Ret<ffi::AnyBuffer>()  // out [T, H]
      .template Ret<ffi::AnyBuffer>()  // rows [T, K, H] or empty
      .template Attrs<jaxep::LLCombineAttrs>();
}
}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxepLLCombineSendFfi, jaxep::LLCombineSendImpl,
                              LLBind()
                                  .Arg<ffi::AnyBuffer>()         // y [E_l, R*T, H]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // src_index [E_l, R*T]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // src_topk [E_l, R*T]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // counts [E_l]
                                  .Ret<ffi::Buffer<ffi::S32>>()  // info [2]
                                  .Attrs<jaxep::CommAttrs>(),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxepLLCombineSendReducedFfi, jaxep::LLCombineSendReducedImpl,
                              LLBind()
                                  .Arg<ffi::AnyBuffer>()         // y [E_l, R*T, H]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // recv_rows [R*T, K]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // topk_idx [T, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // topk_weights [T, K]
                                  .Ret<ffi::Buffer<ffi::S32>>()  // info [2]
                                  .Attrs<jaxep::LLCombineAttrs>(),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxepLLCombineFfi, jaxep::LLCombineImpl,
                              WithCombineResults(LLBind()
                                                     .Arg<ffi::AnyBuffer>()  // y [E_l, R*T, H]
                                                     .Arg<ffi::Buffer<ffi::S32>>()  // src_index
                                                     .Arg<ffi::Buffer<ffi::S32>>()  // src_topk
                                                     .Arg<ffi::Buffer<ffi::S32>>()  // counts [E_l]
                                                     .Arg<ffi::Buffer<ffi::S32>>()  // recv_rows
                                                     .Arg<ffi::Buffer<ffi::S32>>()  // topk_idx
                                                     .Arg<ffi::Buffer<ffi::F32>>()  // topk_weights
                                                     .Arg<ffi::Buffer<ffi::S32>>()),  // expert_rank
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxepLLCombineRecvFfi, jaxep::LLCombineRecvImpl,
                              WithCombineResults(LLBind()
                                                     .Arg<ffi::Buffer<ffi::S32>>()  // info [2]
                                                     .Arg<ffi::Buffer<ffi::S32>>()  // topk_idx
                                                     .Arg<ffi::Buffer<ffi::F32>>()  // topk_weights
                                                     .Arg<ffi::Buffer<ffi::S32>>()),  // expert_rank
                              {ffi::Traits::kCmdBufferCompatible});

#endif  // JAXEP_WITH_CUDA
