"""Trace-time validation shared by the public ops: clear ValueError/TypeError messages."""

from __future__ import annotations

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
            f"{comm.cfg.axis_name!r} (expected axis size R={comm.num_ranks}); no such axis is "
            f"bound here") from None
    if size != comm.num_ranks:
        raise ValueError(f"jaxep.{op}: EP axis {comm.cfg.axis_name!r} has size {size} here, but "
                         f"the Communicator was built for R={comm.num_ranks}")
    return size


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


def topk(comm, op: str, topk_idx, num_tokens: int, topk_weights=None):
    array(op, "topk_idx", topk_idx, 2)
    if not jnp.issubdtype(topk_idx.dtype, jnp.integer):
        raise TypeError(f"jaxep.{op}: topk_idx must be an integer array (int32), "
                        f"got {topk_idx.dtype}")
    dim(op, "topk_idx.shape[0] (tokens)", num_tokens, topk_idx.shape[0])
    dim(op, "topk_idx.shape[-1] (EPConfig.num_topk)", comm.cfg.num_topk, topk_idx.shape[1])
    if topk_weights is not None:
        array(op, "topk_weights", topk_weights, 2)
        if not jnp.issubdtype(topk_weights.dtype, jnp.floating):
            raise TypeError(f"jaxep.{op}: topk_weights must be floating (float32), "
                            f"got {topk_weights.dtype}")
        if topk_weights.shape != topk_idx.shape:
            raise ValueError(f"jaxep.{op}: topk_weights shape {tuple(topk_weights.shape)} must "
                             f"equal topk_idx shape {tuple(topk_idx.shape)}")


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


def dispatch(comm, op: str, x, topk_idx, topk_weights):
    """Normal-mode dispatch: ``x`` (an array or the FP8 tuple), ``topk_idx``, ``topk_weights``."""
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
    topk(comm, op, topk_idx, t, topk_weights)


def ll_dispatch(comm, op: str, x, topk_idx, fp8, round_scale, ue8m0):
    """Low-latency dispatch (one- or two-phase): operands and options."""
    ep_group(comm, op)
    array(op, "x", x, 2, FLOAT_DTYPES)
    hidden(comm, op, "x", x.shape[1])
    tokens(comm, op, x.shape[0])
    if fp8:
        fp8_hidden(op, x.shape[1])
    topk(comm, op, topk_idx, x.shape[0])
    if (round_scale or ue8m0) and not fp8:
        raise ValueError(f"jaxep.{op}: round_scale/ue8m0 need fp8=True")
    if ue8m0 and not round_scale:
        raise ValueError(f"jaxep.{op}: ue8m0=True needs round_scale=True (UE8M0 holds only "
                         f"powers of two)")


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


def ll_combine(comm, op: str, y, topk_idx, topk_weights, handle, handle_cls):
    """Low-latency combine (one- or two-phase): ``handle`` an ``LLHandle`` (``handle_cls``),
    ``topk_idx``/``topk_weights`` for its T tokens, ``y [E_l, R*T, H]``."""
    ep_group(comm, op)
    instance(op, handle, handle_cls, "handle must be an LLHandle (LLDispatched.handle)")
    rt = handle.src_index.shape[1]
    t = rt // comm.num_ranks
    topk(comm, op, topk_idx, t, topk_weights)
    array(op, "y", y, 3, FLOAT_DTYPES)
    want = (comm.num_local_experts, rt, comm.cfg.hidden)
    dim(op, "y shape [E_l, R*T, H]", want, tuple(y.shape))


def pending(comm, op: str, value, cls, family: str):
    """A receive's ``pending`` must be a ``cls`` of its send; one the CUDA backend sent (its
    ``info`` set) needs a communicator whose ``family`` op runs CUDA."""
    ep_group(comm, op)
    send = op.replace("_recv", "_send")
    instance(op, value, cls, f"expected the {cls.__name__} of {send}")
    if value.info is not None and comm.implementation(family) != "cuda":
        raise ValueError(f"jaxep.{op}: this pending transfer was sent by the CUDA backend of "
                         f"another communicator")
