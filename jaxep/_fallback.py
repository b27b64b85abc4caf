"""A warning, once per communicator and cause, when the CUDA backend runs an op on the pure-JAX
path for a reason the user can change (issue 20, item 3)."""

from __future__ import annotations

import warnings
import weakref

from jaxep import _cuda

_warned: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # comm -> set of reasons


def reason(comm, op: str) -> str | None:
    """Why ``op`` (a family: ``dispatch``, ``combine``, ``ll_dispatch``, ``ll_combine``) runs on
    the ``xla`` path although ``comm.backend == "cuda"``, when the user can change it; None when
    it runs CUDA, the backend is ``xla`` (asked for, or no GPUs), or the user chose it
    (``EPConfig.low_latency=False``)."""
    if comm.backend != "cuda" or op == "dispatch_layout" or comm.implementation(op) == "cuda":
        return None
    cfg = comm.cfg
    if not comm._intranode or comm._internode:
        return f"{comm.transport_reason} (see Communicator.transport_reason)"
    if op in ("ll_dispatch", "ll_combine") and cfg.low_latency is None:
        sizes = (comm.num_ranks, cfg.max_tokens_per_rank, cfg.num_topk, cfg.num_experts,
                 cfg.hidden)
        if not _cuda.ll_supported(*sizes):
            return ("the low-latency kernels do not support these sizes (R, "
                    f"max_tokens_per_rank, K, E, hidden) = {sizes}")
        nbytes = _cuda.ll_workspace_bytes(
            comm.num_ranks, cfg.max_tokens_per_rank, cfg.num_topk, comm.num_local_experts,
            cfg.hidden, copy_engine=cfg.ll_copy_engine)
        return (f"the low-latency buffers would take {nbytes / 2**20:.0f} MiB, over the "
                f"automatic limit of 512 MiB: size a decode communicator "
                f"(max_tokens_per_rank = the decode batch per rank) or set "
                f"EPConfig.low_latency=True")
    return None


def warn_once(comm, op: str) -> None:
    """Issue the :func:`reason` for ``op`` as a ``UserWarning``, once per communicator and
    reason."""
    why = reason(comm, op)
    if why is None:
        return
    seen = _warned.setdefault(comm, set())
    if why in seen:
        return
    seen.add(why)
    warnings.warn(f"jaxep.{op} runs on the pure-JAX (xla) path although the backend is "
                  f"'cuda': {why}", UserWarning, stacklevel=4)
