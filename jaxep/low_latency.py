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
``counts[e]`` rows (grouped GEMMs masked by ``counts``); the padding then holds stale rows of
earlier calls, which can be NaN or Inf, so a dense matmul over it must mask its input or output
by ``counts`` (``jnp.where(row < counts[e], ...)``). The handle's padding entries are always -1.

Two-phase forms: ``*_send`` issues the transfer and returns a pending pytree, ``*_recv`` waits and
unpacks it; independent work placed between them may overlap the transfer (on CUDA the SM send
has finished its NVLink writes when it returns; ``ll_dispatch_send(..., copy_engine=True)``
leaves them to the copy engines). XLA orders a recv after its send through the ``info`` array
it consumes and is free to move independent work; to pin ``send -> work -> recv``, pass the
work's inputs and the pending pytree through one ``jax.lax.optimization_barrier`` and its
result and the pending through another (``benchmarks/bench_ll.py`` does this).

.. warning:: Every send must be followed by exactly one recv, and every rank must issue its
   sends in the same order. At most two sends of one kind (dispatch, copy-engine dispatch,
   combine) may be outstanding: between a send and its recv at most one other call of its kind
   may be issued, and an ``ll_dispatch`` / ``ll_combine`` counts as one. A third send waits for
   the first to be received and times out with an error naming the phase if it never is. Why:
   docs/design.md, "Low-latency mode".

``ll_combine(..., prereduce="float32")`` sums a token's rows on each expert rank first, in
float32, and sends one row per (token, expert rank): fewer bytes, the same float32 accumulation;
``prereduce=True`` sends those partials in ``y``'s dtype: fewer bytes still, one more rounding
per rank (see :func:`ll_combine`).

Gradients: ``ll_dispatch``'s w.r.t. ``x`` is the sum of the cotangent rows of a
token's copies (with ``fp8`` the quantisation counts as identity: the payload cotangent is
divided by the row's scale first; JAX types that cotangent as e4m3, so it arrives rounded to
e4m3 -- train with ``fp8=False``); ``ll_combine``'s w.r.t. ``y`` is the output cotangent
dispatched and scaled by ``w[t, k]``, w.r.t. ``topk_weights[t, k]`` the dot product of the
output cotangent with that row. The CUDA backend implements them as custom VJPs on its own
kernels (``jaxep._cuda_ops``); the pure-JAX backend (``jaxep._xla_ops``) by autodiff.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax

from jaxep import _backends, _checks, _replicated
from jaxep.normal import _pytree


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


def _dispatched(out) -> LLDispatched:
    x, counts, src_index, src_topk, recv_rows, num_invalid = out
    return LLDispatched(x, counts, num_invalid, LLHandle(src_index, src_topk, counts, recv_rows))


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
    The copies do run beside other work, but enqueueing them costs the host more than the SM
    send spends on NVLink, so end to end it has not been faster (benchmarks/RESULTS.md).
    Prefer the default unless measured otherwise. One process only.
    """
    op = "ll_dispatch_send"
    idx = _checks.ll_dispatch(comm, op, x, topk_idx, fp8, round_scale, ue8m0)
    _checks.copy_engine(comm, op, copy_engine)
    impl = _backends.lookup(comm, op)
    fields = impl(comm, x, idx, fp8=fp8, round_scale=round_scale, ue8m0=ue8m0,
                  copy_engine=copy_engine)
    return LLDispatchPending(*fields, fp8, ue8m0)


def ll_dispatch_recv(comm, pending: LLDispatchPending, *, zero_padding: bool = True
                     ) -> LLDispatched:
    """Receive phase of :func:`ll_dispatch`: wait for the transfer and unpack it.

    ``zero_padding=False`` leaves the payload and scales of padding rows unspecified (CUDA
    backend; see the module docstring).
    """
    op = "ll_dispatch_recv"
    _checks.pending(comm, op, pending, LLDispatchPending, "ll_dispatch")
    impl = _backends.lookup(comm, op, pending)
    return _dispatched(impl(comm, pending, zero_padding=zero_padding))


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

    Replicated tokens (``x`` and ``topk_idx`` not varying over the EP axes, ``shard_map`` with
    ``check_vma=True``): rank r sends only its ``ceil(T / R)`` share (T padded with
    ``topk_idx = -1`` rows; the rows are then ``[E_l, R*ceil(T/R), ...]``), the handle is a
    :class:`jaxep.ReplicatedHandle`, and :func:`ll_combine` (given the same full ``topk_idx``
    and the full ``topk_weights``) returns the replicated ``[T, H]``. See ``jaxep._replicated``.

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
    if _replicated.detect(comm, op, x, topk_idx):
        xs, idx, _ = _replicated.shares(comm, x, topk_idx)
        d = ll_dispatch(comm, xs, idx, fp8=fp8, round_scale=round_scale, ue8m0=ue8m0,
                        zero_padding=zero_padding)
        return dataclasses.replace(d, handle=_replicated.ReplicatedHandle(d.handle, x.shape[0]))
    idx = _checks.ll_dispatch(comm, op, x, topk_idx, fp8, round_scale, ue8m0)
    impl = _backends.lookup(comm, op)
    return _dispatched(impl(comm, x, idx, fp8=fp8, round_scale=round_scale, ue8m0=ue8m0,
                            zero_padding=zero_padding))


def ll_combine_send(comm, y, topk_idx, topk_weights, handle: LLHandle, *,
                    prereduce: bool | str = False) -> LLCombinePending:
    """Send phase of :func:`ll_combine`: return each expert row to its source rank (with
    ``prereduce``, each rank's weighted sum per source token; see :func:`ll_combine`). With
    ``prereduce`` on the CUDA backend the send kernel first exchanges the top-k weights, so it
    waits for the ranks whose weights it needs (in practice every rank) to reach this send:
    hence the default False here (the send never waits for a peer), where :func:`ll_combine`
    defaults to ``"float32"``."""
    op = "ll_combine_send"
    idx = _checks.ll_combine(comm, op, y, topk_idx, topk_weights, handle, LLHandle)
    prereduce = _checks.prereduce(op, prereduce)
    impl = _backends.lookup(comm, op)
    fields = impl(comm, y, idx, topk_weights, handle, prereduce=prereduce)
    return LLCombinePending(*fields, prereduce)


def ll_combine_recv(comm, pending: LLCombinePending):
    """Receive phase of :func:`ll_combine`: wait and reduce with the top-k weights."""
    op = "ll_combine_recv"
    _checks.pending(comm, op, pending, LLCombinePending, "ll_combine")
    return _backends.lookup(comm, op, pending)(comm, pending)


def ll_combine(comm, y, topk_idx, topk_weights, handle: LLHandle, *,
               prereduce: bool | str = "float32"):
    """Weighted sum of a token's expert outputs (low-latency mode).

    Args:
      comm: the :class:`jaxep.Communicator`.
      y: ``[E_l, R*T, H]`` bfloat16 (or float32) expert outputs, in the row order of the
        :func:`ll_dispatch` that produced ``handle``; padding rows are ignored.
      topk_idx, topk_weights: ``[T, K]``: the ``topk_idx`` given to that dispatch, and the
        routing weights.
      handle: ``LLDispatched.handle`` (a :class:`jaxep.ReplicatedHandle` after a replicated
        :func:`ll_dispatch`: pass the full ``[T, K]`` ``topk_idx`` and ``topk_weights``; the
        result is the replicated ``[T, H]``).
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
    if isinstance(handle, _replicated.ReplicatedHandle):
        return _replicated.ll_combine(comm, op, y, topk_idx, topk_weights, handle,
                                      partial(ll_combine, prereduce=prereduce))
    prereduce = _checks.prereduce(op, prereduce)
    idx = _checks.ll_combine(comm, op, y, topk_idx, topk_weights, handle, LLHandle)
    impl = _backends.lookup(comm, op)
    return impl(comm, y, idx, topk_weights, handle, prereduce=prereduce)
