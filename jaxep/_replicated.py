"""Replicated tokens: inputs that do not vary over the EP axes (issue 20, item 1).

Many models keep activations replicated over the mesh axis that holds the experts, so every
rank passes the same ``x``. Dispatching it as it is would send every token R times (R x the
traffic and expert compute, the same result). Inside ``shard_map`` with ``check_vma=True``
(the default) JAX types such an ``x`` as not varying over the EP axes, and the public ops
detect it (:func:`detect`) and wrap their usual path:

- dispatch: pad T to a multiple of R with ``topk_idx = -1`` rows (zeros, weight 0), and let rank
  r dispatch rows ``[r * T/R, (r + 1) * T/R)`` of it (``jax.lax.axis_index`` over the EP axes);
  the result's handle is a :class:`ReplicatedHandle` that remembers T (static).
- combine: combine the rank's share as usual, then all-gather the shares over the EP axes
  (typed as invariant, i.e. replicated) and drop the padding: ``[T, H]``, replicated, equal to
  the replicated computation's. ``ll_combine`` pads and slices the ``topk_idx`` /
  ``topk_weights`` it is given the same way.

So each token is dispatched once over the whole EP group; ``max_tokens_per_rank`` bounds the
share, ``ceil(T / R)``. With ``check_vma=False`` (or outside the varying-axes typing) nothing
tells replicated inputs apart: every rank then dispatches every token it is given (correct
result, R x the traffic); slice the tokens yourself there. The two-phase low-latency forms
and ``dispatch_layout`` take inputs as they are.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxep import _checks, _cuda


@dataclasses.dataclass(frozen=True)
class ReplicatedHandle:
    """Handle of a dispatch whose inputs were replicated over the EP axes.

    Attributes:
      handle: the rank's own :class:`jaxep.DispatchHandle` or :class:`jaxep.LLHandle` (of its
        ``ceil(T / R)`` token share).
      num_tokens: static: T, the replicated token count (the combine's output rows).
    """

    handle: object
    num_tokens: int


jax.tree_util.register_dataclass(ReplicatedHandle, data_fields=["handle"],
                                 meta_fields=["num_tokens"])


def _leaves_2d(arrays, t) -> bool:
    for a in jax.tree.leaves(arrays):
        shape = getattr(a, "shape", None)
        if shape is None or len(shape) != 2 or shape[0] != t:
            return False
    return True


def detect(comm, op: str, x, *others) -> bool:
    """For the public op ``op`` (after checking ``comm`` and its EP axes): whether ``x`` (an
    array or the FP8 tuple) and ``others`` are replicated over the EP axes: inside a shard_map binding them with varying-axes checking, none of them varies over any
    EP axis, and they are well-formed ``[T, ...]`` arrays with T > 0 (anything else takes the
    usual path, which reports what is wrong)."""
    _checks.ep_group(comm, op)
    axes = tuple(comm.cfg.axis_names)
    first = x[0] if isinstance(x, tuple) else x
    shape = getattr(first, "shape", None)
    if shape is None or len(shape) != 2 or shape[0] == 0 or comm.num_ranks == 1:
        return False
    if not _leaves_2d((x, others), shape[0]) or not _cuda._vma_checked(axes):
        return False
    return not any(_cuda._varying_axes(a) & set(axes) for a in jax.tree.leaves((x, others)))


def _rank(comm):
    axes = comm.cfg.axis_names
    return jax.lax.axis_index(axes[0] if len(axes) == 1 else tuple(axes))


def share(comm, a, fill):
    """This rank's rows of ``a [T, ...]`` padded to a multiple of R with ``fill``."""
    r = comm.num_ranks
    t = a.shape[0]
    per = -(-t // r)
    pad = per * r - t
    if pad:
        a = jnp.concatenate([a, jnp.full((pad,) + a.shape[1:], fill, a.dtype)])
    return jax.lax.dynamic_slice_in_dim(a, _rank(comm) * per, per)


def shares(comm, x, topk_idx, topk_weights=None):
    """This rank's share of ``x`` (array or FP8 tuple, zero-padded), ``topk_idx`` (-1) and
    ``topk_weights`` (0; None stays None)."""
    x = jax.tree.map(lambda a: share(comm, a, 0), x)
    idx = share(comm, topk_idx, -1)
    w = None if topk_weights is None else share(comm, topk_weights, 0)
    return x, idx, w


def _all_gather_invariant():
    fn = getattr(jax.lax, "all_gather_invariant", None)
    if fn is None:
        try:
            from jax._src.lax.parallel import all_gather_invariant as fn
        except ImportError:  # pragma: no cover -- older/newer jax: the psum form below
            fn = None
    return fn


def gather(comm, out, num_tokens: int):
    """The ranks' shares ``out [T/R, ...]`` all-gathered over the EP axes as a replicated
    ``[T, ...]`` (padding dropped)."""
    axes = comm.cfg.axis_names
    axis = axes[0] if len(axes) == 1 else tuple(axes)
    fn = _all_gather_invariant()
    if fn is not None:
        full = fn(out, axis, axis=0, tiled=True)
    else:  # each rank's share in place, zeros elsewhere, summed: exact, typed invariant
        per = out.shape[0]
        full = jnp.zeros((per * comm.num_ranks,) + out.shape[1:], out.dtype)
        full = jax.lax.dynamic_update_slice_in_dim(full, out, _rank(comm) * per, 0)
        full = jax.lax.psum(full, axis)
    return full[:num_tokens]


def ll_combine(comm, op: str, y, topk_idx, topk_weights, handle: ReplicatedHandle, inner):
    """``ll_combine`` after a replicated ``ll_dispatch``: ``topk_idx`` / ``topk_weights`` are
    the full ``[T, K]``; ``inner`` is the op on this rank's share."""
    for name, a in (("topk_idx", topk_idx), ("topk_weights", topk_weights)):
        _checks.array(op, name, a, 2)
        _checks.dim(op, f"{name}.shape[0] (the replicated ll_dispatch's tokens)",
                    handle.num_tokens, a.shape[0])
    idx, w = share(comm, topk_idx, -1), share(comm, topk_weights, 0)
    return gather(comm, inner(comm, y, idx, w, handle.handle), handle.num_tokens)
