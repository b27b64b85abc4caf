// Declarations of the XLA FFI handler symbols defined in ffi/*.cc (CUDA builds only).
#pragma once

#include "xla/ffi/api/api.h"

#ifdef JAXEP_WITH_CUDA
// FFI target "jaxep_dispatch_layout_ffi" -> jaxep::LaunchDispatchLayout (cuda/layout.cu).
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxepDispatchLayoutFfi);
// Intranode normal mode (cuda/intranode.cu): "jaxep_dispatch_ffi", "jaxep_combine_ffi",
// "jaxep_dispatch_rows_ffi".
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxepDispatchFfi);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxepCombineFfi);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxepDispatchRowsFfi);
// Expert-grouped normal mode (cuda/grouped.h): "jaxep_dispatch_grouped_ffi",
// "jaxep_combine_grouped_ffi", "jaxep_grouped_entries_ffi".
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxepDispatchGroupedFfi);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxepCombineGroupedFfi);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxepGroupedEntriesFfi);
// Low-latency mode (cuda/low_latency.h): ffi/ll_dispatch.cc defines "jaxep_ll_dispatch_send_ffi",
// "jaxep_ll_dispatch_send_ce_ffi", "jaxep_ll_dispatch_recv_ffi", "jaxep_ll_dispatch_ffi";
// ffi/ll_combine.cc "jaxep_ll_combine_send_ffi", "jaxep_ll_combine_send_reduced_ffi",
// "jaxep_ll_combine_recv_ffi", "jaxep_ll_combine_ffi".
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxepLLDispatchSendFfi);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxepLLDispatchSendCeFfi);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxepLLDispatchRecvFfi);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxepLLDispatchFfi);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxepLLCombineSendFfi);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxepLLCombineSendReducedFfi);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxepLLCombineRecvFfi);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxepLLCombineFfi);
#endif
