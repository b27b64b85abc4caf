"""CUDA backend: every public op whole, its custom VJP included, on the kernels of ``_cuda``.

``jaxep._backends`` picks these functions (by op name) when ``comm.implementation(op)`` is
``"cuda"``; the public modules validate first, so nothing here checks user input. Each function
runs per rank inside ``jax.shard_map`` and returns the fields of the public result, which the
public module wraps in its pytree class (``Layout``, ``Dispatched``, ``LLDispatched``, the
pending classes); handles and pendings come in as those classes and are read by attribute.

The kernels are never differentiated directly: the gradients below are custom VJPs made of
other kernels (docs/design.md, "Naming chain", lists op -> function -> target -> kernel).
Normal mode's VJPs are ``jaxep._normal_vjp.normal_ops`` on the kernels (the pure-JAX backend
builds its own from the same function); low-latency names carry ``_ll_`` (``_ll_dispatch_bwd``).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from jaxep import _cuda, _xla, fp8 as _fp8
from jaxep._checks import FLOAT_DTYPES
from jaxep._normal_vjp import combine_grouped_op, normal_ops
from jaxep._xla import zero_cotangent

# --------------------------------------------------------------------------------------------
# Normal mode
# --------------------------------------------------------------------------------------------


def dispatch_layout(comm, topk_idx):
    """``(tokens_per_rank, tokens_per_expert, is_token_in_rank)`` from the layout kernel."""
    return _cuda.dispatch_layout(topk_idx, jnp.asarray(comm.expert_rank), comm.num_ranks,
                                 comm.cfg.num_experts, comm.cfg.axis_names)


def _combine_rows(comm, rows, src_index, send_slot):
    """The combine kernel for bf16/f32 rows; other dtypes (a weights' cotangent in float16,
    say) through the pure-JAX combine."""
    if rows.dtype in FLOAT_DTYPES:
        return _cuda.combine_rows(comm, rows, send_slot)
    return _xla.combine_rows(comm, rows, src_index, send_slot)


# dispatch: the fields of ``Dispatched``, the handle as its two arrays; combine: ``[T, H]``.
dispatch, combine = normal_ops(_cuda.dispatch, _combine_rows, _cuda.dispatch_rows)

# --------------------------------------------------------------------------------------------
# Grouped normal mode: results are the fields of ``Grouped`` in order, then the handle's
# ``src_index``, ``dest_row``, ``dest_rank`` (as ``_xla_ops``'s).
# --------------------------------------------------------------------------------------------


def dispatch_grouped(comm, x, topk_idx, topk_weights, rows, *, zero_padding):
    """The grouped dispatch kernel into ``rows`` (M) rows."""
    return _dispatch_grouped(comm, rows, bool(zero_padding), x, topk_idx, topk_weights)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _dispatch_grouped(comm, rows, zero_padding, x, topk_idx, topk_weights):
    return _dispatch_grouped_fwd(comm, rows, zero_padding, x, topk_idx, topk_weights)[0]


def _dispatch_grouped_fwd(comm, rows, zero_padding, x, topk_idx, topk_weights):
    out = _cuda.dispatch_grouped(comm, x, topk_idx, topk_weights, rows,
                                 zero_padding=zero_padding)
    # An FP8 x is kept only to shape its zero cotangent; topk_weights only for its dtype.
    res = (out["dest_row"], out["dest_rank"], topk_idx, x if isinstance(x, tuple) else None,
           jnp.zeros((0,), topk_weights.dtype))
    return _xla.grouped_fields(out), res


def _dispatch_grouped_bwd(comm, rows, zero_padding, res, g):
    dest_row, dest_rank, topk_idx, fp8_x, w_like = res
    if fp8_x is not None:
        gx = tuple(zero_cotangent(a) for a in fp8_x)
    else:  # the rows' cotangents summed per token, unweighted (float32 accumulation)
        gx = _cuda.combine_grouped(comm, g[0], jnp.zeros(g[0].shape[:1], jnp.float32), dest_row,
                                   dest_rank, weighted=False)
    # Each row's weight cotangent goes to every top-k entry listing its expert: the first
    # listing names the row (dest_row), repeats take the first listing's.
    first = _cuda.grouped_entries(comm, g[2], dest_row, dest_rank)
    idx, _ = _xla.sanitize(comm, topk_idx)
    same = idx[:, :, None] == idx[:, None, :]
    gw = jnp.take_along_axis(first, jnp.argmax(same, axis=-1), axis=1)
    gw = jnp.where(idx >= 0, gw, 0.0).astype(w_like.dtype)
    return gx, zero_cotangent(topk_idx), gw


_dispatch_grouped.defvjp(_dispatch_grouped_fwd, _dispatch_grouped_bwd)


def _combine_grouped_rows(comm, y, handle, weighted):
    return _cuda.combine_grouped(comm, y, handle.weights, handle.dest_row, handle.dest_rank,
                                 weighted=weighted)


# The grouped combine kernel along a ``GroupedHandle``: ``[T, H]``; its gradient w.r.t. ``y``
# is the dispatch-rows kernel along ``src_index`` (M rows).
combine_grouped = combine_grouped_op(_combine_grouped_rows, _cuda.dispatch_rows)

# --------------------------------------------------------------------------------------------
# Low-latency mode. Dispatch results are ``(x, counts, src_index, src_topk, recv_rows,
# num_invalid)``; ``x`` is ``(payload, scales)`` with fp8.
# --------------------------------------------------------------------------------------------


def ll_dispatch(comm, x, topk_idx, *, fp8, round_scale, ue8m0, zero_padding):
    """Both phases in one kernel."""
    return _ll_dispatch(comm, bool(fp8), bool(round_scale), bool(ue8m0), bool(zero_padding),
                        x.dtype, x, topk_idx)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4, 5))
def _ll_dispatch(comm, fp8, round_scale, ue8m0, zero_padding, x_dtype, x, topk_idx):
    return _ll_dispatch_fwd(comm, fp8, round_scale, ue8m0, zero_padding, x_dtype, x,
                            topk_idx)[0]


def _ll_dispatch_fwd(comm, fp8, round_scale, ue8m0, zero_padding, x_dtype, x, topk_idx):
    payload, scales, counts, src_index, src_topk, recv_rows, num_invalid = _cuda.ll_dispatch(
        comm, x, topk_idx, fp8=fp8, round_scale=round_scale, ue8m0=ue8m0,
        zero_padding=zero_padding)
    out = ((payload, scales) if fp8 else payload, counts, src_index, src_topk, recv_rows,
           num_invalid)
    return out, (src_index, src_topk, counts, scales, topk_idx)


def _ll_dispatch_bwd(comm, fp8, round_scale, ue8m0, zero_padding, x_dtype, res, g):
    src_index, src_topk, counts, scales, topk_idx = res
    gx = _ll_dispatch_grad_x(comm, fp8, ue8m0, x_dtype, src_index, src_topk, counts, scales,
                             topk_idx, g)
    return gx, zero_cotangent(topk_idx)


_ll_dispatch.defvjp(_ll_dispatch_fwd, _ll_dispatch_bwd)


def _ll_dispatch_grad_x(comm, fp8, ue8m0, x_dtype, src_index, src_topk, counts, scales,
                        topk_idx, g):
    """Gradient of a dispatch (one- or two-phase) w.r.t. ``x``: the cotangent rows of a token's
    copies summed (a plain combine with weight 1 per first listing); with ``fp8`` each payload
    cotangent divided by its row's scale first (the quantisation counts as identity)."""
    if fp8:
        gp = g[0][0]
        h = gp.shape[-1]
        if ue8m0:
            scales = _fp8._unpack_ue8m0(scales, h // _fp8.BLOCK)
        rows = gp.astype(jnp.float32).reshape(*gp.shape[:-1], -1, _fp8.BLOCK) / scales[..., None]
        rows = rows.reshape(gp.shape).astype(x_dtype)
    else:
        rows = g[0]
    sent = _cuda.ll_combine_send(comm, rows, src_index, src_topk, counts)
    gx, _ = _cuda.ll_combine_recv(comm, sent, topk_idx,
                                  _first_weights(topk_idx, comm.cfg.num_experts), rows.dtype)
    return gx.astype(x_dtype)


def _first_weights(topk_idx, num_experts):
    """``[T, K]`` float32: 1 at the first listing of each valid expert, else 0."""
    idx = jnp.where((topk_idx >= 0) & (topk_idx < num_experts), topk_idx, -1)
    return _xla._first_occurrence(idx).astype(jnp.float32)


def ll_dispatch_send(comm, x, topk_idx, *, fp8, round_scale, ue8m0, copy_engine):
    """The send kernel: the data fields of ``LLDispatchPending`` (rows and recv_topk None: the
    rows wait in jaxep's buffers; ``x`` carries the gradient to the recv)."""
    del ue8m0  # the recv packs the scales
    info = _cuda.ll_dispatch_send(comm, jax.lax.stop_gradient(x), topk_idx, fp8=fp8,
                                  round_scale=round_scale, copy_engine=copy_engine)
    return None, None, info, x, topk_idx, info[0]


def ll_dispatch_recv(comm, pending, *, zero_padding):
    """The recv kernel on ``pending`` (an ``LLDispatchPending`` of :func:`ll_dispatch_send`)."""
    return _ll_dispatch_recv(comm, pending.fp8, pending.ue8m0, bool(zero_padding),
                             pending.x.dtype, pending.x, pending.info, pending.topk_idx)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _ll_dispatch_recv(comm, fp8, ue8m0, zero_padding, x_dtype, x, info, topk_idx):
    return _ll_dispatch_recv_fwd(comm, fp8, ue8m0, zero_padding, x_dtype, x, info,
                                 topk_idx)[0]


def _ll_dispatch_recv_fwd(comm, fp8, ue8m0, zero_padding, x_dtype, x, info, topk_idx):
    del x  # only carries the gradient
    payload, scales, counts, src_index, src_topk, recv_rows, num_invalid = _cuda.ll_dispatch_recv(
        comm, info, topk_idx.shape[0], x_dtype, fp8=fp8, ue8m0=ue8m0,
        zero_padding=zero_padding)
    out = ((payload, scales) if fp8 else payload, counts, src_index, src_topk, recv_rows,
           num_invalid)
    return out, (src_index, src_topk, counts, scales, info, topk_idx)


def _ll_dispatch_recv_bwd(comm, fp8, ue8m0, zero_padding, x_dtype, res, g):
    src_index, src_topk, counts, scales, info, topk_idx = res
    gx = _ll_dispatch_grad_x(comm, fp8, ue8m0, x_dtype, src_index, src_topk, counts, scales,
                             topk_idx, g)
    return gx, zero_cotangent(info), zero_cotangent(topk_idx)


_ll_dispatch_recv.defvjp(_ll_dispatch_recv_fwd, _ll_dispatch_recv_bwd)


def ll_combine(comm, y, topk_idx, topk_weights, handle, *, prereduce):
    """Both phases in one kernel (the send, then the receive in the same blocks)."""
    return _ll_combine(comm, prereduce, y, topk_weights, topk_idx, handle)


def _ll_combine_kernel(comm, prereduce, y, topk_weights, topk_idx, handle, want_rows):
    return _cuda.ll_combine(comm, y, handle.src_index, handle.src_topk, handle.counts,
                            handle.recv_rows, topk_idx, topk_weights, want_rows=want_rows,
                            prereduce=prereduce)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _ll_combine(comm, prereduce, y, topk_weights, topk_idx, handle):
    return _ll_combine_kernel(comm, prereduce, y, topk_weights, topk_idx, handle, False)[0]


def _ll_combine_fwd(comm, prereduce, y, topk_weights, topk_idx, handle):
    if prereduce:  # no per-entry rows came back: the backward fetches them (a plain combine)
        out, _ = _ll_combine_kernel(comm, prereduce, y, topk_weights, topk_idx, handle, False)
        return out, (y, topk_weights, topk_idx, handle)
    out, rows = _ll_combine_kernel(comm, False, y, topk_weights, topk_idx, handle, True)
    return out, (rows, topk_weights, topk_idx, handle)


def _ll_combine_bwd(comm, prereduce, res, g):
    rows, topk_weights, topk_idx, handle = res
    gy, gw = _ll_combine_grads(comm, prereduce, rows, topk_weights, topk_idx, handle, g)
    return gy, gw, zero_cotangent(topk_idx), jax.tree.map(zero_cotangent, handle)


_ll_combine.defvjp(_ll_combine_fwd, _ll_combine_bwd)


def ll_combine_send(comm, y, topk_idx, topk_weights, handle, *, prereduce):
    """The (pre-reduced with ``prereduce``) send kernel: the data fields of
    ``LLCombinePending`` (rows None; ``y`` and ``handle`` carry the gradient to the recv)."""
    sg = jax.lax.stop_gradient
    if prereduce:
        info = _cuda.ll_combine_send_reduced(comm, sg(y), handle.recv_rows, topk_idx,
                                             sg(topk_weights), prereduce=prereduce)
    else:
        info = _cuda.ll_combine_send(comm, sg(y), handle.src_index, handle.src_topk,
                                     handle.counts)
    return None, info, y, handle, topk_idx, topk_weights


def ll_combine_recv(comm, pending):
    """The recv kernel on ``pending`` (an ``LLCombinePending`` of :func:`ll_combine_send`)."""
    return _ll_combine_recv(comm, pending.prereduce, pending.y, pending.topk_weights,
                            pending.info, pending.topk_idx, pending.handle)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _ll_combine_recv(comm, prereduce, y, topk_weights, info, topk_idx, handle):
    return _cuda.ll_combine_recv(comm, info, topk_idx, topk_weights, y.dtype,
                                 prereduce=prereduce)[0]


def _ll_combine_recv_fwd(comm, prereduce, y, topk_weights, info, topk_idx, handle):
    if prereduce:  # no per-entry rows came back: the backward fetches them (a plain combine)
        out = _ll_combine_recv(comm, prereduce, y, topk_weights, info, topk_idx, handle)
        return out, (y, topk_weights, info, topk_idx, handle)
    out, rows = _cuda.ll_combine_recv(comm, info, topk_idx, topk_weights, y.dtype,
                                      want_rows=True)
    return out, (rows, topk_weights, info, topk_idx, handle)


def _ll_combine_recv_bwd(comm, prereduce, res, g):
    rows, topk_weights, info, topk_idx, handle = res
    gy, gw = _ll_combine_grads(comm, prereduce, rows, topk_weights, topk_idx, handle, g)
    return (gy, gw, zero_cotangent(info), zero_cotangent(topk_idx),
            jax.tree.map(zero_cotangent, handle))


_ll_combine_recv.defvjp(_ll_combine_recv_fwd, _ll_combine_recv_bwd)


def _ll_combine_grads(comm, prereduce, rows, topk_weights, topk_idx, handle, g):
    """Gradients of a combine (one- or two-phase) w.r.t. ``y`` (the output cotangent
    dispatched, each row scaled by its weight) and ``topk_weights`` (the cotangent's dot product
    with each entry's row; ``rows`` are those rows, or with ``prereduce`` ``y``, whose rows are
    fetched again)."""
    if prereduce:  # rows is y here
        # The refetch depends on forward values only: tie it to g, or XLA may hoist the sends
        # of several layers ahead of their recvs (at most two may be outstanding).
        rows, g = jax.lax.optimization_barrier((rows, g))
        sent = _cuda.ll_combine_send(comm, rows, handle.src_index, handle.src_topk, handle.counts)
        _, rows = _cuda.ll_combine_recv(comm, sent, topk_idx, topk_weights, rows.dtype,
                                        want_rows=True)
    gw = jnp.einsum("tkh,th->tk", rows.astype(jnp.float32), g.astype(jnp.float32))
    sent = _cuda.ll_dispatch_send(comm, g.astype(rows.dtype), topk_idx, topk_weights)
    gy = _cuda.ll_dispatch_recv(comm, sent, topk_idx.shape[0], rows.dtype, weighted=True)[0]
    return gy, gw.astype(topk_weights.dtype)
