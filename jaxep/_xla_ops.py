"""Pure-JAX backend: every public op whole, on the ``lax.all_to_all`` primitives of ``_xla``.

``jaxep._backends`` picks these functions (by op name) when ``comm.implementation(op)`` is
``"xla"``; the public modules validate first. Results are the fields of the public result, as
in ``jaxep._cuda_ops``. Normal mode keeps custom VJPs (the same gradients as the CUDA backend's,
on the pure-JAX dispatch and combine: ``tests/test_grads.py`` checks them against autodiff);
low-latency mode is differentiated by plain autodiff.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from jaxep import _xla, fp8 as _fp8
from jaxep._normal_vjp import combine_grouped_op, normal_ops
from jaxep._xla import zero_cotangent

# --------------------------------------------------------------------------------------------
# Normal mode
# --------------------------------------------------------------------------------------------


def dispatch_layout(comm, topk_idx):
    """``(tokens_per_rank, tokens_per_expert, is_token_in_rank)``."""
    return _xla.dispatch_layout(comm, topk_idx)


# dispatch: the fields of ``Dispatched``, the handle as its two arrays; combine: ``[T, H]``.
dispatch, combine = normal_ops(_xla.dispatch, _xla.combine_rows,
                               lambda comm, rows, src_index, _: _xla.dispatch_rows(comm, rows,
                                                                                   src_index))

# --------------------------------------------------------------------------------------------
# Grouped normal mode: results are the fields of ``Grouped`` in order, the handle as its arrays
# ``src_index``, ``dest_row`` and ``dest_rank`` last (its ``weights`` are ``Grouped.weights``).
# --------------------------------------------------------------------------------------------


def dispatch_grouped(comm, x, topk_idx, topk_weights, rows, *, zero_padding):
    """Grouped dispatch into ``rows`` (M) rows; padding rows are always zeros here, whatever
    ``zero_padding`` says."""
    del zero_padding
    return _dispatch_grouped(comm, x, topk_idx, topk_weights, rows)


@partial(jax.custom_vjp, nondiff_argnums=(0, 4))
def _dispatch_grouped(comm, x, topk_idx, topk_weights, rows):
    return _xla.grouped_fields(_xla.dispatch_grouped(comm, x, topk_idx, topk_weights, rows))


def _dispatch_grouped_fwd(comm, x, topk_idx, topk_weights, rows):
    out = _xla.dispatch_grouped(comm, x, topk_idx, topk_weights, rows)
    # x itself is not needed backwards; an FP8 x is kept only to shape its zero cotangent.
    res = (out["src_index"], out["pos"], out["idx"], x if isinstance(x, tuple) else None,
           topk_idx, jnp.zeros((0,), topk_weights.dtype))  # the last only for its dtype
    return _xla.grouped_fields(out), res


def _dispatch_grouped_bwd(comm, rows, res, g):
    src_index, pos, idx, fp8_x, topk_idx, w_like = res
    if fp8_x is not None:
        gx = tuple(zero_cotangent(a) for a in fp8_x)
    else:  # the rows' cotangents summed per token, unweighted (float32 accumulation)
        gx = _xla.combine_grouped(comm, g[0], src_index, idx.shape[0])
    gw = _xla.grouped_weight_grad(comm, g[2].astype(jnp.float32), pos, idx).astype(w_like.dtype)
    return gx, zero_cotangent(topk_idx), gw


_dispatch_grouped.defvjp(_dispatch_grouped_fwd, _dispatch_grouped_bwd)


def _combine_grouped_rows(comm, y, handle, weighted):
    return _xla.combine_grouped(comm, y, handle.src_index, handle.dest_row.shape[0],
                                handle.weights if weighted else None)


# Grouped rows back to their tokens along a ``GroupedHandle``: ``[T, H]``.
combine_grouped = combine_grouped_op(_combine_grouped_rows, _xla.grouped_dispatch_rows)

# --------------------------------------------------------------------------------------------
# Low-latency mode. Dispatch results are ``(x, counts, src_index, src_topk, recv_rows,
# num_invalid)``, as the CUDA backend's.
# --------------------------------------------------------------------------------------------


def ll_dispatch_send(comm, x, topk_idx, *, fp8, round_scale, ue8m0, copy_engine):
    """The data fields of ``LLDispatchPending``: every (destination, local expert, token) cell
    of the worst-case buffer moved (``copy_engine`` does not apply here)."""
    del copy_engine
    idx, num_invalid = _xla.sanitize(comm, topk_idx)
    copy_topk = _xla.ll_copy_topk(comm, idx)
    if fp8:
        payload, scales = _fp8.quantize_fp8(x, round_scale=round_scale, ue8m0=ue8m0)
        recv_p, recv_topk = _xla.ll_send(comm, payload, copy_topk)
        recv_s, _ = _xla.ll_send(comm, scales, copy_topk)
        rows = (recv_p, recv_s)
    else:
        rows, recv_topk = _xla.ll_send(comm, x, copy_topk)
    return rows, recv_topk, None, None, idx, num_invalid


def _ll_unpack(comm, rows, recv_topk, num_invalid):
    src_index, _, counts = _xla.ll_layout(comm, recv_topk >= 0)
    unpack = lambda a: _xla.ll_unpack(a, src_index)  # noqa: E731
    x = tuple(unpack(a) for a in rows) if isinstance(rows, tuple) else unpack(rows)
    src_topk = jnp.where(src_index >= 0, unpack(recv_topk), -1)
    recv_rows = _xla.ll_recv_rows(src_index, src_topk, comm.cfg.num_topk)
    return x, counts, src_index, src_topk, recv_rows, num_invalid


def ll_dispatch_recv(comm, pending, *, zero_padding):
    """Unpacks ``pending`` (an ``LLDispatchPending`` of :func:`ll_dispatch_send`); padding is
    always zero here."""
    del zero_padding
    return _ll_unpack(comm, pending.rows, pending.recv_topk, pending.num_invalid)


def ll_dispatch(comm, x, topk_idx, *, fp8, round_scale, ue8m0, zero_padding):
    """:func:`ll_dispatch_send` then its receive."""
    del zero_padding
    rows, recv_topk, _, _, _, num_invalid = ll_dispatch_send(
        comm, x, topk_idx, fp8=fp8, round_scale=round_scale, ue8m0=ue8m0, copy_engine=False)
    return _ll_unpack(comm, rows, recv_topk, num_invalid)


def ll_combine_send(comm, y, topk_idx, topk_weights, handle, *, prereduce):
    """The data fields of ``LLCombinePending``: ``y``'s rows returned to their sources
    (``prereduce`` applies at the receive here)."""
    del prereduce
    rows = _xla.ll_combine_send(comm, y, handle.src_index)
    return rows, None, None, None, topk_idx, topk_weights


def ll_combine_recv(comm, pending):
    """The weighted sum of the rows of ``pending`` (an ``LLCombinePending``)."""
    return _xla.ll_combine_recv(comm, pending.rows, pending.topk_idx, pending.topk_weights,
                                prereduce=pending.prereduce)


def ll_combine(comm, y, topk_idx, topk_weights, handle, *, prereduce):
    """:func:`ll_combine_send` then its receive."""
    rows = _xla.ll_combine_send(comm, y, handle.src_index)
    return _xla.ll_combine_recv(comm, rows, topk_idx, topk_weights, prereduce=prereduce)
