"""Trace-time validation shared by the public ops: clear ValueError/TypeError messages."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

FLOAT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))


def ep_group(comm, op: str) -> int:
    """Check that ``op`` runs inside a shard_map binding the EP axis of size R; return R."""
    from jaxep.communicator import Communicator

    if not isinstance(comm, Communicator):
        raise TypeError(f"jaxep.{op}: first argument must be a jaxep.Communicator, "
                        f"got {type(comm).__name__}")
    if comm.closed:
        raise ValueError(f"jaxep.{op}: the Communicator was closed")
    names = comm.cfg.axis_names
    axis = names[0] if len(names) == 1 else names
    try:
        size = lax.axis_size(axis)
    except NameError:
        raise ValueError(
            f"jaxep.{op} must be called inside jax.shard_map over a mesh that binds the EP axis "
            f"{comm.cfg.axis_name!r} (expected axis size R={comm.num_ranks}); "
            f"{_unbound(names)}") from None
    if size != comm.num_ranks:
        raise ValueError(f"jaxep.{op}: EP axis {comm.cfg.axis_name!r} has size {size} here, but "
                         f"the Communicator was built for R={comm.num_ranks}")
    return size


def _unbound(names) -> str:
    """Why the EP axes ``names`` are not bound here (``lax.axis_size`` raised NameError)."""
    try:
        mesh = jax.sharding.get_abstract_mesh()
        manual = set(getattr(mesh, "manual_axes", ()))
        not_manual = [a for a in names if a in mesh.axis_names and a not in manual]
    except Exception:  # noqa: BLE001 -- only refines the message
        not_manual = []
    if not_manual:
        axes = ", ".join(repr(a) for a in not_manual)
        return (f"the current mesh has {axes}, but not as a manual axis here: a shard_map whose "
                f"axis_names= leaves it out keeps it automatic (add it to axis_names, or leave "
                f"axis_names unset), and outside shard_map no axis is manual")
    return "no such axis is bound here"


def array(op: str, name: str, x, ndim: int, dtypes=None):
    shape = getattr(x, "shape", None)
    if shape is None or not hasattr(x, "dtype"):
        raise TypeError(f"jaxep.{op}: {name} must be an array, got {type(x).__name__}")
    if len(shape) != ndim:
        raise ValueError(f"jaxep.{op}: {name} must have rank {ndim}, got shape {tuple(shape)}")
    if dtypes is not None and jnp.dtype(x.dtype) not in [jnp.dtype(d) for d in dtypes]:
        names = ", ".join(str(jnp.dtype(d)) for d in dtypes)
        raise TypeError(f"jaxep.{op}: {name} must have dtype in ({names}), got {x.dtype}")


def dim(op: str, what: str, expected: int, actual: int):
    if expected != actual:
        raise ValueError(f"jaxep.{op}: {what} must be {expected}, got {actual}")


def tokens(comm, op: str, num_tokens: int):
    t_max = comm.cfg.max_tokens_per_rank
    if num_tokens > t_max:
        raise ValueError(f"jaxep.{op}: {num_tokens} tokens per rank exceed "
                         f"EPConfig.max_tokens_per_rank={t_max}")


def topk(comm, op: str, topk_idx, num_tokens: int):
    """Check ``topk_idx [T, K]`` (any integer dtype); return it as int32 ids for the backends.

    Ids outside ``[-1, E)`` are invalid whatever the integer width: an int64 id of ``2**32 + 1``
    or a uint32 id of ``2**32 - 1`` must not become expert 1 or "no expert" by narrowing, so
    every invalid id of a dtype wider than int32 maps to E (still invalid, and counted in
    ``num_invalid``) before the conversion.
    """
    array(op, "topk_idx", topk_idx, 2)
    if not jnp.issubdtype(topk_idx.dtype, jnp.integer):
        raise TypeError(f"jaxep.{op}: topk_idx must be an integer array (int32), "
                        f"got {topk_idx.dtype}")
    dim(op, "topk_idx.shape[0] (tokens)", num_tokens, topk_idx.shape[0])
    dim(op, "topk_idx.shape[-1] (EPConfig.num_topk)", comm.cfg.num_topk, topk_idx.shape[1])
    return ids_as_int32(topk_idx, comm.cfg.num_experts)


def ids_as_int32(topk_idx, num_experts: int):
    """``topk_idx`` as int32 with the validity of each id in ``[-1, num_experts)`` kept."""
    dtype = jnp.dtype(topk_idx.dtype)
    have, i32 = jnp.iinfo(dtype), jnp.iinfo(jnp.int32)
    if i32.min <= have.min and have.max <= i32.max:
        return topk_idx.astype(jnp.int32)  # exact
    valid = topk_idx < num_experts
    if have.min < 0:
        valid = valid & (topk_idx >= -1)
    return jnp.where(valid, topk_idx, num_experts).astype(jnp.int32)


def topk_weights(op: str, weights, topk_idx):
    """Check the routing weights of an op that takes them: a floating ``[T, K]`` array."""
    if weights is None:
        raise TypeError(f"jaxep.{op}: topk_weights must be a float32 array shaped like "
                        f"topk_idx {tuple(topk_idx.shape)}, got None")
    array(op, "topk_weights", weights, 2)
    if not jnp.issubdtype(weights.dtype, jnp.floating):
        raise TypeError(f"jaxep.{op}: topk_weights must be floating (float32), "
                        f"got {weights.dtype}")
    if weights.shape != topk_idx.shape:
        raise ValueError(f"jaxep.{op}: topk_weights shape {tuple(weights.shape)} must "
                         f"equal topk_idx shape {tuple(topk_idx.shape)}")


def belongs(comm, op: str, what: str, name: str, want, got, num_tokens=None):
    """Check that ``what`` (a pending transfer or a handle given to ``op``) comes from this
    communicator: its array ``name`` has shape ``want`` and its ``num_tokens`` (when given) fit
    ``max_tokens_per_rank``."""
    cfg = comm.cfg
    if tuple(got) != tuple(want):
        problem = f"{name} has shape {tuple(got)}, expected {tuple(want)}"
    elif num_tokens is not None and num_tokens > cfg.max_tokens_per_rank:
        problem = f"its {num_tokens} tokens per rank exceed max_tokens_per_rank"
    else:
        return
    raise ValueError(f"jaxep.{op}: {what} does not belong to this Communicator (R="
                     f"{comm.num_ranks}, E={cfg.num_experts}, K={cfg.num_topk}, H={cfg.hidden}, "
                     f"max_tokens_per_rank={cfg.max_tokens_per_rank}): {problem}")


def hidden(comm, op: str, name: str, h: int):
    dim(op, f"{name}.shape[-1] (EPConfig.hidden)", comm.cfg.hidden, h)


def fp8_hidden(op: str, h: int):
    if h % 128:
        raise ValueError(f"jaxep.{op}: FP8 needs hidden to be a multiple of 128, got {h}")


def instance(op: str, value, cls, what: str):
    """``value`` must be a ``cls``; ``what`` completes the message (e.g. "handle must be a
    DispatchHandle (Dispatched.handle)")."""
    if not isinstance(value, cls):
        raise TypeError(f"jaxep.{op}: {what}, got {type(value).__name__}")


# ---- per op --------------------------------------------------------------------------------


def dispatch_layout(comm, op: str, topk_idx):
    """``dispatch_layout``'s ``topk_idx``; returns it as int32 ids (see :func:`topk`)."""
    ep_group(comm, op)
    array(op, "topk_idx", topk_idx, 2)
    idx = topk(comm, op, topk_idx, topk_idx.shape[0])
    tokens(comm, op, topk_idx.shape[0])
    return idx


def dispatch(comm, op: str, x, topk_idx, weights):
    """Normal-mode dispatch: ``x`` (an array or the FP8 tuple), ``topk_idx``, ``weights`` (its
    ``topk_weights``);
    returns ``topk_idx`` as int32 ids (see :func:`topk`)."""
    ep_group(comm, op)
    payload = x[0] if isinstance(x, tuple) else x
    if isinstance(x, tuple):
        if len(x) != 2:
            raise TypeError(f"jaxep.{op}: an FP8 x must be the tuple (payload, scales), "
                            f"got {len(x)} elements")
        array(op, "x payload", payload, 2, (jnp.float8_e4m3fn,))
        fp8_hidden(op, payload.shape[1])
        scales = x[1]
        array(op, "x scales", scales, 2, (jnp.float32, jnp.int32))
        g = payload.shape[1] // 128
        want = g if scales.dtype == jnp.float32 else -(-g // 4)
        dim(op, "scales shape", (payload.shape[0], want), tuple(scales.shape))
    else:
        array(op, "x", payload, 2, FLOAT_DTYPES)
    t = payload.shape[0]
    hidden(comm, op, "x", payload.shape[1])
    tokens(comm, op, t)
    idx = topk(comm, op, topk_idx, t)
    topk_weights(op, weights, idx)
    return idx


def dispatch_handle(comm, op: str, handle, handle_cls, capacity):
    """``handle`` is a ``DispatchHandle`` (``handle_cls``) with the shapes of a dispatch of this
    communicator: ``send_slot [T, R]`` (``T <= max_tokens_per_rank``) and ``src_index [C]``,
    C = ``capacity(T)``."""
    instance(op, handle, handle_cls, "handle must be a DispatchHandle (Dispatched.handle)")
    array(op, "handle.src_index", handle.src_index, 1)
    array(op, "handle.send_slot", handle.send_slot, 2)
    t = handle.send_slot.shape[0]
    belongs(comm, op, "this DispatchHandle", "handle.send_slot", (t, comm.num_ranks),
            handle.send_slot.shape, t)
    belongs(comm, op, "this DispatchHandle", "handle.src_index", (capacity(t),),
            handle.src_index.shape)


def grouped_handle(comm, op: str, handle, handle_cls, rows):
    """``handle`` is a ``GroupedHandle`` (``handle_cls``) with the shapes of a
    ``dispatch_grouped`` of this communicator: ``dest_row [T, K]`` (``T <=
    max_tokens_per_rank``), ``src_index [M]`` and float ``weights [M]``, M = ``rows(T)``."""
    instance(op, handle, handle_cls, "handle must be a GroupedHandle (Grouped.handle)")
    array(op, "handle.src_index", handle.src_index, 1)
    array(op, "handle.dest_row", handle.dest_row, 2)
    array(op, "handle.dest_rank", handle.dest_rank, 2)
    array(op, "handle.weights", handle.weights, 1)
    if not jnp.issubdtype(handle.weights.dtype, jnp.floating):
        raise TypeError(f"jaxep.{op}: handle.weights must be floating (float32), "
                        f"got {handle.weights.dtype}")
    t = handle.dest_row.shape[0]
    what = "this GroupedHandle"
    belongs(comm, op, what, "handle.dest_row", (t, comm.cfg.num_topk), handle.dest_row.shape, t)
    belongs(comm, op, what, "handle.dest_rank", handle.dest_row.shape, handle.dest_rank.shape)
    belongs(comm, op, what, "handle.src_index", (rows(t),), handle.src_index.shape)
    belongs(comm, op, what, "handle.weights", (rows(t),), handle.weights.shape)


def ll_dispatch(comm, op: str, x, topk_idx, fp8, round_scale, ue8m0):
    """Low-latency dispatch (one- or two-phase): operands and options; returns ``topk_idx`` as
    int32 ids (see :func:`topk`)."""
    ep_group(comm, op)
    array(op, "x", x, 2, FLOAT_DTYPES)
    hidden(comm, op, "x", x.shape[1])
    tokens(comm, op, x.shape[0])
    if fp8:
        fp8_hidden(op, x.shape[1])
    idx = topk(comm, op, topk_idx, x.shape[0])
    if (round_scale or ue8m0) and not fp8:
        raise ValueError(f"jaxep.{op}: round_scale/ue8m0 need fp8=True")
    if ue8m0 and not round_scale:
        raise ValueError(f"jaxep.{op}: ue8m0=True needs round_scale=True (UE8M0 holds only "
                         f"powers of two)")
    return idx


def copy_engine(comm, op: str, copy_engine: bool):
    """``copy_engine=True`` on the CUDA backend needs the copy-engine buffers (the pure-JAX
    backend ignores the option)."""
    if (copy_engine and comm.implementation("ll_dispatch") == "cuda"
            and not comm.cfg.ll_copy_engine):
        raise ValueError(f"jaxep.{op}: copy_engine=True needs the copy-engine buffers "
                         f"(EPConfig.ll_copy_engine=True)")


def prereduce(op: str, value):
    """The ``prereduce`` option, checked: False, True or ``"float32"`` (returned)."""
    if isinstance(value, str):
        if value != "float32":
            raise ValueError(f"jaxep.{op}: prereduce must be False, True or 'float32', "
                             f"got {value!r}")
        return value
    return bool(value)


def ll_combine(comm, op: str, y, topk_idx, weights, handle, handle_cls):
    """Low-latency combine (one- or two-phase): ``handle`` an ``LLHandle`` (``handle_cls``) of
    this communicator, ``topk_idx``/``weights`` (``topk_weights``) for its T tokens,
    ``y [E_l, R*T, H]``;
    returns ``topk_idx`` as int32 ids (see :func:`topk`)."""
    ep_group(comm, op)
    instance(op, handle, handle_cls, "handle must be an LLHandle (LLDispatched.handle)")
    t = ll_handle(comm, op, handle)
    idx = topk(comm, op, topk_idx, t)
    topk_weights(op, weights, idx)
    array(op, "y", y, 3, FLOAT_DTYPES)
    want = (comm.num_local_experts, comm.num_ranks * t, comm.cfg.hidden)
    dim(op, "y shape [E_l, R*T, H]", want, tuple(y.shape))
    return idx


def ll_handle(comm, op: str, handle) -> int:
    """``handle`` (an ``LLHandle``) has the shapes of an ``ll_dispatch`` of this communicator;
    returns its T."""
    for name in ("src_index", "src_topk", "recv_rows"):
        array(op, f"handle.{name}", getattr(handle, name), 2)
    array(op, "handle.counts", handle.counts, 1)
    r, el = comm.num_ranks, comm.num_local_experts
    t = handle.recv_rows.shape[0] // r
    for name, want in (("recv_rows", (r * t, comm.cfg.num_topk)), ("src_index", (el, r * t)),
                       ("src_topk", (el, r * t)), ("counts", (el,))):
        belongs(comm, op, "this LLHandle", f"handle.{name}", want,
                getattr(handle, name).shape, t)
    return t


def pending(comm, op: str, value, cls, family: str):
    """A receive's ``pending`` must be a ``cls`` of its send; one the CUDA backend sent (its
    ``info`` set) needs a communicator whose ``family`` op runs CUDA."""
    ep_group(comm, op)
    send = op.replace("_recv", "_send")
    instance(op, value, cls, f"expected the {cls.__name__} of {send}")
    _PENDING_SHAPES[family](comm, op, value)
    if value.info is not None and comm.implementation(family) != "cuda":
        raise ValueError(f"jaxep.{op}: this pending transfer was sent by the CUDA backend of "
                         f"another communicator")


def _shape(a) -> tuple:
    """``a.shape``, or ``()`` for None (a field the other backend fills)."""
    return tuple(getattr(a, "shape", ()))


def ll_dispatch_pending(comm, op: str, pending):
    """``pending`` (an ``LLDispatchPending``) has the shapes of an ``ll_dispatch_send`` of this
    communicator."""
    what, cfg = "this LLDispatchPending", comm.cfg
    array(op, "pending.topk_idx", pending.topk_idx, 2)
    t = pending.topk_idx.shape[0]
    belongs(comm, op, what, "pending.topk_idx", (t, cfg.num_topk), _shape(pending.topk_idx), t)
    if pending.info is not None:
        belongs(comm, op, what, "pending.x", (t, cfg.hidden), _shape(pending.x))
        return
    cells = (comm.num_ranks, comm.num_local_experts, t)
    rows = pending.rows[0] if isinstance(pending.rows, tuple) else pending.rows
    belongs(comm, op, what, "pending.recv_topk", cells, _shape(pending.recv_topk))
    belongs(comm, op, what, "pending.rows", cells + (cfg.hidden,), _shape(rows))


def ll_combine_pending(comm, op: str, pending):
    """``pending`` (an ``LLCombinePending``) has the shapes of an ``ll_combine_send`` of this
    communicator."""
    what, cfg = "this LLCombinePending", comm.cfg
    r, el = comm.num_ranks, comm.num_local_experts
    array(op, "pending.topk_idx", pending.topk_idx, 2)
    t = pending.topk_idx.shape[0]
    belongs(comm, op, what, "pending.topk_idx", (t, cfg.num_topk), _shape(pending.topk_idx), t)
    belongs(comm, op, what, "pending.topk_weights", (t, cfg.num_topk),
            _shape(pending.topk_weights))
    if pending.info is not None:
        belongs(comm, op, what, "pending.y", (el, r * t, cfg.hidden), _shape(pending.y))
    else:
        belongs(comm, op, what, "pending.rows", (r, el, t, cfg.hidden), _shape(pending.rows))


# family of the receive -> the check of its pending transfer's shapes
_PENDING_SHAPES = {"ll_dispatch": ll_dispatch_pending, "ll_combine": ll_combine_pending}
