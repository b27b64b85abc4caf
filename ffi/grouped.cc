// XLA FFI handlers of the expert-grouped normal-mode ops (cuda/grouped.h):
//   jaxep_dispatch_grouped_ffi  -> jaxep::LaunchDispatchGrouped
//   jaxep_combine_grouped_ffi   -> jaxep::LaunchCombineGrouped
//   jaxep_grouped_entries_ffi   -> jaxep::LaunchGroupedEntries  (dispatch_grouped's weight grad)
// jaxep/_checks.py validates what the user passes; these check what protects memory: buffer
// shapes against each other and the workspace, and the kernels' limits.
#ifdef JAXEP_WITH_CUDA

#include <algorithm>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <string>

#include <cuda_runtime_api.h>

#include "attrs.h"
#include "checks.h"
#include "grouped.h"
#include "handlers.h"
#include "intranode.h"
#include "lookup.h"
#include "registry.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jaxep {

struct DispatchGroupedAttrs {
  CommAttrs comm;
  int32_t alignment;
  bool zero_padding;
};

struct CombineGroupedAttrs {
  CommAttrs comm;
  bool weighted;
};

}  // namespace jaxep

JAXEP_REGISTER_ATTRS(jaxep::DispatchGroupedAttrs, ::xla::ffi::StructMember<int32_t>("alignment"),
                     ::xla::ffi::StructMember<bool>("zero_padding"));
JAXEP_REGISTER_ATTRS(jaxep::CombineGroupedAttrs, ::xla::ffi::StructMember<bool>("weighted"));

namespace jaxep {
namespace {

std::string S(int64_t v) { return std::to_string(v); }

int64_t Rows(const ffi::AnyBuffer& b) {
  return b.dimensions().size() == 0 ? -1 : b.dimensions()[0];
}

ffi::Error DispatchGroupedImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer x,
                               ffi::AnyBuffer scales, ffi::Buffer<ffi::S32> topk_idx,
                               ffi::Buffer<ffi::F32> topk_weights,
                               ffi::Buffer<ffi::S32> expert_rank,
                               ffi::Buffer<ffi::S32> expert_slot,
                               ffi::Result<ffi::AnyBuffer> out_x,
                               ffi::Result<ffi::AnyBuffer> out_scales,
                               ffi::ResultBuffer<ffi::S32> group_sizes,
                               ffi::ResultBuffer<ffi::F32> weights,
                               ffi::ResultBuffer<ffi::S32> src_index,
                               ffi::ResultBuffer<ffi::S32> dest_row,
                               ffi::ResultBuffer<ffi::S32> dest_rank,
                               ffi::ResultBuffer<ffi::S32> meta, DispatchGroupedAttrs attrs) {
  const char* op = "dispatch_grouped";
  WorkspaceRef ref;
  JAXEP_RETURN_IF_ERROR(Lookup(op, attrs.comm.comm_id, device, ref));
  JAXEP_RETURN_IF_ERROR(CheckOneNode(op, ref));
  const int64_t R = ref.num_ranks;
  auto idx_dims = topk_idx.dimensions();
  if (idx_dims.size() != 2) return Invalid(op, "topk_idx must be [T, K], got " + Dims(idx_dims));
  const int64_t T = idx_dims[0], K = idx_dims[1];
  const int64_t E = expert_rank.dimensions().size() == 1 ? expert_rank.dimensions()[0] : -1;
  const int64_t M = Rows(*out_x);
  JAXEP_RETURN_IF_ERROR(CheckTokens(op, T, ref));
  if (K > kMaxTopkIntranode || K > ref.num_topk) {
    return Invalid(op, "K must be <= " + S(std::min<int64_t>(kMaxTopkIntranode, ref.num_topk)) +
                           " (the communicator's), got " + S(K));
  }
  if (E < 1 || E % R || E > kMaxExpertsIntranode || E / R > kMaxGroupedExperts) {
    return Invalid(op, "expert_rank must be [E] with E a multiple of R=" + S(R) + ", at most " +
                           S(kMaxExpertsIntranode) + " and E/R at most " +
                           S(kMaxGroupedExperts) + ", got " + Dims(expert_rank.dimensions()));
  }
  const int64_t El = E / R;
  if (GroupedLayoutSharedBytes(static_cast<int>(E), static_cast<int>(El)) >
      GroupedLayoutSharedLimit()) {
    return Invalid(op, "the layout needs " +
                           S(GroupedLayoutSharedBytes(static_cast<int>(E), static_cast<int>(El))) +
                           " bytes of shared memory for E=" + S(E) + ", E_l=" + S(El) +
                           "; this device gives " + S(GroupedLayoutSharedLimit()));
  }
  if (Rows(x) != T || Rows(scales) != T) {
    return Invalid(op, "x and scales must have T=" + S(T) + " rows, got " + Dims(x.dimensions()) +
                           " and " + Dims(scales.dimensions()));
  }
  if (M < 0 || out_x->element_type() != x.element_type() || RowBytes(*out_x) != RowBytes(x) ||
      Rows(*out_scales) != M || RowBytes(*out_scales) != RowBytes(scales)) {
    return Invalid(op, "out_x / out_scales must be x / scales with M rows, got " +
                           Dims(out_x->dimensions()) + " / " + Dims(out_scales->dimensions()));
  }
  if (attrs.alignment < 1) return Invalid(op, "alignment must be >= 1, got " + S(attrs.alignment));
  if (M > INT32_MAX) return Invalid(op, "M must be < 2^31 rows, got " + S(M));
  JAXEP_RETURN_IF_ERROR(Shape(op, "topk_weights", topk_weights, {T, K}));
  JAXEP_RETURN_IF_ERROR(Shape(op, "expert_slot", expert_slot, {E}));
  JAXEP_RETURN_IF_ERROR(Shape(op, "group_sizes", *group_sizes, {El}));
  JAXEP_RETURN_IF_ERROR(Shape(op, "weights", *weights, {M}));
  JAXEP_RETURN_IF_ERROR(Shape(op, "src_index", *src_index, {M}));
  JAXEP_RETURN_IF_ERROR(Shape(op, "dest_row", *dest_row, {T, K}));
  JAXEP_RETURN_IF_ERROR(Shape(op, "dest_rank", *dest_rank, {T, K}));
  JAXEP_RETURN_IF_ERROR(Shape(op, "meta", *meta, {2}));

  GroupedDispatchArgs a{};
  a.ws = ref.ws;
  a.num_tokens = static_cast<int>(T);
  a.num_topk = static_cast<int>(K);
  a.num_experts = static_cast<int>(E);
  a.num_local_experts = static_cast<int>(El);
  a.rows = static_cast<int>(M);
  a.alignment = attrs.alignment;
  a.zero_padding = attrs.zero_padding;
  a.topk_idx = topk_idx.typed_data();
  a.topk_weights = topk_weights.typed_data();
  a.expert_rank = expert_rank.typed_data();
  a.expert_slot = expert_slot.typed_data();
  a.x = x.untyped_data();
  a.x_row_bytes = static_cast<int>(RowBytes(x));
  a.s_row_bytes = static_cast<int>(RowBytes(scales));
  a.scales = a.s_row_bytes ? scales.untyped_data() : nullptr;
  a.out_x = out_x->untyped_data();
  a.out_scales = a.s_row_bytes ? out_scales->untyped_data() : nullptr;
  a.group_sizes = group_sizes->typed_data();
  a.weights = weights->typed_data();
  a.src_index = src_index->typed_data();
  a.dest_row = dest_row->typed_data();
  a.dest_rank = dest_rank->typed_data();
  a.meta = meta->typed_data();
  a.num_sms = attrs.comm.num_sms;
  a.timeout_ns = static_cast<unsigned long long>(attrs.comm.timeout_ns);
  if (ref.stage) {
    a.stage = ref.stage;
    a.stage_layout = DispatchStageLayout(T, a.x_row_bytes, a.s_row_bytes, K);
    JAXEP_RETURN_IF_ERROR(CheckStage(op, a.stage_layout, ref));
  }
  return LaunchStatus(op, LaunchDispatchGrouped(a, stream));
}

ffi::Error CombineGroupedImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer y,
                              ffi::Buffer<ffi::F32> weights, ffi::Buffer<ffi::S32> dest_row,
                              ffi::Buffer<ffi::S32> dest_rank, ffi::Result<ffi::AnyBuffer> out,
                              CombineGroupedAttrs attrs) {
  const char* op = "combine_grouped";
  WorkspaceRef ref;
  JAXEP_RETURN_IF_ERROR(Lookup(op, attrs.comm.comm_id, device, ref));
  JAXEP_RETURN_IF_ERROR(CheckOneNode(op, ref));
  const auto type = y.element_type();
  if (type != ffi::DataType::BF16 && type != ffi::DataType::F32) {
    return Invalid(op, "y must be bfloat16 or float32");
  }
  auto row_dims = dest_row.dimensions();
  if (row_dims.size() != 2) return Invalid(op, "dest_row must be [T, K], got " + Dims(row_dims));
  const int64_t T = row_dims[0], K = row_dims[1], M = Rows(y);
  JAXEP_RETURN_IF_ERROR(CheckTokens(op, T, ref));
  if (M > INT32_MAX) return Invalid(op, "M must be < 2^31 rows, got " + S(M));
  if (K > kMaxTopkIntranode) return Invalid(op, "K must be <= " + S(kMaxTopkIntranode) + ", got " + S(K));
  JAXEP_RETURN_IF_ERROR(Shape(op, "dest_rank", dest_rank, {T, K}));
  JAXEP_RETURN_IF_ERROR(Shape(op, "weights", weights, {M}));
  const int64_t row_elems = M > 0 ? static_cast<int64_t>(y.element_count()) / M : 0;
  if (out->element_type() != type || Rows(*out) != T ||
      static_cast<int64_t>(out->element_count()) != T * row_elems) {
    return Invalid(op, "out must be y's rows for T=" + S(T) + " tokens, got " +
                           Dims(out->dimensions()) + " for y " + Dims(y.dimensions()));
  }
  GroupedCombineArgs a{};
  a.ws = ref.ws;
  a.num_tokens = static_cast<int>(T);
  a.num_topk = static_cast<int>(K);
  a.rows = static_cast<int>(M);
  a.row_elems = static_cast<int>(row_elems);
  a.elem_bytes = RowElemBytes(type);
  a.weighted = attrs.weighted;
  a.y = y.untyped_data();
  a.weights = weights.typed_data();
  a.dest_row = dest_row.typed_data();
  a.dest_rank = dest_rank.typed_data();
  a.out = out->untyped_data();
  a.num_sms = attrs.comm.num_sms;
  a.timeout_ns = static_cast<unsigned long long>(attrs.comm.timeout_ns);
  if (ref.stage) {
    a.stage = ref.stage;
    a.stage_layout = GroupedCombineStageLayout(ref.num_ranks, T, K, row_elems);
    JAXEP_RETURN_IF_ERROR(CheckStage(op, a.stage_layout, ref));
  }
  return LaunchStatus(op, LaunchCombineGrouped(a, stream));
}

ffi::Error GroupedEntriesImpl(cudaStream_t stream, int32_t device, ffi::Buffer<ffi::F32> vals,
                              ffi::Buffer<ffi::S32> dest_row, ffi::Buffer<ffi::S32> dest_rank,
                              ffi::ResultBuffer<ffi::F32> out, CommAttrs attrs) {
  const char* op = "grouped_entries";
  WorkspaceRef ref;
  JAXEP_RETURN_IF_ERROR(Lookup(op, attrs.comm_id, device, ref));
  JAXEP_RETURN_IF_ERROR(CheckOneNode(op, ref));
  auto row_dims = dest_row.dimensions();
  if (row_dims.size() != 2 || vals.dimensions().size() != 1) {
    return Invalid(op, "dest_row must be [T, K] and vals [M], got " + Dims(row_dims) + " and " +
                           Dims(vals.dimensions()));
  }
  const int64_t T = row_dims[0], K = row_dims[1], M = vals.dimensions()[0];
  JAXEP_RETURN_IF_ERROR(CheckTokens(op, T, ref));
  if (M > INT32_MAX) return Invalid(op, "M must be < 2^31 rows, got " + S(M));
  JAXEP_RETURN_IF_ERROR(Shape(op, "dest_rank", dest_rank, {T, K}));
  JAXEP_RETURN_IF_ERROR(Shape(op, "out", *out, {T, K}));
  GroupedEntriesArgs a{};
  a.ws = ref.ws;
  a.num_tokens = static_cast<int>(T);
  a.num_topk = static_cast<int>(K);
  a.rows = static_cast<int>(M);
  a.vals = vals.typed_data();
  a.dest_row = dest_row.typed_data();
  a.dest_rank = dest_rank.typed_data();
  a.out = out->typed_data();
  a.timeout_ns = static_cast<unsigned long long>(attrs.timeout_ns);
  if (ref.stage) {
    a.stage = ref.stage;
    JAXEP_RETURN_IF_ERROR(CheckStage(op, RowsStageLayout(M, 4), ref));
  }
  return LaunchStatus(op, LaunchGroupedEntries(a, stream));
}

}  // namespace
}  // namespace jaxep

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxepDispatchGroupedFfi, jaxep::DispatchGroupedImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::AnyBuffer>()              // x [T, ...]
                                  .Arg<ffi::AnyBuffer>()              // scales [T, G] (G may be 0)
                                  .Arg<ffi::Buffer<ffi::S32>>()       // topk_idx [T, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()       // topk_weights [T, K]
                                  .Arg<ffi::Buffer<ffi::S32>>()       // expert_rank [E]
                                  .Arg<ffi::Buffer<ffi::S32>>()       // expert_slot [E]
                                  .Ret<ffi::AnyBuffer>()              // x [M, ...]
                                  .Ret<ffi::AnyBuffer>()              // scales [M, G]
                                  .Ret<ffi::Buffer<ffi::S32>>()       // group_sizes [E_l]
                                  .Ret<ffi::Buffer<ffi::F32>>()       // weights [M]
                                  .Ret<ffi::Buffer<ffi::S32>>()       // src_index [M]
                                  .Ret<ffi::Buffer<ffi::S32>>()       // dest_row [T, K]
                                  .Ret<ffi::Buffer<ffi::S32>>()       // dest_rank [T, K]
                                  .Ret<ffi::Buffer<ffi::S32>>()       // meta [2]
                                  .Attrs<jaxep::DispatchGroupedAttrs>(),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxepCombineGroupedFfi, jaxep::CombineGroupedImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::AnyBuffer>()         // y [M, ...]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // weights [M]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // dest_row [T, K]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // dest_rank [T, K]
                                  .Ret<ffi::AnyBuffer>()         // out [T, ...]
                                  .Attrs<jaxep::CombineGroupedAttrs>(),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxepGroupedEntriesFfi, jaxep::GroupedEntriesImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // vals [M]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // dest_row [T, K]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // dest_rank [T, K]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out [T, K]
                                  .Attrs<jaxep::CommAttrs>(),
                              {ffi::Traits::kCmdBufferCompatible});

#endif  // JAXEP_WITH_CUDA
