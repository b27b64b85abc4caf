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
