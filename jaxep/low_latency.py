"""Low-latency mode (decoding): :func:`ll_dispatch`, :func:`ll_combine` and their two-phase forms.

Run per rank inside ``jax.shard_map``. Notation as in :mod:`jaxep.normal`; here every
(token, selected expert) pair is one row: a token is sent **once per selected expert** (an
expert listed twice in a token's top-k is sent once and both weights apply to that row in
:func:`ll_combine`). The receiver holds ``[E_l, R*T, H]``: for each local expert, its rows
ordered by source rank then source token, valid rows first (``counts[e]`` of them), then
padding. ``R*T`` rows per expert always suffice, so nothing is dropped.

Padding rows are zeros by default. ``zero_padding=False`` (CUDA backend) leaves their payload
and scales unspecified, which saves writing ``E_l * R*T * H`` bytes per call (235 MB at
E=256, R=4, T=128, H=7168 with fp8): use it with expert kernels that read only the first
``counts[e]`` rows (grouped GEMMs masked by ``counts``); a dense matmul over padding could see
NaNs. The handle's padding entries are always -1.

Two-phase forms: ``*_send`` issues the transfer and returns a pending pytree, ``*_recv`` waits and
unpacks it; independent work placed between them may overlap the transfer. On the CUDA backend the
send kernel writes the rows into the destinations' buffers and returns; nothing spins until the
recv kernel (except in a pre-reduced ``ll_combine_send(..., prereduce=...)``, whose kernel first
waits for the ranks' top-k weights that it needs). Over NVLink that kernel has finished the
transfer when it returns, so there is nothing left to overlap; ``ll_dispatch_send(...,
copy_engine=True)`` leaves the transfer to the copy engines instead (see its docstring). XLA orders
a recv after its send because the recv consumes the send's ``info`` array (a data dependency); it
is free to place independent work before the send or after the recv, so to pin ``send -> work ->
recv`` make the work's inputs and the pending pytree pass through one
``jax.lax.optimization_barrier``, and the work's result and the pending through another
(``benchmarks/bench_ll.py`` does this). Every send must be followed by exactly one recv (a recv
acknowledges the buffer it read by adding to a counter, so a second recv of the same send would let
a later send overwrite a buffer before it is read), and every rank must issue the sends in the same
order (a recv finds its data by its send's call number, so recvs may come in any order); at most
two sends of one kind (dispatch SM sends, dispatch copy-engine sends, combine) may be outstanding
per communicator (a third waits for the first to be received, and times out with an error naming
the phase if it never is). Precisely: a send reuses the buffer of the send of its kind two calls
back, so between a send and its recv at most one other call of the kind may be issued, and an
``ll_dispatch`` / ``ll_combine`` (a send and its recv in one kernel on CUDA) counts as one.

``ll_combine(..., prereduce="float32")`` sums a token's rows on each expert rank first, in
float32, and sends one row per (token, expert rank): fewer bytes, the same float32 accumulation;
``prereduce=True`` sends those partials in ``y``'s dtype: fewer bytes still, one more rounding
per rank (see :func:`ll_combine`).

Gradients (DESIGN.md §2): ``ll_dispatch``'s w.r.t. ``x`` is the sum of the cotangent rows of a
token's copies (with ``fp8`` the quantisation counts as identity: the payload cotangent is
divided by the row's scale first; JAX types that cotangent as e4m3, so it arrives rounded to
e4m3 -- train with ``fp8=False``); ``ll_combine``'s w.r.t. ``y`` is the output cotangent
dispatched and scaled by ``w[t, k]``, w.r.t. ``topk_weights[t, k]`` the dot product of the
output cotangent with that row. The CUDA backend implements them as custom VJPs on its own
kernels; the pure-JAX backend by autodiff.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp

from jaxep import _checks, _cuda, _xla, fp8 as _fp8
from jaxep._checks import FLOAT_DTYPES
from jaxep.normal import _pytree, _zero_cotangent


def _pytree_with_meta(*meta):
    def wrap(cls):
        cls = dataclasses.dataclass(frozen=True)(cls)
        data = [f.name for f in dataclasses.fields(cls) if f.name not in meta]
        return jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=list(meta))
    return wrap


@_pytree
class LLHandle:
    """Routing of one :func:`ll_dispatch`, consumed by :func:`ll_combine` (receiver side).

    Attributes:
      src_index: ``[E_l, R*T]`` int32: for each row of each local expert its source
        ``src_rank * T + src_token``; -1 for padding.
      src_topk: ``[E_l, R*T]`` int32: which top-k entry of the source token the row serves
        (the first listing of that expert); -1 for padding.
      counts: ``[E_l]`` int32, valid rows per local expert (as ``LLDispatched.counts``).
      recv_rows: ``[R*T, K]`` int32, the inverse map: for source token ``src_rank * T + t``
        and its top-k entry k, the row ``e_l * R*T + j`` of ``y`` that serves it here; -1 where
        the expert is elsewhere, the entry is -1 or repeats an earlier listing (used by the
        pre-reduced ``ll_combine``).
    """

    src_index: jax.Array
    src_topk: jax.Array
    counts: jax.Array
    recv_rows: jax.Array


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


@_pytree_with_meta("fp8", "ue8m0")
class LLDispatchPending:
    """In-flight :func:`ll_dispatch_send`: what :func:`ll_dispatch_recv` unpacks.

    Attributes:
      rows: pure-JAX backend: received ``[R(src), E_l, T, ...]`` cells (a tuple for FP8:
        payload and scales); None on the CUDA backend (the rows wait in jaxep's buffers).
      recv_topk: pure-JAX backend: ``[R(src), E_l, T]`` int32, the source's top-k entry of
        each cell, -1 for empty cells; None on the CUDA backend.
      info: CUDA backend: ``[4]`` int32 written by the send kernel (num_invalid, the call's
        number at its buffer low/high, buffer); the recv consumes it, which orders it after the
        send. None on the pure-JAX backend.
      x: CUDA backend: the sent ``x`` (carries the gradient to the recv); None otherwise.
      topk_idx: ``[T, K]`` int32, the sender's ids (sanitised on the pure-JAX backend).
      num_invalid: int32 scalar.
      fp8, ue8m0: static: the options of the send.
    """

    rows: jax.Array | tuple[jax.Array, jax.Array] | None
    recv_topk: jax.Array | None
    info: jax.Array | None
    x: jax.Array | None
    topk_idx: jax.Array
    num_invalid: jax.Array
    fp8: bool = False
    ue8m0: bool = False


@_pytree_with_meta("prereduce")
class LLCombinePending:
    """In-flight :func:`ll_combine_send`: what :func:`ll_combine_recv` reduces.

    Attributes:
      rows: pure-JAX backend: ``[R(dest), E_l, T, H]`` expert outputs returned to this rank;
        None on the CUDA backend.
      info: CUDA backend: ``[2]`` int32 from the send kernel (its call number; the recv reads
        it, which orders it after the send).
      y: CUDA backend: the sent ``y`` (carries its gradient to the recv); None otherwise.
      handle: CUDA backend: the dispatch's :class:`LLHandle` (for the gradient); None otherwise.
      topk_idx: ``[T, K]`` int32; topk_weights: ``[T, K]`` float32.
      prereduce: static: the send's option, False, True or ``"float32"`` (see
        :func:`ll_combine`).
    """

    rows: jax.Array | None
    info: jax.Array | None
    y: jax.Array | None
    handle: LLHandle | None
    topk_idx: jax.Array
    topk_weights: jax.Array
    prereduce: bool | str = False


def _on_cuda(comm) -> bool:
    return comm.implementation("ll_dispatch") == "cuda"


def _check_x(comm, op, x, fp8):
    _checks.ep_group(comm, op)
    _checks.array(op, "x", x, 2, FLOAT_DTYPES)
    _checks.hidden(comm, op, "x", x.shape[1])
    _checks.tokens(comm, op, x.shape[0])
    if fp8:
        _checks.fp8_hidden(op, x.shape[1])


def _check_dispatch(comm, op, x, topk_idx, fp8, round_scale, ue8m0):
    """Validates a dispatch's operands and options; returns ``topk_idx`` as int32."""
    _check_x(comm, op, x, fp8)
    idx = _checks.topk(comm, op, topk_idx, x.shape[0])
    if (round_scale or ue8m0) and not fp8:
        raise ValueError(f"jaxep.{op}: round_scale/ue8m0 need fp8=True")
    if ue8m0 and not round_scale:
        raise ValueError(f"jaxep.{op}: ue8m0=True needs round_scale=True (UE8M0 holds only "
                         f"powers of two)")
    return idx


def ll_dispatch_send(comm, x, topk_idx, *, fp8: bool = False, round_scale: bool = False,
                     ue8m0: bool = False, copy_engine: bool = False) -> LLDispatchPending:
    """Send phase of :func:`ll_dispatch`: quantise (with ``fp8``) and issue the transfer.

    Arguments as :func:`ll_dispatch`, plus ``copy_engine`` (CUDA backend, with
    ``EPConfig.ll_copy_engine``; the pure-JAX backend ignores it): the send kernel only
    packs each destination's rows into a local buffer, and the GPU's copy engines move them to
    the peers on jaxep's own streams, using no SM, so the transfer runs beside the work XLA
    places before the recv (see the module docstring). The send is then a custom call that XLA
    keeps out of its command buffers (CUDA graphs), since the host enqueues the copies of every
    call; if it is captured anyway, it runs as the SM send. Results are identical either way.
    Measured on 2xH200 at T=128 (fp8, ``zero_padding=False``; benchmarks/RESULTS.md): the
    copies run beside a 45 us matmul, but end to end it is no faster than the SM send (the
    pair alone 38-51 us against 30-31 us; with the matmul between, 80-91 us against 78-81 us),
    as enqueueing the copies costs the host more than the SM send spends on NVLink. Prefer the
    default unless measured otherwise.
    """
    return _ll_dispatch_send(comm, "ll_dispatch_send", x, topk_idx, fp8, round_scale, ue8m0,
                             copy_engine)


def _ll_dispatch_send(comm, op, x, topk_idx, fp8, round_scale, ue8m0, copy_engine):
    """:func:`ll_dispatch_send`, its errors naming ``op`` (the public op the user called)."""
    idx = _check_dispatch(comm, op, x, topk_idx, fp8, round_scale, ue8m0)
    if _on_cuda(comm):
        if copy_engine and not comm.cfg.ll_copy_engine:
            raise ValueError(f"jaxep.{op}: copy_engine=True needs the copy-engine buffers "
                             f"(EPConfig.ll_copy_engine=True)")
        info = _cuda.ll_dispatch_send(comm, jax.lax.stop_gradient(x), idx, fp8=fp8,
                                      round_scale=round_scale, copy_engine=copy_engine)
        return LLDispatchPending(None, None, info, x, idx, info[0], fp8, ue8m0)
    idx, num_invalid = _xla.sanitize(comm, idx)
    copy_topk = _xla.ll_copy_topk(comm, idx)
    if fp8:
        payload, scales = _fp8.quantize_fp8(x, round_scale=round_scale, ue8m0=ue8m0)
        recv_p, recv_topk = _xla.ll_send(comm, payload, copy_topk)
        recv_s, _ = _xla.ll_send(comm, scales, copy_topk)
        rows = (recv_p, recv_s)
    else:
        rows, recv_topk = _xla.ll_send(comm, x, copy_topk)
    return LLDispatchPending(rows, recv_topk, None, None, idx, num_invalid, fp8, ue8m0)


def ll_dispatch_recv(comm, pending: LLDispatchPending, *, zero_padding: bool = True
                     ) -> LLDispatched:
    """Receive phase of :func:`ll_dispatch`: wait for the transfer and unpack it.

    ``zero_padding=False`` leaves the payload and scales of padding rows unspecified (CUDA
    backend; see the module docstring).
    """
    return _ll_dispatch_recv(comm, "ll_dispatch_recv", pending, zero_padding)


def _shape(a) -> tuple:
    """``a.shape``, or ``()`` for None (a field the other backend fills)."""
    return tuple(getattr(a, "shape", ()))


def _check_dispatch_pending(comm, op, pending: LLDispatchPending):
    """``pending`` has the shapes of an ``ll_dispatch_send`` of this communicator."""
    what, cfg = "this LLDispatchPending", comm.cfg
    _checks.array(op, "pending.topk_idx", pending.topk_idx, 2)
    t = pending.topk_idx.shape[0]
    _checks.belongs(comm, op, what, "pending.topk_idx", (t, cfg.num_topk),
                    _shape(pending.topk_idx), t)
    if pending.info is not None:
        _checks.belongs(comm, op, what, "pending.x", (t, cfg.hidden), _shape(pending.x))
        return
    cells = (comm.num_ranks, comm.num_local_experts, t)
    rows = pending.rows[0] if isinstance(pending.rows, tuple) else pending.rows
    _checks.belongs(comm, op, what, "pending.recv_topk", cells, _shape(pending.recv_topk))
    _checks.belongs(comm, op, what, "pending.rows", cells + (cfg.hidden,), _shape(rows))


def _ll_dispatch_recv(comm, op, pending, zero_padding):
    """:func:`ll_dispatch_recv`, its errors naming ``op``."""
    _checks.ep_group(comm, op)
    if not isinstance(pending, LLDispatchPending):
        raise TypeError(f"jaxep.{op}: expected the LLDispatchPending of ll_dispatch_send, "
                        f"got {type(pending).__name__}")
    _check_dispatch_pending(comm, op, pending)
    if pending.info is not None:
        if not _on_cuda(comm):
            raise ValueError(f"jaxep.{op}: this pending transfer was sent by the CUDA backend of "
                             f"another communicator")
        out = _ll_recv_cuda(comm, pending.fp8, pending.ue8m0, bool(zero_padding),
                            pending.x.dtype, pending.x, pending.info, pending.topk_idx)
        x, counts, src_index, src_topk, recv_rows, num_invalid = out
        return LLDispatched(x, counts, num_invalid,
                            LLHandle(src_index, src_topk, counts, recv_rows))
    src_index, _, counts = _xla.ll_layout(comm, pending.recv_topk >= 0)
    unpack = lambda a: _xla.ll_unpack(a, src_index)  # noqa: E731
    rows = pending.rows
    x = tuple(unpack(a) for a in rows) if isinstance(rows, tuple) else unpack(rows)
    src_topk = jnp.where(src_index >= 0, unpack(pending.recv_topk), -1)
    recv_rows = _xla.ll_recv_rows(src_index, src_topk, comm.cfg.num_topk)
    return LLDispatched(x, counts, pending.num_invalid,
                        LLHandle(src_index, src_topk, counts, recv_rows))


def ll_dispatch(comm, x, topk_idx, *, fp8: bool = False, round_scale: bool = False,
                ue8m0: bool = False, zero_padding: bool = True) -> LLDispatched:
    """Send each (token, selected expert) pair to the expert's rank (low-latency mode).

    Args:
      comm: the :class:`jaxep.Communicator`.
      x: ``[T, H]`` bfloat16 (or float32), ``T <= max_tokens_per_rank``.
      topk_idx: ``[T, K]`` int32 global expert ids, -1 for none (ids outside ``[-1, E)`` are
        treated as -1 and counted in ``num_invalid``).
      fp8: quantise to e4m3 with one scale per 128 channels before sending (H % 128 == 0).
      round_scale: round scales up to powers of two. ue8m0: pack them as UE8M0 (needs
        ``round_scale``). Bit-equal to :func:`jaxep.quantize_fp8` of the routed rows.
      zero_padding: zero the payload (and scales) of rows past ``counts`` (default); False
        leaves them unspecified on the CUDA backend (see the module docstring).

    Returns:
      :class:`LLDispatched` with ``[E_l, R*T, ...]`` rows, sharded like ``x`` over the EP axis.

    On the CUDA backend both phases run in one kernel: each block sends its share, then
    receives as soon as every source has signalled (no second launch). Its blocks wait for one
    another through the peers, so the kernel takes at most one block per SM and is launched
    cooperatively (all blocks placed at once, as the pre-reduced combine send is). It then
    holds every SM it runs on until the slowest rank arrives: with kernels of another stream
    that wait for this GPU's peers at the same time (a collective on a side stream, say), prefer
    the two-phase forms, whose blocks never wait for one another. Same results as
    ``ll_dispatch_recv(ll_dispatch_send(...))``, with which it may be mixed (see the module
    docstring for how many may be outstanding).
    """
    op = "ll_dispatch"
    if not _on_cuda(comm):
        pending = _ll_dispatch_send(comm, op, x, topk_idx, fp8, round_scale, ue8m0, False)
        return _ll_dispatch_recv(comm, op, pending, zero_padding)
    idx = _check_dispatch(comm, op, x, topk_idx, fp8, round_scale, ue8m0)
    out = _ll_dispatch_cuda(comm, bool(fp8), bool(round_scale), bool(ue8m0),
                            bool(zero_padding), x.dtype, x, idx)
    x_out, counts, src_index, src_topk, recv_rows, num_invalid = out
    return LLDispatched(x_out, counts, num_invalid,
                        LLHandle(src_index, src_topk, counts, recv_rows))


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4, 5))
def _ll_dispatch_cuda(comm, fp8, round_scale, ue8m0, zero_padding, x_dtype, x, topk_idx):
    return _ll_dispatch_cuda_fwd(comm, fp8, round_scale, ue8m0, zero_padding, x_dtype, x,
                                 topk_idx)[0]


def _ll_dispatch_cuda_fwd(comm, fp8, round_scale, ue8m0, zero_padding, x_dtype, x, topk_idx):
    payload, scales, counts, src_index, src_topk, recv_rows, num_invalid = _cuda.ll_dispatch(
        comm, x, topk_idx, fp8=fp8, round_scale=round_scale, ue8m0=ue8m0,
        zero_padding=zero_padding)
    out = ((payload, scales) if fp8 else payload, counts, src_index, src_topk, recv_rows,
           num_invalid)
    return out, (src_index, src_topk, counts, scales, topk_idx)


def _ll_dispatch_cuda_bwd(comm, fp8, round_scale, ue8m0, zero_padding, x_dtype, res, g):
    src_index, src_topk, counts, scales, topk_idx = res
    gx = _dispatch_bwd(comm, fp8, ue8m0, x_dtype, src_index, src_topk, counts, scales,
                       topk_idx, g)
    return gx, _zero_cotangent(topk_idx)


_ll_dispatch_cuda.defvjp(_ll_dispatch_cuda_fwd, _ll_dispatch_cuda_bwd)


def _dispatch_bwd(comm, fp8, ue8m0, x_dtype, src_index, src_topk, counts, scales, topk_idx, g):
    """Gradient of a CUDA dispatch w.r.t. ``x``: the cotangent rows of a token's copies summed
    (a plain combine with weight 1 per first listing); with ``fp8`` each payload cotangent
    divided by its row's scale first (the quantisation counts as identity)."""
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


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _ll_recv_cuda(comm, fp8, ue8m0, zero_padding, x_dtype, x, info, topk_idx):
    return _ll_recv_cuda_fwd(comm, fp8, ue8m0, zero_padding, x_dtype, x, info, topk_idx)[0]


def _ll_recv_cuda_fwd(comm, fp8, ue8m0, zero_padding, x_dtype, x, info, topk_idx):
    del x  # only carries the gradient
    payload, scales, counts, src_index, src_topk, recv_rows, num_invalid = _cuda.ll_dispatch_recv(
        comm, info, topk_idx.shape[0], x_dtype, fp8=fp8, ue8m0=ue8m0,
        zero_padding=zero_padding)
    out = ((payload, scales) if fp8 else payload, counts, src_index, src_topk, recv_rows,
           num_invalid)
    return out, (src_index, src_topk, counts, scales, info, topk_idx)


def _ll_recv_cuda_bwd(comm, fp8, ue8m0, zero_padding, x_dtype, res, g):
    src_index, src_topk, counts, scales, info, topk_idx = res
    gx = _dispatch_bwd(comm, fp8, ue8m0, x_dtype, src_index, src_topk, counts, scales,
                       topk_idx, g)
    return gx, _zero_cotangent(info), _zero_cotangent(topk_idx)


_ll_recv_cuda.defvjp(_ll_recv_cuda_fwd, _ll_recv_cuda_bwd)


def _prereduce(op, prereduce):
    """The ``prereduce`` option, checked: False, True or ``"float32"``."""
    if isinstance(prereduce, str):
        if prereduce != "float32":
            raise ValueError(f"jaxep.{op}: prereduce must be False, True or 'float32', "
                             f"got {prereduce!r}")
        return prereduce
    return bool(prereduce)


def _check_handle(comm, op, handle: LLHandle) -> int:
    """``handle`` has the shapes of an ``ll_dispatch`` of this communicator; returns its T."""
    for name in ("src_index", "src_topk", "recv_rows"):
        _checks.array(op, f"handle.{name}", getattr(handle, name), 2)
    _checks.array(op, "handle.counts", handle.counts, 1)
    r, el = comm.num_ranks, comm.num_local_experts
    rt = handle.recv_rows.shape[0]
    t = rt // r
    for name, want in (("recv_rows", (r * t, comm.cfg.num_topk)), ("src_index", (el, r * t)),
                       ("src_topk", (el, r * t)), ("counts", (el,))):
        _checks.belongs(comm, op, "this LLHandle", f"handle.{name}", want,
                        getattr(handle, name).shape, t)
    return t


def _check_combine(comm, op, y, topk_idx, topk_weights, handle):
    """Validates a combine's operands; returns ``topk_idx`` as int32."""
    _checks.ep_group(comm, op)
    if not isinstance(handle, LLHandle):
        raise TypeError(f"jaxep.{op}: handle must be an LLHandle (LLDispatched.handle), "
                        f"got {type(handle).__name__}")
    t = _check_handle(comm, op, handle)
    idx = _checks.topk(comm, op, topk_idx, t)
    _checks.topk_weights(op, topk_weights, idx)
    _checks.array(op, "y", y, 3, FLOAT_DTYPES)
    want = (comm.num_local_experts, comm.num_ranks * t, comm.cfg.hidden)
    _checks.dim(op, "y shape [E_l, R*T, H]", want, tuple(y.shape))
    return idx


def ll_combine_send(comm, y, topk_idx, topk_weights, handle: LLHandle, *,
                    prereduce: bool | str = False) -> LLCombinePending:
    """Send phase of :func:`ll_combine`: return each expert row to its source rank (with
    ``prereduce``, each rank's weighted sum per source token; see :func:`ll_combine`). With
    ``prereduce`` on the CUDA backend the send kernel first exchanges the top-k weights, so it
    waits for the ranks whose weights it needs (in practice every rank) to reach this send:
    hence the default False here (the send never waits for a peer), where :func:`ll_combine`
    defaults to ``"float32"``."""
    return _ll_combine_send(comm, "ll_combine_send", y, topk_idx, topk_weights, handle,
                            prereduce)


def _ll_combine_send(comm, op, y, topk_idx, topk_weights, handle, prereduce):
    """:func:`ll_combine_send`, its errors naming ``op``."""
    idx = _check_combine(comm, op, y, topk_idx, topk_weights, handle)
    prereduce = _prereduce(op, prereduce)
    if _on_cuda(comm):
        sg = jax.lax.stop_gradient
        if prereduce:
            info = _cuda.ll_combine_send_reduced(comm, sg(y), handle.recv_rows, idx,
                                                 sg(topk_weights), prereduce)
        else:
            info = _cuda.ll_combine_send(comm, sg(y), handle.src_index, handle.src_topk,
                                         handle.counts)
        return LLCombinePending(None, info, y, handle, idx, topk_weights, prereduce)
    rows = _xla.ll_combine_send(comm, y, handle.src_index)
    return LLCombinePending(rows, None, None, None, idx, topk_weights, prereduce)


def ll_combine_recv(comm, pending: LLCombinePending):
    """Receive phase of :func:`ll_combine`: wait and reduce with the top-k weights."""
    return _ll_combine_recv(comm, "ll_combine_recv", pending)


def _check_combine_pending(comm, op, pending: LLCombinePending):
    """``pending`` has the shapes of an ``ll_combine_send`` of this communicator."""
    what, cfg = "this LLCombinePending", comm.cfg
    r, el = comm.num_ranks, comm.num_local_experts
    _checks.array(op, "pending.topk_idx", pending.topk_idx, 2)
    t = pending.topk_idx.shape[0]
    _checks.belongs(comm, op, what, "pending.topk_idx", (t, cfg.num_topk),
                    _shape(pending.topk_idx), t)
    _checks.belongs(comm, op, what, "pending.topk_weights", (t, cfg.num_topk),
                    _shape(pending.topk_weights))
    if pending.info is not None:
        _checks.belongs(comm, op, what, "pending.y", (el, r * t, cfg.hidden), _shape(pending.y))
    else:
        _checks.belongs(comm, op, what, "pending.rows", (r, el, t, cfg.hidden),
                        _shape(pending.rows))


def _ll_combine_recv(comm, op, pending):
    """:func:`ll_combine_recv`, its errors naming ``op``."""
    _checks.ep_group(comm, op)
    if not isinstance(pending, LLCombinePending):
        raise TypeError(f"jaxep.{op}: expected the LLCombinePending of ll_combine_send, "
                        f"got {type(pending).__name__}")
    _check_combine_pending(comm, op, pending)
    if pending.info is not None:
        if not _on_cuda(comm):
            raise ValueError(f"jaxep.{op}: this pending transfer was sent by the CUDA backend of "
                             f"another communicator")
        return _ll_combine_cuda(comm, pending.prereduce, pending.y, pending.topk_weights,
                                pending.info, pending.topk_idx, pending.handle)
    return _xla.ll_combine_recv(comm, pending.rows, pending.topk_idx, pending.topk_weights,
                                prereduce=pending.prereduce)


def ll_combine(comm, y, topk_idx, topk_weights, handle: LLHandle, *,
               prereduce: bool | str = "float32"):
    """Weighted sum of a token's expert outputs (low-latency mode).

    Args:
      comm: the :class:`jaxep.Communicator`.
      y: ``[E_l, R*T, H]`` bfloat16 (or float32) expert outputs, in the row order of the
        :func:`ll_dispatch` that produced ``handle``; padding rows are ignored.
      topk_idx, topk_weights: ``[T, K]``: the ``topk_idx`` given to that dispatch, and the
        routing weights.
      handle: ``LLDispatched.handle``.
      prereduce: where the sum starts. False: every entry's row travels to the token's rank,
        which sums them in float32. ``"float32"`` (default) or True: each expert rank sums, in
        float32, the weighted rows of a token that its experts hold and sends that one partial
        per (token, rank); the token's rank adds the partials in float32. A rank that holds a
        single expert of the token sends that row as it is (the token's rank weighs it).
        ``"float32"`` sends a partial of two or more rows in float32: float32 accumulation
        throughout, as False (the additions associate differently, so the result may differ in
        the last bit); with bf16 ``y`` a rank that holds three or more of a token's experts
        sends fewer bytes than their rows, two the same (K=8: about 2x fewer bytes in all at
        R=2, 1.3x at R=4). True sends it in ``y.dtype``: (distinct experts) / (ranks they are
        on) times fewer rows than False (at K=8, R=4 about 2.2x fewer bytes), at the price of
        one rounding to ``y.dtype`` per such partial (with bf16 a few bf16 ulps of the largest
        partial). With float32 ``y`` the two are the same. The CUDA send first exchanges the
        top-k weights between ranks (``T*K`` floats) and waits inside its kernel for the ones
        it needs (those of every rank that has a token with two or more experts here: at K=8
        nearly always all), so skew between ranks lands in the send rather than in the recv
        (here, where both phases are one kernel that waits for every rank anyway, that costs
        nothing; :func:`ll_combine_send` defaults to False). Same gradients.

    Returns:
      ``[T, H]`` in ``y.dtype``: ``sum_k w[t, k] * y[expert_k][row(t, k)]`` accumulated in
      float32 (invalid k contribute nothing; an expert listed twice contributes its row once
      per listing, with each listing's weight).

    Gradients: w.r.t. ``y`` the output cotangent dispatched and scaled by ``w[t, k]``; w.r.t.
    ``topk_weights[t, k]`` the dot product of the output cotangent with that row. The weights'
    gradient needs every entry's row at the token's rank: pre-reduced (the default included),
    the CUDA backward fetches the rows again with a per-entry combine; with
    ``prereduce=False`` the forward keeps them (one combine fewer per training step).

    On the CUDA backend both phases run in one kernel, as in :func:`ll_dispatch` (cooperative
    launch, at most one block per SM; see there when to prefer the two-phase forms); same
    results as ``ll_combine_recv(ll_combine_send(...))``.
    """
    op = "ll_combine"
    prereduce = _prereduce(op, prereduce)
    if not _on_cuda(comm):
        return _ll_combine_recv(comm, op, _ll_combine_send(comm, op, y, topk_idx, topk_weights,
                                                           handle, prereduce))
    idx = _check_combine(comm, op, y, topk_idx, topk_weights, handle)
    return _ll_combine_one(comm, prereduce, y, topk_weights, idx, handle)


def _combine_one(comm, prereduce, y, topk_weights, topk_idx, handle, want_rows):
    return _cuda.ll_combine(comm, y, handle.src_index, handle.src_topk, handle.counts,
                            handle.recv_rows, topk_idx, topk_weights, want_rows=want_rows,
                            prereduce=prereduce)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _ll_combine_one(comm, prereduce, y, topk_weights, topk_idx, handle):
    """``ll_combine`` on CUDA: one kernel (the send, then the receive in the same blocks)."""
    return _combine_one(comm, prereduce, y, topk_weights, topk_idx, handle, False)[0]


def _ll_combine_one_fwd(comm, prereduce, y, topk_weights, topk_idx, handle):
    if prereduce:  # no per-entry rows came back: the backward fetches them (a plain combine)
        out, _ = _combine_one(comm, prereduce, y, topk_weights, topk_idx, handle, False)
        return out, (y, topk_weights, topk_idx, handle)
    out, rows = _combine_one(comm, False, y, topk_weights, topk_idx, handle, True)
    return out, (rows, topk_weights, topk_idx, handle)


def _ll_combine_one_bwd(comm, prereduce, res, g):
    rows, topk_weights, topk_idx, handle = res
    gy, gw = _combine_bwd(comm, prereduce, rows, topk_weights, topk_idx, handle, g)
    return gy, gw, _zero_cotangent(topk_idx), jax.tree.map(_zero_cotangent, handle)


_ll_combine_one.defvjp(_ll_combine_one_fwd, _ll_combine_one_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _ll_combine_cuda(comm, prereduce, y, topk_weights, info, topk_idx, handle):
    return _cuda.ll_combine_recv(comm, info, topk_idx, topk_weights, y.dtype,
                                 prereduce=prereduce)[0]


def _ll_combine_cuda_fwd(comm, prereduce, y, topk_weights, info, topk_idx, handle):
    if prereduce:  # no per-entry rows came back: the backward fetches them (a plain combine)
        out = _ll_combine_cuda(comm, prereduce, y, topk_weights, info, topk_idx, handle)
        return out, (y, topk_weights, info, topk_idx, handle)
    out, rows = _cuda.ll_combine_recv(comm, info, topk_idx, topk_weights, y.dtype, True)
    return out, (rows, topk_weights, info, topk_idx, handle)


def _ll_combine_cuda_bwd(comm, prereduce, res, g):
    rows, topk_weights, info, topk_idx, handle = res
    gy, gw = _combine_bwd(comm, prereduce, rows, topk_weights, topk_idx, handle, g)
    return (gy, gw, _zero_cotangent(info), _zero_cotangent(topk_idx),
            jax.tree.map(_zero_cotangent, handle))


def _combine_bwd(comm, prereduce, rows, topk_weights, topk_idx, handle, g):
    """Gradients of a CUDA combine w.r.t. ``y`` (the output cotangent dispatched, each row
    scaled by its weight) and ``topk_weights`` (the cotangent's dot product with each entry's
    row; ``rows`` are those rows, or with ``prereduce`` ``y``, whose rows are fetched again)."""
    if prereduce:  # rows is y here
        # The refetch depends on forward values only: tie it to g, or XLA may hoist the sends
        # of several layers ahead of their recvs (at most two may be outstanding).
        rows, g = jax.lax.optimization_barrier((rows, g))
        sent = _cuda.ll_combine_send(comm, rows, handle.src_index, handle.src_topk, handle.counts)
        _, rows = _cuda.ll_combine_recv(comm, sent, topk_idx, topk_weights, rows.dtype, True)
    gw = jnp.einsum("tkh,th->tk", rows.astype(jnp.float32), g.astype(jnp.float32))
    sent = _cuda.ll_dispatch_send(comm, g.astype(rows.dtype), topk_idx, topk_weights)
    gy = _cuda.ll_dispatch_recv(comm, sent, topk_idx.shape[0], rows.dtype, weighted=True)[0]
    return gy, gw.astype(topk_weights.dtype)


_ll_combine_cuda.defvjp(_ll_combine_cuda_fwd, _ll_combine_cuda_bwd)
