"""Normal (high-throughput) mode: :func:`dispatch_layout`, :func:`dispatch`, :func:`combine`.

All three run per rank inside ``jax.shard_map`` over the communicator's mesh, on the local
shard of each array. Notation: R ranks in the EP group, E experts, E_l = E / R local experts,
T tokens on this rank (``<= max_tokens_per_rank``), K = ``num_topk``, H = ``hidden``,
C = ``recv_capacity`` (``R * T`` when unset).

Each token is sent **once per destination rank** that holds at least one of its experts
(deduplicated across that rank's experts). Received rows are ordered by source rank, then by
source token index; rows past ``num_tokens`` are padding (zeros, ``topk_idx = -1``, weight 0).
Expert ids outside ``[-1, E)`` are treated as -1 and counted in ``num_invalid``. When more than
C rows are destined to a rank, the rows past the first C (in that order) are dropped and counted
in ``num_dropped``; combine returns nothing for them.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax

from jaxep import _backends, _checks, _replicated
from jaxep._checks import FLOAT_DTYPES


def _pytree(cls):
    cls = dataclasses.dataclass(frozen=True)(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    return jax.tree_util.register_dataclass(cls, data_fields=fields, meta_fields=[])


@_pytree
class Layout:
    """Result of :func:`dispatch_layout` (all int32 unless noted).

    Attributes:
      tokens_per_rank: ``[R]`` local tokens with at least one expert on each rank.
      tokens_per_expert: ``[E]`` local tokens that selected each global expert (a token listing
        an expert twice counts once).
      is_token_in_rank: ``[T, R]`` bool, token t has an expert on rank r.
    """

    tokens_per_rank: jax.Array
    tokens_per_expert: jax.Array
    is_token_in_rank: jax.Array


@_pytree
class DispatchHandle:
    """Routing of one :func:`dispatch`, consumed by :func:`combine` and the gradients.

    Attributes:
      src_index: ``[C]`` int32, for each received row its source ``src_rank * T + src_token``;
        -1 for padding rows.
      send_slot: ``[T, R]`` int32, for each local token the row it occupies in each destination
        rank's output; -1 where it was not sent there or was dropped for capacity.
    """

    src_index: jax.Array
    send_slot: jax.Array


@_pytree
class Dispatched:
    """Result of :func:`dispatch` on the receiving rank.

    Attributes:
      x: ``[C, H]`` received rows, same dtype as the input; for an FP8 input the tuple
        ``(payload [C, H] float8_e4m3fn, scales [C, H/128])``.
      topk_idx: ``[C, K]`` int32, the *local* expert slot (``0 <= s < E_l``) of each of the row's
        top-k experts held by this rank; -1 for experts on other ranks, invalid, and padding.
      topk_weights: ``[C, K]`` the token's weights where ``topk_idx >= 0``, 0 elsewhere.
      num_tokens: int32 scalar, valid rows (``min(received, C)``).
      tokens_per_expert: ``[E_l]`` int32, valid rows per local expert (a row counts once per
        expert).
      num_dropped: int32 scalar, rows destined here but dropped because they exceeded C.
      num_invalid: int32 scalar, entries of this rank's ``topk_idx`` outside ``[-1, E)``.
      handle: the :class:`DispatchHandle` for :func:`combine`.
    """

    x: jax.Array | tuple[jax.Array, jax.Array]
    topk_idx: jax.Array
    topk_weights: jax.Array
    num_tokens: jax.Array
    tokens_per_expert: jax.Array
    num_dropped: jax.Array
    num_invalid: jax.Array
    handle: DispatchHandle


# --------------------------------------------------------------------------------------------
# dispatch_layout
# --------------------------------------------------------------------------------------------


def dispatch_layout(comm, topk_idx) -> Layout:
    """Count where this rank's tokens go: see :class:`Layout`.

    Args:
      comm: the :class:`jaxep.Communicator`.
      topk_idx: ``[T, K]`` int32 global expert ids, -1 for none (ids outside ``[-1, E)`` are
        treated as -1).

    Integer outputs, no gradient. Runs the CUDA kernel ``jaxep_dispatch_layout_ffi`` with the
    ``cuda`` backend.
    """
    idx = _checks.dispatch_layout(comm, "dispatch_layout", topk_idx)
    impl = _backends.lookup(comm, "dispatch_layout")
    return Layout(*impl(comm, idx))


# --------------------------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------------------------


def _capacity(comm, num_tokens: int) -> int:
    return comm.cfg.recv_capacity or comm.num_ranks * num_tokens


def dispatch(comm, x, topk_idx, topk_weights) -> Dispatched:
    """Send each token to the ranks holding its top-k experts (normal mode).

    Args:
      comm: the :class:`jaxep.Communicator`.
      x: ``[T, H]`` bfloat16 (or float32), or the FP8 tuple ``(payload [T, H] float8_e4m3fn,
        scales [T, H/128] float32)`` as made by :func:`jaxep.quantize_fp8` (packed UE8M0 int32
        scales are moved as they are).
      topk_idx: ``[T, K]`` int32 global expert ids, -1 for none.
      topk_weights: ``[T, K]`` float32 routing weights.

    Returns:
      :class:`Dispatched`, with ``C = EPConfig.recv_capacity or R * T`` rows.

    Replicated tokens: when ``x``, ``topk_idx`` and ``topk_weights`` do not vary over the EP
    axes (``shard_map`` with ``check_vma=True``), rank r dispatches only its ``ceil(T / R)``
    share of them (T padded with ``topk_idx = -1`` rows), the handle is a
    :class:`jaxep.ReplicatedHandle`, and :func:`combine` returns the replicated ``[T, H]``
    (see ``jaxep._replicated``; with ``check_vma=False`` every rank dispatches every token).

    Gradients: w.r.t. ``x`` a :func:`combine` of the rows' cotangents (the unweighted sum over a
    token's copies; dropped copies contribute nothing); w.r.t. ``topk_weights`` each received
    weight's cotangent gathered back to ``[T, K]``. An FP8 ``x`` gets a zero gradient (its
    cotangent would be e4m3); ``topk_weights`` still gets its gradient.
    """
    if _replicated.detect(comm, "dispatch", x, topk_idx, topk_weights):
        d = dispatch(comm, *_replicated.shares(comm, x, topk_idx, topk_weights))
        t = (x[0] if isinstance(x, tuple) else x).shape[0]
        return dataclasses.replace(d, handle=_replicated.ReplicatedHandle(d.handle, t))
    idx = _checks.dispatch(comm, "dispatch", x, topk_idx, topk_weights)
    impl = _backends.lookup(comm, "dispatch")
    *fields, src_index, send_slot = impl(comm, x, idx, topk_weights, _capacity(comm, idx.shape[0]))
    return Dispatched(*fields, DispatchHandle(src_index, send_slot))


# --------------------------------------------------------------------------------------------
# combine
# --------------------------------------------------------------------------------------------


def combine(comm, y, handle: DispatchHandle):
    """Bring expert outputs back to their tokens and sum them (normal mode).

    Args:
      comm: the :class:`jaxep.Communicator`.
      y: ``[C, H]`` bfloat16 (or float32), one row per received row of the :func:`dispatch`
        whose ``handle`` is given; padding rows are ignored. Apply ``topk_weights`` before
        combining if a weighted sum is wanted.
      handle: ``Dispatched.handle`` (a :class:`jaxep.ReplicatedHandle` when the dispatch's
        inputs were replicated: the result is then the replicated ``[T, H]``).

    Returns:
      ``[T, H]`` in ``y.dtype``: per token the sum (accumulated in float32) of its rows across
      the ranks it was sent to; 0 for tokens sent nowhere or only dropped. Unweighted, unlike
      :func:`jaxep.ll_combine`, which applies ``topk_weights`` itself: here multiply each row
      by its ``Dispatched.topk_weights`` before combining.

    Gradient: w.r.t. ``y`` a dispatch of the output cotangent along ``handle``.
    """
    op = "combine"
    if isinstance(handle, _replicated.ReplicatedHandle):
        return _replicated.gather(comm, combine(comm, y, handle.handle), handle.num_tokens)
    _checks.ep_group(comm, op)
    _checks.dispatch_handle(comm, op, handle, DispatchHandle, partial(_capacity, comm))
    _checks.array(op, "y", y, 2, FLOAT_DTYPES)
    _checks.dim(op, "y.shape[0] (rows of the dispatch, C)", handle.src_index.shape[0],
                y.shape[0])
    _checks.hidden(comm, op, "y", y.shape[1])
    return _backends.lookup(comm, op)(comm, y, handle)
