"""The implementation registry: which backend function runs each public op.

Each public op validates its arguments (``jaxep._checks``), then calls ``lookup(...)`` once and
the function it returns once; that function implements the op whole, custom VJP included.

The rule, in one place: an op runs on ``comm.implementation(family)`` (``"cuda"`` or
``"xla"``), where ``family`` is the op itself for the ops that ``Communicator``
knows (``communicator.ALL_OPS``), and the one-phase op for a two-phase one (``ll_dispatch_send`` -> ``ll_dispatch``).
A receive runs on the backend whose send made its pending transfer (``pending.info`` is the CUDA
send kernel's, None from the pure-JAX send); ``_checks.pending`` has already refused a CUDA
pending on a communicator whose ops run pure JAX.

Every op has both entries; ``Communicator.implementation`` says where the kernels cannot run.
"""

from __future__ import annotations

from jaxep import _cuda_ops, _fallback, _xla_ops

# op -> {backend -> function}
IMPLEMENTATIONS = {
    "dispatch_layout": {"cuda": _cuda_ops.dispatch_layout, "xla": _xla_ops.dispatch_layout},
    "dispatch": {"cuda": _cuda_ops.dispatch, "xla": _xla_ops.dispatch},
    "combine": {"cuda": _cuda_ops.combine, "xla": _xla_ops.combine},
    "ll_dispatch": {"cuda": _cuda_ops.ll_dispatch, "xla": _xla_ops.ll_dispatch},
    "ll_dispatch_send": {"cuda": _cuda_ops.ll_dispatch_send, "xla": _xla_ops.ll_dispatch_send},
    "ll_dispatch_recv": {"cuda": _cuda_ops.ll_dispatch_recv, "xla": _xla_ops.ll_dispatch_recv},
    "ll_combine": {"cuda": _cuda_ops.ll_combine, "xla": _xla_ops.ll_combine},
    "ll_combine_send": {"cuda": _cuda_ops.ll_combine_send, "xla": _xla_ops.ll_combine_send},
    "ll_combine_recv": {"cuda": _cuda_ops.ll_combine_recv, "xla": _xla_ops.ll_combine_recv},
    "dispatch_grouped": {"cuda": _cuda_ops.dispatch_grouped, "xla": _xla_ops.dispatch_grouped},
    "combine_grouped": {"cuda": _cuda_ops.combine_grouped, "xla": _xla_ops.combine_grouped},
}

# op -> the op whose ``comm.implementation`` decides it
FAMILY = {op: op for op in IMPLEMENTATIONS} | {
    "ll_dispatch_send": "ll_dispatch", "ll_dispatch_recv": "ll_dispatch",
    "ll_combine_send": "ll_combine", "ll_combine_recv": "ll_combine"}


def backend(comm, op: str, pending=None) -> str:
    """``"cuda"`` or ``"xla"``: where ``op`` runs (see the module docstring)."""
    if pending is not None:
        return "xla" if pending.info is None else "cuda"
    return comm.implementation(FAMILY[op])


def lookup(comm, op: str, pending=None):
    """The function implementing ``op`` on ``comm`` (for a receive, ``pending``'s sender)."""
    if pending is None:
        _fallback.warn_once(comm, FAMILY[op])
    return IMPLEMENTATIONS[op][backend(comm, op, pending)]
