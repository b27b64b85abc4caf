// XLA FFI handler for the FFI target "jaxep_dispatch_layout_ffi":
// decodes and validates buffers/attributes, then enqueues jaxep::LaunchDispatchLayout on the
// stream XLA hands us. Compiled to nothing without CUDA.
#ifdef JAXEP_WITH_CUDA

#include <cstddef>
#include <cstdint>
#include <string>

#include <cuda_runtime_api.h>

#include "checks.h"
#include "handlers.h"
#include "layout.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jaxep {
namespace {

ffi::Error DispatchLayoutImpl(cudaStream_t stream, ffi::Buffer<ffi::S32> topk_idx,
                              ffi::Buffer<ffi::S32> expert_rank,
                              ffi::ResultBuffer<ffi::S32> tokens_per_rank,
                              ffi::ResultBuffer<ffi::S32> tokens_per_expert,
                              ffi::ResultBuffer<ffi::PRED> is_token_in_rank, int32_t num_ranks,
                              int32_t num_experts) {
  const char* op = "dispatch_layout";
  if (num_ranks < 1 || num_ranks > kLayoutMaxRanks) {
    return Invalid(op, "num_ranks must be in [1, " + std::to_string(kLayoutMaxRanks) +
                           "], got " + std::to_string(num_ranks));
  }
  if (num_experts < 1 || num_experts > kLayoutMaxExperts) {
    return Invalid(op, "num_experts must be in [1, " + std::to_string(kLayoutMaxExperts) +
                           "], got " + std::to_string(num_experts));
  }
  auto idx_dims = topk_idx.dimensions();
  if (idx_dims.size() != 2) {
    return Invalid(op, "topk_idx must have rank 2 [T, K], got shape " + Dims(idx_dims));
  }
  const int64_t num_tokens = idx_dims[0];
  const int64_t num_topk = idx_dims[1];
  if (num_topk > kLayoutMaxTopk) {
    return Invalid(op, "topk_idx.shape[1] (K) must be <= " + std::to_string(kLayoutMaxTopk) +
                           ", got " + std::to_string(num_topk));
  }
  if (num_tokens * num_topk > INT32_MAX || num_tokens * num_ranks > INT32_MAX) {
    return Invalid(op, "too many tokens: T*K and T*R must fit in int32, got T=" +
                           std::to_string(num_tokens) + ", K=" + std::to_string(num_topk) +
                           ", R=" + std::to_string(num_ranks));
  }
  JAXEP_RETURN_IF_ERROR(Shape(op, "expert_rank", expert_rank, {num_experts}));
  JAXEP_RETURN_IF_ERROR(Shape(op, "tokens_per_rank", *tokens_per_rank, {num_ranks}));
  JAXEP_RETURN_IF_ERROR(Shape(op, "tokens_per_expert", *tokens_per_expert, {num_experts}));
  JAXEP_RETURN_IF_ERROR(
      Shape(op, "is_token_in_rank", *is_token_in_rank, {num_tokens, num_ranks}));

  const cudaError_t err = LaunchDispatchLayout(
      topk_idx.typed_data(), expert_rank.typed_data(), static_cast<int>(num_tokens),
      static_cast<int>(num_topk), num_experts, num_ranks, tokens_per_rank->typed_data(),
      tokens_per_expert->typed_data(), is_token_in_rank->typed_data(), stream);
  if (err != cudaSuccess) {
    return ffi::Error::Internal(std::string("jaxep_dispatch_layout_ffi: DispatchLayoutKernel "
                                            "launch failed: ") +
                                cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jaxep

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxepDispatchLayoutFfi, jaxep::DispatchLayoutImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()        // topk_idx [T, K]
                                  .Arg<ffi::Buffer<ffi::S32>>()        // expert_rank [E]
                                  .Ret<ffi::Buffer<ffi::S32>>()        // tokens_per_rank [R]
                                  .Ret<ffi::Buffer<ffi::S32>>()        // tokens_per_expert [E]
                                  .Ret<ffi::Buffer<ffi::PRED>>()       // is_token_in_rank [T, R]
                                  .Attr<int32_t>("num_ranks")
                                  .Attr<int32_t>("num_experts"),
                              {ffi::Traits::kCmdBufferCompatible});

#endif  // JAXEP_WITH_CUDA
