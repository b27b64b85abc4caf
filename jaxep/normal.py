"""Normal (high-throughput) mode: :func:`dispatch_layout`, :func:`dispatch`, :func:`combine`,
and the expert-grouped form :func:`dispatch_grouped` / :func:`combine_grouped` (rows grouped by
local expert for ``jax.lax.ragged_dot``, combined with the routing weights applied).

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


# --------------------------------------------------------------------------------------------
# dispatch_grouped / combine_grouped
# --------------------------------------------------------------------------------------------


@_pytree
class GroupedHandle:
    """Routing of one :func:`dispatch_grouped`, consumed by :func:`combine_grouped` and the
    gradients.

    Attributes:
      src_index: ``[M]`` int32, for each grouped row its source ``src_rank * T + src_token``;
        -1 for padding rows (alignment padding and the rows after the last group).
      dest_row: ``[T, K]`` int32, for each local token's top-k entry the row it occupies in its
        destination rank's grouped output; -1 for -1 and invalid ids, for dropped pairs, and for
        a repeated listing of an expert (only the token's first listing names the shared row).
      dest_rank: ``[T, K]`` int32, the rank holding that row (the expert's rank); -1 where
        ``dest_row`` is -1.
      weights: ``[M]`` float32, each row's routing weight (``Grouped.weights``); differentiable:
        :func:`combine_grouped`'s weighting sends its gradient back to ``topk_weights``.
    """

    src_index: jax.Array
    dest_row: jax.Array
    dest_rank: jax.Array
    weights: jax.Array


@_pytree
class Grouped:
    """Result of :func:`dispatch_grouped` on the receiving rank: rows grouped by local expert,
    ready for ``jax.lax.ragged_dot(x, w[E_l, H, F], group_sizes)``.

    Attributes:
      x: ``[M, H]`` one row per received (token, local expert) pair, same dtype as the input;
        for an FP8 input the tuple ``(payload [M, H] float8_e4m3fn, scales [M, H/128])``, the
        scales grouped the same way. Rows are grouped by local expert slot (slot 0's group
        first); inside a group ordered by source rank, then source token; each group is followed
        by its alignment pad rows (zeros); after the last group come zero rows up to M (not
        written with ``zero_padding=False`` on a backend that honours it).
      group_sizes: ``[E_l]`` int32, rows of each local expert's group, pad rows included (each
        a multiple of ``EPConfig.expert_alignment``); ``sum(group_sizes) <= M``. Exactly the
        ``group_sizes`` operand of ``jax.lax.ragged_dot``.
      weights: ``[M]`` float32, each row's routing weight: the token's ``topk_weights`` entry
        for that expert (the sum of the entries when the token lists the expert more than once);
        0 on padding rows.
      num_dropped: int32 scalar, (token, local expert) pairs destined here but dropped because
        they did not fit in M rows (``EPConfig.grouped_capacity``).
      num_invalid: int32 scalar, entries of this rank's ``topk_idx`` outside ``[-1, E)``.
      handle: the :class:`GroupedHandle` for :func:`combine_grouped`.
    """

    x: jax.Array | tuple[jax.Array, jax.Array]
    group_sizes: jax.Array
    weights: jax.Array
    num_dropped: jax.Array
    num_invalid: jax.Array
    handle: GroupedHandle


def _grouped_rows(comm, num_tokens: int) -> int:
    """M: ``EPConfig.grouped_capacity`` or ``R*T*min(K, E_l) + E_l*(a - 1)``."""
    cfg = comm.cfg
    if cfg.grouped_capacity is not None:
        return cfg.grouped_capacity
    el = comm.num_local_experts
    return (comm.num_ranks * num_tokens * min(cfg.num_topk, el)
            + el * (cfg.expert_alignment - 1))


def dispatch_grouped(comm, x, topk_idx, topk_weights, *, zero_padding=True) -> Grouped:
    """Send each token to its experts' ranks, landing as expert-grouped rows for
    ``jax.lax.ragged_dot`` (normal mode, no sort or gather in user code)::

        g = jaxep.dispatch_grouped(comm, x, topk_idx, topk_weights)
        h = jax.nn.gelu(jax.lax.ragged_dot(g.x, w_in, g.group_sizes))     # w_in [E_l, H, F]
        out = jaxep.combine_grouped(comm, jax.lax.ragged_dot(h, w_out, g.group_sizes), g.handle)

    Each received (token, local expert) pair gets its own row: a token selecting three experts
    of a rank appears there three times, once in each expert's group (a token listing one expert
    twice gets one row, whose weight is the sum of the two entries).

    Args:
      comm: the :class:`jaxep.Communicator`.
      x: ``[T, H]`` bfloat16 (or float32), or the FP8 tuple ``(payload [T, H] float8_e4m3fn,
        scales [T, H/128] float32)`` as made by :func:`jaxep.quantize_fp8` (packed UE8M0 int32
        scales are moved as they are).
      topk_idx: ``[T, K]`` int32 global expert ids, -1 for none; ids outside ``[-1, E)`` are
        treated as -1 and counted in ``num_invalid``.
      topk_weights: ``[T, K]`` float32 routing weights.
      zero_padding: ``False`` leaves the rows after the last group unwritten (garbage): the
        CUDA kernels skip them; the pure-JAX (``xla``) backend writes zeros regardless. Alignment
        pad rows inside the groups are zeros either way, and their weight is 0.

    Returns:
      :class:`Grouped` with M rows: ``EPConfig.grouped_capacity``, or by default
      ``R * T * min(K, E_l) + E_l * (a - 1)`` (a = ``EPConfig.expert_alignment``), which never
      drops.

    Warning:
      Under a ``grouped_capacity`` the pairs are admitted in (source rank, source token, local
      slot) order while the rows used, each group rounded up to a multiple of a, fit in M; the
      first pair that does not fit and every pair after it are dropped (counted in
      ``num_dropped``), so a later pair is not squeezed into an earlier group's pad rows.
      ``combine_grouped`` returns 0 for dropped pairs. With ``zero_padding=False`` the rows past
      ``sum(group_sizes)`` may hold anything: ``ragged_dot`` ignores them, but do not reduce over
      them.

    Gradients: w.r.t. ``x`` the unweighted :func:`combine_grouped` of the rows' cotangents
    (float32 accumulation; pad rows and dropped pairs contribute nothing); w.r.t.
    ``topk_weights`` each row's weight cotangent (from ``weights`` and from
    :func:`combine_grouped`'s weighting through ``handle.weights``) goes to every top-k entry
    listing that expert. An FP8 ``x`` gets a zero gradient (its cotangent would be e4m3).

    Runs on ``comm.implementation("dispatch_grouped")``: the CUDA kernels write each received
    row once per local expert straight into its group (at most 512 local experts), else the
    pure-JAX path.
    """
    op = "dispatch_grouped"
    idx = _checks.dispatch(comm, op, x, topk_idx, topk_weights)
    if not isinstance(zero_padding, bool):
        raise TypeError(f"jaxep.{op}: zero_padding must be True or False, got {zero_padding!r}")
    impl = _backends.lookup(comm, op)
    rows = _grouped_rows(comm, idx.shape[0])
    gx, sizes, weights, dropped, invalid, src_index, dest_row, dest_rank = impl(
        comm, x, idx, topk_weights, rows, zero_padding=zero_padding)
    return Grouped(gx, sizes, weights, dropped, invalid,
                   GroupedHandle(src_index, dest_row, dest_rank, weights))


def combine_grouped(comm, y, handle: GroupedHandle, *, weighted=True):
    """Bring expert outputs in grouped rows back to their tokens and sum them, weighted.

    Args:
      comm: the :class:`jaxep.Communicator`.
      y: ``[M, H]`` bfloat16 or float32, one row per row of the :func:`dispatch_grouped` whose
        ``handle`` is given (e.g. ``jax.lax.ragged_dot(h, w_out, g.group_sizes)``); pad rows and
        rows after the last group are ignored (masked, so a NaN there does not spread).
      handle: ``Grouped.handle``.
      weighted: multiply each row by its routing weight (``handle.weights``) before summing;
        ``False`` sums the rows unweighted.

    Returns:
      ``[T, H]`` in ``y.dtype``: per token the sum over its rows on every rank of
      ``weight * y[row]`` (accumulated in float32); 0 for tokens sent nowhere or whose pairs were
      all dropped.

    Gradients: w.r.t. ``y`` the output cotangent dispatched along ``handle`` (times the row's
    weight when ``weighted``; 0 on padding rows); w.r.t. ``handle.weights`` (with ``weighted``)
    ``<g_out[token], y[row]>``, which :func:`dispatch_grouped`'s gradient sends on to
    ``topk_weights``.

    Runs on ``comm.implementation("combine_grouped")``; the CUDA kernel pulls each token's rows
    from the ranks holding them (float32 accumulation in top-k order, so it matches the pure-JAX
    path, which adds per-rank partial sums in rank order, within float32 rounding).
    """
    op = "combine_grouped"
    _checks.ep_group(comm, op)
    _checks.grouped_handle(comm, op, handle, GroupedHandle, partial(_grouped_rows, comm))
    _checks.array(op, "y", y, 2, FLOAT_DTYPES)
    _checks.dim(op, "y.shape[0] (rows of the grouped dispatch, M)", handle.src_index.shape[0],
                y.shape[0])
    _checks.hidden(comm, op, "y", y.shape[1])
    if not isinstance(weighted, bool):
        raise TypeError(f"jaxep.{op}: weighted must be True or False, got {weighted!r}")
    return _backends.lookup(comm, op)(comm, y, handle, weighted=weighted)
