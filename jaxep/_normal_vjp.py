"""Normal mode's custom VJPs, the same for both backends on their own primitives.

Dispatch's gradient w.r.t. ``x`` is a combine of the cotangent rows, w.r.t. ``topk_weights`` a
combine of the received weights' cotangent; combine's gradient w.r.t. ``y`` is a dispatch of the
output cotangent along the handle. ``normal_ops`` builds ``dispatch`` and ``combine`` from a
backend's three primitives, so ``jaxep._cuda_ops`` and ``jaxep._xla_ops`` differ only in those;
``combine_grouped_op`` does the same for ``combine_grouped`` from two.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp

from jaxep._xla import dispatched_fields, grouped_row_dots, zero_cotangent


def normal_ops(dispatch_prim, combine_rows, dispatch_rows):
    """``(dispatch, combine)`` with custom VJPs on a backend's primitives.

    Args:
      dispatch_prim: ``(comm, x, topk_idx, topk_weights, capacity) -> dict`` of the dispatch's
        fields (``jaxep._xla.dispatch``'s keys).
      combine_rows: ``(comm, rows, src_index, send_slot) -> [T, ...]``, rows summed per token.
      dispatch_rows: ``(comm, rows, src_index, send_slot) -> [C, ...]``, rows along a handle
        (``send_slot``: which ranks receive which rows, for the internode kernels).

    ``dispatch(comm, x, topk_idx, topk_weights, capacity)`` returns the fields of
    ``Dispatched`` in order, the handle as its two arrays (``src_index``, ``send_slot``);
    ``combine(comm, y, handle)`` the rows summed back to their tokens along ``handle`` (a
    ``DispatchHandle``): ``[T, H]``.
    """

    @partial(jax.custom_vjp, nondiff_argnums=(0, 4))
    def dispatch(comm, x, topk_idx, topk_weights, capacity):
        return dispatched_fields(dispatch_prim(comm, x, topk_idx, topk_weights, capacity))

    def dispatch_fwd(comm, x, topk_idx, topk_weights, capacity):
        out = dispatched_fields(dispatch_prim(comm, x, topk_idx, topk_weights, capacity))
        _, recv_idx, _, _, _, _, _, src_index, send_slot = out
        # x itself is not needed backwards; an FP8 x is kept only to shape its zero cotangent.
        return out, (src_index, send_slot, recv_idx, x if isinstance(x, tuple) else None,
                     topk_idx)

    def dispatch_bwd(comm, capacity, res, g):
        src_index, send_slot, recv_idx, fp8_x, topk_idx = res
        if fp8_x is not None:
            gx = tuple(zero_cotangent(a) for a in fp8_x)
        else:
            gx = combine_rows(comm, g[0], src_index, send_slot)  # x's cotangent
        g_w = g[2]  # topk_weights' cotangent
        gw_rows = jnp.where(recv_idx >= 0, g_w, jnp.zeros((), g_w.dtype))
        gw = combine_rows(comm, gw_rows, src_index, send_slot)
        return gx, zero_cotangent(topk_idx), gw

    dispatch.defvjp(dispatch_fwd, dispatch_bwd)

    @partial(jax.custom_vjp, nondiff_argnums=(0,))
    def combine(comm, y, handle):
        return combine_rows(comm, y, handle.src_index, handle.send_slot)

    def combine_fwd(comm, y, handle):
        return combine_rows(comm, y, handle.src_index, handle.send_slot), handle

    def combine_bwd(comm, handle, g):
        gy = dispatch_rows(comm, g, handle.src_index, handle.send_slot)
        return gy, jax.tree.map(zero_cotangent, handle)

    combine.defvjp(combine_fwd, combine_bwd)
    return dispatch, combine


def combine_grouped_op(combine_kernel, dispatch_rows):
    """``combine_grouped(comm, y, handle, *, weighted)`` with its custom VJP on a backend's
    primitives: ``combine_kernel(comm, y, handle, weighted) -> [T, H]`` (rows summed back per
    token, weighted or not) and ``dispatch_rows(comm, rows, src_index) -> [M, ...]`` (a token's
    row to each grouped row of it, zeros on padding rows).

    Gradients: w.r.t. ``y`` the output cotangent dispatched along ``handle.src_index`` (times
    the row's weight when ``weighted``); w.r.t. ``handle.weights`` each row's ``<g, y>``
    (masked on padding rows); the handle's other arrays get zero cotangents.
    """

    @partial(jax.custom_vjp, nondiff_argnums=(0, 1))
    def op(comm, weighted, y, handle):
        return combine_kernel(comm, y, handle, weighted)

    def fwd(comm, weighted, y, handle):
        return combine_kernel(comm, y, handle, weighted), (y, handle)

    def bwd(comm, weighted, res, g):
        y, handle = res
        g_rows = dispatch_rows(comm, g, handle.src_index).astype(jnp.float32)
        if weighted:
            gy = g_rows * handle.weights.astype(jnp.float32)[:, None]
            gw = grouped_row_dots(g_rows, y, handle.src_index).astype(handle.weights.dtype)
        else:
            gy, gw = g_rows, zero_cotangent(handle.weights)
        g_handle = dataclasses.replace(jax.tree.map(zero_cotangent, handle), weights=gw)
        return gy.astype(y.dtype), g_handle

    op.defvjp(fwd, bwd)

    def combine_grouped(comm, y, handle, *, weighted):
        """Grouped rows back to their tokens along ``handle`` (a ``GroupedHandle``): ``[T, H]``."""
        return op(comm, bool(weighted), y, handle)

    return combine_grouped
