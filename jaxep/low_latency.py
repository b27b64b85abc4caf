"""Low-latency mode (decoding): :func:`ll_dispatch`, :func:`ll_combine` and their two-phase forms.

Run per rank inside ``jax.shard_map``. Notation as in :mod:`jaxep.normal`; here every
(token, selected expert) pair is one row: a token is sent **once per selected expert** (an
expert listed twice in a token's top-k is sent once and both weights apply to that row in
:func:`ll_combine`). The receiver holds ``[E_l, R*T, H]``: for each local expert, its rows
ordered by source rank then source token, valid rows first (``counts[e]`` of them), then zero
padding. ``R*T`` rows per expert always suffice, so nothing is dropped.

Two-phase forms: ``*_send`` issues the transfer and returns a pending pytree, ``*_recv`` waits
and unpacks it; independent work placed between them may overlap the transfer.

Gradients by autodiff of the same computation (the CUDA backend will give the same rules as
custom VJPs, DESIGN.md §2). With ``fp8=True`` quantisation is treated as identity: the
payload's cotangent reaches ``x`` divided by its scale, but JAX types that cotangent as e4m3,
so small cotangents round to zero (see :func:`jaxep.quantize_fp8`); DESIGN's "bf16/f32
backward" for fp8 needs the CUDA custom VJP of issue 4. Use ``fp8=False`` for training.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxep import _checks, _xla, fp8 as _fp8
from jaxep._checks import FLOAT_DTYPES
from jaxep.normal import _pytree


@_pytree
class LLHandle:
    """Routing of one :func:`ll_dispatch`, consumed by :func:`ll_combine`.

    Attributes:
      src_index: ``[E_l, R*T]`` int32, receiver side: for each row of each local expert its
        source ``src_rank * T + src_token``; -1 for padding.
      slot: ``[T, K]`` int32, sender side: the row of token t's copy in the output of expert
        ``topk_idx[t, k]`` on its rank; -1 for invalid k.
    """

    src_index: jax.Array
    slot: jax.Array


@_pytree
class LLDispatched:
    """Result of :func:`ll_dispatch` on the receiving rank.

    Attributes:
      x: ``[E_l, R*T, H]`` in the input dtype, or with ``fp8=True`` the tuple
        ``(payload [E_l, R*T, H] float8_e4m3fn, scales)`` with scales ``[E_l, R*T, H/128]``
        float32 (packed ``[E_l, R*T, ceil(H/512)]`` int32 with ``ue8m0``).
      counts: ``[E_l]`` int32, valid rows per local expert.
      num_invalid: int32 scalar, entries of this rank's ``topk_idx`` outside ``[-1, E)``.
      handle: the :class:`LLHandle` for :func:`ll_combine`.
    """

    x: jax.Array | tuple[jax.Array, jax.Array]
    counts: jax.Array
    num_invalid: jax.Array
    handle: LLHandle


@_pytree
class LLDispatchPending:
    """In-flight :func:`ll_dispatch_send`: what :func:`ll_dispatch_recv` unpacks.

    Attributes:
      rows: received ``[R(src), E_l, T, ...]`` cells (a tuple for FP8: payload and scales).
      recv_mask: ``[R(src), E_l, T]`` bool, which cells hold a copy.
      topk_idx: ``[T, K]`` int32, the sender's sanitised ids (-1 for none/invalid).
      num_invalid: int32 scalar.
    """

    rows: jax.Array | tuple[jax.Array, jax.Array]
    recv_mask: jax.Array
    topk_idx: jax.Array
    num_invalid: jax.Array


@_pytree
class LLCombinePending:
    """In-flight :func:`ll_combine_send`: what :func:`ll_combine_recv` reduces.

    Attributes:
      rows: ``[R(dest), E_l, T, H]`` expert outputs returned to this rank.
      topk_idx: ``[T, K]`` int32; topk_weights: ``[T, K]`` float32.
    """

    rows: jax.Array
    topk_idx: jax.Array
    topk_weights: jax.Array


def _check_x(comm, op, x, fp8):
    _checks.ep_group(comm, op)
    _checks.array(op, "x", x, 2, FLOAT_DTYPES)
    _checks.hidden(comm, op, "x", x.shape[1])
    _checks.tokens(comm, op, x.shape[0])
    if fp8:
        _checks.fp8_hidden(op, x.shape[1])


def ll_dispatch_send(comm, x, topk_idx, *, fp8: bool = False, round_scale: bool = False,
                     ue8m0: bool = False) -> LLDispatchPending:
    """Send phase of :func:`ll_dispatch`: quantise (with ``fp8``) and issue the transfer."""
    op = "ll_dispatch_send"
    _check_x(comm, op, x, fp8)
    _checks.topk(comm, op, topk_idx, x.shape[0])
    if (round_scale or ue8m0) and not fp8:
        raise ValueError(f"jaxep.{op}: round_scale/ue8m0 need fp8=True")
    idx, num_invalid = _xla.sanitize(comm, topk_idx.astype(jnp.int32))
    mask = _xla.ll_copy_mask(comm, idx)
    if fp8:
        payload, scales = _fp8.quantize_fp8(x, round_scale=round_scale, ue8m0=ue8m0)
        recv_p, recv_mask = _xla.ll_send(comm, payload, mask)
        recv_s, _ = _xla.ll_send(comm, scales, mask)
        rows = (recv_p, recv_s)
    else:
        rows, recv_mask = _xla.ll_send(comm, x, mask)
    return LLDispatchPending(rows, recv_mask, idx, num_invalid)


def ll_dispatch_recv(comm, pending: LLDispatchPending) -> LLDispatched:
    """Receive phase of :func:`ll_dispatch`: wait for the transfer and unpack it."""
    op = "ll_dispatch_recv"
    _checks.ep_group(comm, op)
    if not isinstance(pending, LLDispatchPending):
        raise TypeError(f"jaxep.{op}: expected the LLDispatchPending of ll_dispatch_send, "
                        f"got {type(pending).__name__}")
    src_index, pos, counts = _xla.ll_layout(comm, pending.recv_mask)
    unpack = lambda a: _xla.ll_unpack(a, src_index)  # noqa: E731
    rows = pending.rows
    x = tuple(unpack(a) for a in rows) if isinstance(rows, tuple) else unpack(rows)
    slot = _xla.ll_slots(comm, pending.topk_idx, pos)
    return LLDispatched(x, counts, pending.num_invalid, LLHandle(src_index, slot))


def ll_dispatch(comm, x, topk_idx, *, fp8: bool = False, round_scale: bool = False,
                ue8m0: bool = False) -> LLDispatched:
    """Send each (token, selected expert) pair to the expert's rank (low-latency mode).

    Args:
      comm: the :class:`jaxep.Communicator`.
      x: ``[T, H]`` bfloat16 (or float32), ``T <= max_tokens_per_rank``.
      topk_idx: ``[T, K]`` int32 global expert ids, -1 for none.
      fp8: quantise to e4m3 with one scale per 128 channels before sending (H % 128 == 0).
      round_scale: round scales up to powers of two. ue8m0: pack them as UE8M0 (needs
        ``round_scale``). Bit-equal to :func:`jaxep.quantize_fp8` of the routed rows.

    Returns:
      :class:`LLDispatched` with ``[E_l, R*T, ...]`` rows.
    """
    pending = ll_dispatch_send(comm, x, topk_idx, fp8=fp8, round_scale=round_scale, ue8m0=ue8m0)
    return ll_dispatch_recv(comm, pending)


def ll_combine_send(comm, y, topk_idx, topk_weights, handle: LLHandle) -> LLCombinePending:
    """Send phase of :func:`ll_combine`: return each expert row to its source rank."""
    op = "ll_combine_send"
    _checks.ep_group(comm, op)
    if not isinstance(handle, LLHandle):
        raise TypeError(f"jaxep.{op}: handle must be an LLHandle (LLDispatched.handle), "
                        f"got {type(handle).__name__}")
    t = handle.slot.shape[0]
    _checks.topk(comm, op, topk_idx, t, topk_weights)
    _checks.array(op, "y", y, 3, FLOAT_DTYPES)
    want = (comm.num_local_experts, comm.num_ranks * t, comm.cfg.hidden)
    _checks.dim(op, "y shape [E_l, R*T, H]", want, tuple(y.shape))
    rows = _xla.ll_combine_send(comm, y, handle.src_index)
    return LLCombinePending(rows, topk_idx.astype(jnp.int32), topk_weights)


def ll_combine_recv(comm, pending: LLCombinePending):
    """Receive phase of :func:`ll_combine`: wait and reduce with the top-k weights."""
    op = "ll_combine_recv"
    _checks.ep_group(comm, op)
    if not isinstance(pending, LLCombinePending):
        raise TypeError(f"jaxep.{op}: expected the LLCombinePending of ll_combine_send, "
                        f"got {type(pending).__name__}")
    return _xla.ll_combine_recv(comm, pending.rows, pending.topk_idx, pending.topk_weights)


def ll_combine(comm, y, topk_idx, topk_weights, handle: LLHandle):
    """Weighted sum of a token's expert outputs (low-latency mode).

    Args:
      comm: the :class:`jaxep.Communicator`.
      y: ``[E_l, R*T, H]`` bfloat16 (or float32) expert outputs, in the row order of the
        :func:`ll_dispatch` that produced ``handle``; padding rows are ignored.
      topk_idx, topk_weights: ``[T, K]``, as given to that dispatch / the routing weights.
      handle: ``LLDispatched.handle``.

    Returns:
      ``[T, H]`` in ``y.dtype``: ``sum_k w[t, k] * y[expert_k][slot(t, k)]`` accumulated in
      float32 (invalid k contribute nothing).

    Gradients: w.r.t. ``y`` the output cotangent dispatched and scaled by ``w[t, k]``; w.r.t.
    ``topk_weights[t, k]`` the dot product of the output cotangent with that row.
    """
    return ll_combine_recv(comm, ll_combine_send(comm, y, topk_idx, topk_weights, handle))
