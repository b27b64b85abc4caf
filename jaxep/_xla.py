"""Pure-JAX backend: ``lax.all_to_all`` over static worst-case ``[R, T, ...]`` buffers.

Runs on any XLA platform and is differentiable by plain autodiff. It defines the semantics the
CUDA kernels must match (docs/design.md, "Semantics contract") and serves as their test oracle. Every function here runs
per rank inside ``jax.shard_map``; ``comm`` supplies the static placement and sizes.

Normal mode sends each token once per destination rank; low-latency mode keeps one row per
(token, selected expert). Received rows are compacted in the order (source rank, source token)
(per expert in low-latency mode); rows past the valid count are zero padding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def zero_cotangent(x):
    """The zero cotangent of ``x`` (float0 for integer arrays), for custom VJPs."""
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)  # keeps the per-rank (manual) axis type inside shard_map
    return np.zeros(x.shape, jax.dtypes.float0)


def _axis(comm):
    names = comm.cfg.axis_names
    return names[0] if len(names) == 1 else names


def _a2a(comm, x):
    """``x [R, ...]``: block ``r`` goes to rank ``r``; returns block ``r`` from rank ``r``."""
    return lax.all_to_all(x, _axis(comm), 0, 0, tiled=True)


def rank_index(comm):
    return lax.axis_index(_axis(comm))


def sanitize(comm, topk_idx):
    """(valid ids, -1 elsewhere) and the number of ids outside ``[-1, E)``."""
    e = comm.cfg.num_experts
    valid = (topk_idx >= 0) & (topk_idx < e)
    num_invalid = jnp.sum((~valid) & (topk_idx != -1), dtype=jnp.int32)
    return jnp.where(valid, topk_idx, -1), num_invalid


def _first_occurrence(idx):
    """``[T, K]`` bool: entry is a valid id not listed earlier in its row."""
    k = idx.shape[-1]
    earlier = jnp.tril(jnp.ones((k, k), bool), -1)  # earlier[k, j]: j < k
    dup = jnp.any((idx[:, :, None] == idx[:, None, :]) & earlier, axis=-1)
    return (idx >= 0) & ~dup


def _lookup(table, idx):
    """``table[idx]`` for valid ``idx`` (>= 0), -1 elsewhere."""
    return jnp.where(idx >= 0, jnp.asarray(table)[jnp.maximum(idx, 0)], -1)


def _compact(mask, capacity):
    """Stable compaction of a flat bool ``mask [N]`` into ``capacity`` rows.

    Returns ``(src [capacity] int32`` (index into N of each output row, -1 for padding),
    ``pos [N] int32`` (output row of each kept entry, -1 for not selected or dropped),
    ``total`` (selected entries, before dropping))``.
    """
    n = mask.shape[0]
    pos = jnp.cumsum(mask, dtype=jnp.int32) - 1
    keep = mask & (pos < capacity)
    pos = jnp.where(keep, pos, -1)
    src = jnp.full((capacity,), -1, jnp.int32).at[jnp.where(keep, pos, capacity)].set(
        jnp.arange(n, dtype=jnp.int32), mode="drop")
    return src, pos, jnp.sum(mask, dtype=jnp.int32)


def _gather_rows(rows, idx):
    """``rows[idx]`` with zeros where ``idx == -1`` (``rows [N, ...]``, ``idx [...]``).

    With N = 0 (no token on any rank) every ``idx`` is -1 and the result is all zeros.
    """
    if rows.shape[0] == 0:  # jnp.take refuses an empty axis: take from one row of zeros
        rows = jnp.concatenate([rows, jnp.zeros((1,) + rows.shape[1:], rows.dtype)])
    out = jnp.take(rows, jnp.maximum(idx, 0), axis=0)
    valid = (idx >= 0).reshape(idx.shape + (1,) * (rows.ndim - 1))
    return jnp.where(valid, out, jnp.zeros((), rows.dtype))


def _scatter_rows(rows, idx, n):
    """Inverse of :func:`_gather_rows`: ``out[idx[i]] = rows[i]``; ``idx`` unique or -1."""
    out = jnp.zeros((n,) + rows.shape[1:], rows.dtype)
    return out.at[jnp.where(idx >= 0, idx, n)].add(rows, mode="drop")


# ---------------------------------------------------------------------------------------------
# Normal mode
# ---------------------------------------------------------------------------------------------


def token_rank_mask(comm, idx):
    """``[T, R]`` bool: token t has a valid expert on rank r (``idx`` already sanitised)."""
    dest = _lookup(comm.expert_rank, idx)
    return jnp.any(dest[:, :, None] == jnp.arange(comm.num_ranks)[None, None, :], axis=1)


def dispatch_layout(comm, topk_idx):
    """``(tokens_per_rank [R], tokens_per_expert [E], is_token_in_rank [T, R])``."""
    idx, _ = sanitize(comm, topk_idx)
    in_rank = token_rank_mask(comm, idx)
    first = _first_occurrence(idx)
    e = comm.cfg.num_experts
    per_expert = jnp.zeros((e + 1,), jnp.int32).at[jnp.where(first, idx, e)].add(1)[:e]
    return jnp.sum(in_rank, axis=0, dtype=jnp.int32), per_expert, in_rank


def make_handle(comm, in_rank, capacity):
    """Routing of one normal-mode call, from the ``[T, R]`` mask of the local tokens.

    Returns ``(src_index [C], send_slot [T, R], num_received)``: the flat source position
    ``src_rank * T + src_token`` of each received row (-1 for padding), the row of each local
    token in each destination's output (-1 when not sent or dropped), and the number of rows
    destined to this rank before capacity was applied.
    """
    t, r = in_rank.shape
    recv_mask = _a2a(comm, in_rank.T)  # [R(src), T]
    src_index, pos, total = _compact(recv_mask.reshape(-1), capacity)
    send_slot = _a2a(comm, pos.reshape(r, t)).T  # [T, R(dest)]
    return src_index, send_slot, total


def dispatch_rows(comm, rows, src_index):
    """Move ``rows [T, ...]`` to the ranks of ``src_index`` (a handle's): ``[C, ...]``."""
    r = comm.num_ranks
    buf = jnp.broadcast_to(rows[None], (r,) + rows.shape)
    recv = _a2a(comm, buf)  # [R(src), T, ...]
    return _gather_rows(recv.reshape((-1,) + rows.shape[1:]), src_index)


def combine_rows(comm, rows, src_index, send_slot):
    """Return ``rows [C, ...]`` to their source tokens and sum per token: ``[T, ...]``.

    Sums in float32 (for floating inputs) and returns ``rows.dtype``.
    """
    t, r = send_slot.shape
    acc = jnp.float32 if jnp.issubdtype(rows.dtype, jnp.floating) else rows.dtype
    buf = _scatter_rows(rows, src_index, r * t).reshape((r, t) + rows.shape[1:])
    back = _a2a(comm, buf)  # [R(dest), T, ...]: what each destination sent back
    sent = (send_slot.T >= 0).reshape((r, t) + (1,) * (rows.ndim - 1))
    out = jnp.sum(jnp.where(sent, back.astype(acc), 0), axis=0)
    return out.astype(rows.dtype)


def local_topk(comm, global_idx):
    """Global expert ids -> this rank's local slots (-1 for experts held elsewhere)."""
    me = rank_index(comm)
    on_me = _lookup(comm.expert_rank, global_idx) == me
    return jnp.where(on_me, _lookup(comm.expert_slot, global_idx), -1)


def dispatch(comm, x, topk_idx, topk_weights, capacity):
    """Normal-mode dispatch; ``x`` an array or a tuple of arrays (fp8 payload, scales).

    Returns a dict with the fields of :class:`jaxep.Dispatched` (``handle`` as its two arrays).
    """
    idx, num_invalid = sanitize(comm, topk_idx)
    in_rank = token_rank_mask(comm, idx)
    src_index, send_slot, total = make_handle(comm, in_rank, capacity)
    move = lambda a: dispatch_rows(comm, a, src_index)  # noqa: E731
    recv_x = tuple(move(a) for a in x) if isinstance(x, tuple) else move(x)
    recv_idx = jnp.where(src_index[:, None] >= 0, local_topk(comm, move(idx)), -1)
    recv_w = jnp.where(recv_idx >= 0, move(topk_weights), jnp.zeros((), topk_weights.dtype))
    el = comm.num_local_experts
    first = _first_occurrence(recv_idx)
    per_expert = jnp.zeros((el + 1,), jnp.int32).at[jnp.where(first, recv_idx, el)].add(1)[:el]
    kept = jnp.minimum(total, capacity)
    return dict(x=recv_x, topk_idx=recv_idx, topk_weights=recv_w, num_tokens=kept,
                tokens_per_expert=per_expert, num_dropped=total - kept,
                num_invalid=num_invalid, src_index=src_index, send_slot=send_slot)


DISPATCHED_FIELDS = ("x", "topk_idx", "topk_weights", "num_tokens", "tokens_per_expert",
                     "num_dropped", "num_invalid", "src_index", "send_slot")


def dispatched_fields(out: dict) -> tuple:
    """A dispatch's dict as the tuple of :class:`jaxep.Dispatched`'s fields in order (the
    handle's two arrays last), as the backends' ``dispatch`` return it."""
    return tuple(out[f] for f in DISPATCHED_FIELDS)


# ---------------------------------------------------------------------------------------------
# Low-latency mode
# ---------------------------------------------------------------------------------------------


def ll_copy_topk(comm, idx):
    """``[R, E_l, T]`` int32: the top-k entry (first listing) by which token t selected expert
    (rank r, slot e), -1 where it did not (sanitised ``idx``)."""
    first = _first_occurrence(idx)
    k = idx.shape[1]
    onehot = (idx[:, :, None] == jnp.asarray(comm.global_expert).reshape(-1)[None, None, :])
    hit = onehot & first[:, :, None]  # [T, K, E] in (rank, slot) order; one k at most per e
    entry = jnp.max(jnp.where(hit, jnp.arange(k, dtype=jnp.int32)[None, :, None], -1), axis=1)
    return entry.T.reshape(comm.num_ranks, comm.num_local_experts, -1)


def ll_send(comm, rows, copy_topk):
    """Send phase: ``rows [T, ...]`` -> received ``[R(src), E_l, T, ...]`` and the received
    ``copy_topk`` (see :func:`ll_copy_topk`; -1 marks an empty cell).

    Every (destination, local expert, token) cell is a static slot of the worst-case buffer;
    cells of tokens that did not select that expert are zero.
    """
    r, el, t = copy_topk.shape
    shape = (r, el) + rows.shape
    m = (copy_topk >= 0).reshape((r, el, t) + (1,) * (rows.ndim - 1))
    buf = jnp.where(m, jnp.broadcast_to(rows, shape), jnp.zeros((), rows.dtype))
    return _a2a(comm, buf), _a2a(comm, copy_topk)


def ll_layout(comm, recv_mask):
    """Receiver-side compaction of ``recv_mask [R(src), E_l, T]``.

    Returns ``(src_index [E_l, R*T]`` (flat ``src_rank * T + token`` per row, -1 padding),
    ``pos [R(src), E_l, T]`` (row of each copy, -1 when absent), ``counts [E_l])``.
    """
    r, el, t = recv_mask.shape
    per_expert = jnp.transpose(recv_mask, (1, 0, 2)).reshape(el, r * t)
    src_index, pos, counts = jax.vmap(lambda m: _compact(m, r * t))(per_expert)
    pos = jnp.transpose(pos.reshape(el, r, t), (1, 0, 2))
    return src_index, pos, counts


def ll_unpack(rows, src_index):
    """Receive phase: ``rows [R(src), E_l, T, ...]`` -> ``[E_l, R*T, ...]`` compacted."""
    r, el, t = rows.shape[:3]
    per_expert = jnp.transpose(rows, (1, 0, 2) + tuple(range(3, rows.ndim)))
    per_expert = per_expert.reshape((el, r * t) + rows.shape[3:])
    return jax.vmap(_gather_rows)(per_expert, src_index)


def ll_combine_send(comm, y, src_index):
    """Send phase of combine: ``y [E_l, R*T, ...]`` -> ``[R(dest), E_l, T, ...]`` at the source."""
    el, rt = src_index.shape
    r = comm.num_ranks
    t = rt // r
    buf = jax.vmap(lambda rows, s: _scatter_rows(rows, s, rt))(y, src_index)
    buf = buf.reshape((el, r, t) + y.shape[2:])
    buf = jnp.transpose(buf, (1, 0, 2) + tuple(range(3, buf.ndim)))
    return _a2a(comm, buf)


def ll_combine_recv(comm, back, topk_idx, topk_weights, prereduce=False):
    """Receive phase of combine: ``sum_k w[t, k] * back[rank(e_k), slot(e_k), t]`` in f32.

    Invalid entries (-1 or outside ``[-1, E)``) contribute nothing: their gathered row is
    replaced by zeros (``where``) rather than multiplied by a zero weight, so an Inf or NaN in
    the row they happen to point at does not turn into a NaN in the output.

    ``prereduce``: as the pre-reduced CUDA combine, the entries of each expert rank are summed
    first (f32), then the partial sums over the ranks (f32); with True a partial of two or more
    distinct experts is rounded to ``back.dtype`` first (a single expert's row is not: the
    CUDA send sends it as it is); with ``"float32"`` none is.
    """
    idx, _ = sanitize(comm, topk_idx)
    dest = jnp.maximum(_lookup(comm.expert_rank, idx), 0)
    slot = jnp.maximum(_lookup(comm.expert_slot, idx), 0)
    t = jnp.arange(idx.shape[0])[:, None]
    rows = back[dest, slot, t].astype(jnp.float32)  # [T, K, ...]
    valid = (idx >= 0).reshape(idx.shape + (1,) * (rows.ndim - 2))
    rows = jnp.where(valid, rows, 0.0)  # not rows * 0: an invalid entry adds nothing
    w = jnp.where(idx >= 0, topk_weights, 0).astype(jnp.float32)
    w = w.reshape(w.shape + (1,) * (rows.ndim - 2))
    terms = rows * w
    if not prereduce:
        return jnp.sum(terms, axis=1).astype(back.dtype)
    at = dest * (idx >= 0) + (idx < 0) * comm.num_ranks  # [T, K]; R: no rank
    first = _first_occurrence(idx)
    total = 0.0
    for r in range(comm.num_ranks):
        part = jnp.sum(jnp.where((at == r).reshape(w.shape), terms, 0.0), axis=1)
        if prereduce is True:
            several = jnp.sum(first & (at == r), axis=1) >= 2  # [T]
            several = several.reshape(several.shape + (1,) * (part.ndim - 1))
            part = jnp.where(several, part.astype(back.dtype).astype(jnp.float32), part)
        total = total + part
    return total.astype(back.dtype)


def ll_recv_rows(src_index, src_topk, num_topk):
    """``[R*T, K]`` int32: the row (``local expert * R*T + row``) of each received (source
    token, top-k entry), -1 where none: the inverse of ``(src_index, src_topk)``."""
    el, rt = src_index.shape
    ok = src_index >= 0
    token = jnp.where(ok, src_index, rt).reshape(-1)  # rt: out of range, dropped
    entry = jnp.where(ok, src_topk, 0).reshape(-1)
    rows = jnp.arange(el * rt, dtype=jnp.int32)
    return jnp.full((rt, num_topk), -1, jnp.int32).at[token, entry].set(rows, mode="drop")


# ---------------------------------------------------------------------------------------------
# Grouped normal mode: one row per received (token, local expert) pair, grouped by local slot
# ---------------------------------------------------------------------------------------------


def grouped_cells(comm, idx, topk_weights):
    """Sender side, from sanitised ``idx [T, K]``: ``(present [R, T, E_l] bool, weight
    [R, T, E_l] float32)``: token t selected the expert at (rank, slot), and the sum of the
    weights of every top-k entry listing it (a token listing an expert twice: one pair)."""
    r, el = comm.num_ranks, comm.num_local_experts
    dest = _lookup(comm.expert_rank, idx)
    slot = _lookup(comm.expert_slot, idx)
    cell = jnp.where(idx >= 0, dest * el + slot, r * el)  # [T, K]; r*el: no cell
    hit = cell[:, :, None] == jnp.arange(r * el, dtype=jnp.int32)[None, None, :]  # [T, K, R*E_l]
    w = jnp.where(hit, topk_weights.astype(jnp.float32)[:, :, None], 0.0)
    present = jnp.any(hit, axis=1).reshape(-1, r, el)
    weight = jnp.sum(w, axis=1).reshape(-1, r, el)
    return jnp.transpose(present, (1, 0, 2)), jnp.transpose(weight, (1, 0, 2))


def grouped_layout(present, alignment: int, rows: int):
    """Receiver side: where each received pair goes.

    ``present [R(src), T, E_l]`` bool, the pairs received, in admission order when flattened
    (source rank, source token, local slot). A pair is admitted while the rows used so far,
    each group rounded up to a multiple of ``alignment``, stay within ``rows`` (the rows used
    only grow, so the admitted pairs are a prefix of that order).

    Returns ``(pos [R, T, E_l] int32`` (row of each admitted pair, -1 elsewhere),
    ``group_sizes [E_l] int32`` (admitted pairs per group rounded up to ``alignment``),
    ``num_dropped`` int32)``.
    """
    r, t, el = present.shape
    p = present.reshape(r * t, el).astype(jnp.int32)
    before = jnp.cumsum(p, axis=0) - p                       # pair's index inside its group
    opens = (p > 0) & (before % alignment == 0)                # it starts a new aligned block
    # rows used through each pair: every opened block is ``alignment`` rows
    used = alignment * jnp.cumsum(opens.reshape(-1), dtype=jnp.int32).reshape(r * t, el)
    admitted = (p > 0) & (used <= rows)
    counts = jnp.sum(admitted, axis=0, dtype=jnp.int32)
    sizes = (counts + alignment - 1) // alignment * alignment
    offsets = jnp.cumsum(sizes) - sizes
    pos = jnp.where(admitted, offsets[None, :] + before, -1).astype(jnp.int32)
    dropped = jnp.sum(p, dtype=jnp.int32) - jnp.sum(counts)
    return pos.reshape(r, t, el), sizes.astype(jnp.int32), dropped


def grouped_dest_rows(comm, idx, pos_back):
    """``[T, K]`` int32: the row of each top-k entry in its destination's grouped output, -1
    for -1 / invalid ids, dropped pairs and repeated listings of an expert (only a token's first
    listing of an expert names its row). ``pos_back [R(dest), T, E_l]``: the receivers' ``pos``
    returned to the source."""
    return _at_topk(comm, idx, pos_back, first_only=True, fill=-1)


def _at_topk(comm, idx, cells, first_only, fill):
    """``cells [R(dest), T, E_l]`` read at each top-k entry's (rank, token, slot): ``[T, K]``;
    ``fill`` for -1 / invalid ids (and, with ``first_only``, repeated listings)."""
    dest = jnp.maximum(_lookup(comm.expert_rank, idx), 0)
    slot = jnp.maximum(_lookup(comm.expert_slot, idx), 0)
    t = jnp.arange(idx.shape[0])[:, None]
    keep = _first_occurrence(idx) if first_only else idx >= 0
    return jnp.where(keep, cells[dest, t, slot], fill)


def dispatch_grouped(comm, x, topk_idx, topk_weights, rows):
    """Grouped dispatch; ``x`` an array or a tuple of arrays (fp8 payload, scales).

    Returns a dict with the fields of :class:`jaxep.Grouped` (``handle`` as its arrays
    ``src_index [M]``, ``dest_row``, ``dest_rank [T, K]``; the handle's ``weights`` are
    ``weights``), plus
    the receiver's layout ``pos`` and the sanitised ``idx`` for the weights' gradient.
    Padding rows are always zeros here (``zero_padding`` does not apply).
    """
    idx, num_invalid = sanitize(comm, topk_idx)
    t = idx.shape[0]
    r, el = comm.num_ranks, comm.num_local_experts
    present, weight = grouped_cells(comm, idx, topk_weights)
    recv_present = _a2a(comm, present)  # [R(src), T, E_l]
    recv_weight = _a2a(comm, weight)
    pos, group_sizes, num_dropped = grouped_layout(recv_present, comm.cfg.expert_alignment, rows)
    flat = pos.reshape(-1)
    src = jnp.arange(r * t * el, dtype=jnp.int32) // el  # src_rank * T + token of each cell
    src_index = _scatter_rows(src + 1, flat, rows) - 1   # -1 on padding rows
    w_rows = _scatter_rows(recv_weight.reshape(-1), flat, rows)
    move = lambda a: _gather_rows(  # noqa: E731
        _a2a(comm, jnp.broadcast_to(a[None], (r,) + a.shape)).reshape((r * t,) + a.shape[1:]),
        src_index)
    out_x = tuple(move(a) for a in x) if isinstance(x, tuple) else move(x)
    dest_row = grouped_dest_rows(comm, idx, _a2a(comm, pos))
    dest_rank = jnp.where(dest_row >= 0, _lookup(comm.expert_rank, idx), -1).astype(jnp.int32)
    return dict(x=out_x, group_sizes=group_sizes, weights=w_rows, num_dropped=num_dropped,
                num_invalid=num_invalid, src_index=src_index, dest_row=dest_row,
                dest_rank=dest_rank, pos=pos, idx=idx)


GROUPED_FIELDS = ("x", "group_sizes", "weights", "num_dropped", "num_invalid", "src_index",
                  "dest_row", "dest_rank")


def grouped_fields(out: dict) -> tuple:
    """A grouped dispatch's dict as the tuple of :class:`jaxep.Grouped`'s fields in order (the
    handle's ``src_index``, ``dest_row`` and ``dest_rank`` last)."""
    return tuple(out[f] for f in GROUPED_FIELDS)


def combine_grouped(comm, y, src_index, num_tokens, weights=None):
    """Grouped rows ``y [M, ...]`` back to their source tokens: ``[T, ...]`` in ``y.dtype``, per
    token the sum over its rows of ``weights[row] * y[row]`` (unweighted when ``weights`` is
    None), accumulated in float32: each rank sums its rows per token, the partial sums travel
    in float32 and the source adds them in rank order. Padding rows (``src_index == -1``)
    contribute nothing (they are masked, not multiplied by 0)."""
    r = comm.num_ranks
    rows = y.astype(jnp.float32)
    if weights is not None:
        rows = rows * weights.astype(jnp.float32).reshape((-1,) + (1,) * (y.ndim - 1))
    rows = jnp.where((src_index >= 0).reshape((-1,) + (1,) * (y.ndim - 1)), rows, 0.0)
    buf = _scatter_rows(rows, src_index, r * num_tokens)
    back = _a2a(comm, buf.reshape((r, num_tokens) + y.shape[1:]))  # [R(dest), T, ...]
    return jnp.sum(back, axis=0).astype(y.dtype)


def grouped_dispatch_rows(comm, rows, src_index):
    """``rows [T, ...]`` moved to the grouped rows of ``src_index``: ``[M, ...]`` (zeros on
    padding): the transpose of an unweighted :func:`combine_grouped`."""
    r = comm.num_ranks
    recv = _a2a(comm, jnp.broadcast_to(rows[None], (r,) + rows.shape))
    return _gather_rows(recv.reshape((-1,) + rows.shape[1:]), src_index)


def grouped_row_dots(g_rows, y, src_index):
    """``[M]`` float32: each row's ``<g_rows[m], y[m]>``, 0 on padding rows (masked, so a NaN
    in a padding row of ``y`` does not reach the weights' gradient)."""
    dots = jnp.sum(g_rows.astype(jnp.float32) * y.astype(jnp.float32), axis=-1)
    return jnp.where(src_index >= 0, dots, 0.0)


def grouped_weight_grad(comm, g_rows, pos, idx):
    """Cotangent of each row's weight ``g_rows [M]`` -> that of ``topk_weights [T, K]``: every
    top-k entry listing the row's expert (repeats included: the row's weight is their sum) gets
    the row's cotangent; -1, invalid and dropped entries get 0. ``pos [R(src), T, E_l]`` is the
    receiver's layout (:func:`grouped_layout`), ``idx`` the sender's sanitised ids."""
    cells = _gather_rows(g_rows, pos.reshape(-1)).reshape(pos.shape)  # 0 where no row
    back = _a2a(comm, cells)  # [R(dest), T, E_l] at the source
    return _at_topk(comm, idx, back, first_only=False, fill=jnp.zeros((), g_rows.dtype))
