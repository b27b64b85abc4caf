"""jaxep: expert-parallel MoE communication (dispatch / combine) for JAX.

Use inside ``jax.shard_map`` over a mesh axis of expert parallelism::

    cfg = jaxep.EPConfig(num_experts=64, num_topk=4, hidden=1024, max_tokens_per_rank=512)
    comm = jaxep.Communicator(mesh, cfg)                  # backend "auto" | "cuda" | "xla"
    d = jaxep.dispatch(comm, x, topk_idx, topk_weights)   # rows for this rank's experts
    out = jaxep.combine(comm, expert_out, d.handle)       # [T, H]

    g = jaxep.dispatch_grouped(comm, x, topk_idx, topk_weights)   # rows grouped by local expert
    h = jax.nn.gelu(jax.lax.ragged_dot(g.x, w_in, g.group_sizes))
    out = jaxep.combine_grouped(comm, jax.lax.ragged_dot(h, w_out, g.group_sizes), g.handle)

See docs/design.md and the ops' docstrings for the exact semantics shared by every backend.
"""

from jaxep import _cuda
from jaxep.communicator import Communicator
from jaxep.config import EPConfig
from jaxep.fp8 import dequantize_fp8, quantize_fp8
from jaxep.low_latency import (LLCombinePending, LLDispatched, LLDispatchPending, LLHandle,
                               ll_combine, ll_combine_recv, ll_combine_send, ll_dispatch,
                               ll_dispatch_recv, ll_dispatch_send)
from jaxep._replicated import ReplicatedHandle
from jaxep.normal import (Dispatched, DispatchHandle, Grouped, GroupedHandle, Layout, combine,
                          combine_grouped, dispatch, dispatch_grouped, dispatch_layout)

__version__ = "0.1.0"

# Register the compiled FFI targets for the CUDA platform (a no-op without the CUDA build; safe
# on CPU-only jax, where the registration is simply never used).
_cuda.register()

__all__ = [
    "EPConfig", "Communicator",
    "dispatch_layout", "dispatch", "combine", "Layout", "Dispatched", "DispatchHandle",
    "dispatch_grouped", "combine_grouped", "Grouped", "GroupedHandle",
    "ll_dispatch", "ll_combine", "ll_dispatch_send", "ll_dispatch_recv", "ll_combine_send",
    "ll_combine_recv", "LLDispatched", "LLHandle", "LLDispatchPending", "LLCombinePending",
    "ReplicatedHandle",
    "quantize_fp8", "dequantize_fp8",
]
