"""CUDA backend: ``jax.ffi.ffi_call`` wrappers for the compiled XLA FFI targets.

The kernels live in ``cuda/`` and their XLA FFI handlers in ``ffi/``; both are compiled into the
optional extension module ``jaxep._jaxep_ext``. That module exposes ``has_cuda()`` and
``registrations()`` (FFI target name -> handler capsule). This file

* imports the extension if it is there: without it (source checkout that was never built, a
  CPU-only build, an import failure) ``available()`` is False and nothing else breaks, so the
  pure-JAX backend (``jaxep._xla``) keeps working;
* registers every compiled target with XLA for the ``CUDA`` platform, once per process
  (``register()``, cached with ``functools.cache``);
* wraps each target in a function meant to be called per device inside ``jax.shard_map``, i.e.
  on the local shard, e.g. ``dispatch_layout``.

Naming chain (grep-able): FFI target ``jaxep_<op>_ffi`` -> handler ``Jaxep<Op>Ffi`` in ``ffi/`` ->
``Launch<Op>`` in ``cuda/``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

try:
    from . import _jaxep_ext as _ext
except ImportError as _e:  # not built, CPU-only wheel, or a broken build
    _ext = None
    _IMPORT_ERROR: ImportError | None = _e
else:
    _IMPORT_ERROR = None

__all__ = ["available", "register", "dispatch_layout"]

DISPATCH_LAYOUT_TARGET = "jaxep_dispatch_layout_ffi"


def available() -> bool:
    """True if the compiled extension is importable and was built with the CUDA kernels."""
    return _ext is not None and bool(_ext.has_cuda())


def unavailable_reason() -> str | None:
    """Why ``available()`` is False (None when it is True)."""
    if _ext is None:
        return f"jaxep._jaxep_ext could not be imported: {_IMPORT_ERROR}"
    if not _ext.has_cuda():
        return "jaxep._jaxep_ext was built without CUDA (no CUDA compiler, or JAXEP_ENABLE_CUDA=OFF)"
    return None


@functools.cache
def register() -> tuple[str, ...]:
    """Registers every compiled FFI target for platform ``CUDA``; runs once per process.

    Returns the registered target names (empty when the extension is missing or CPU-only).
    """
    if _ext is None:
        return ()
    names = []
    for name, capsule in _ext.registrations().items():
        jax.ffi.register_ffi_target(name, capsule, platform="CUDA")
        names.append(name)
    return tuple(names)


def _require() -> None:
    if not available():
        raise RuntimeError(f"jaxep CUDA backend unavailable: {unavailable_reason()}")
    register()


def dispatch_layout(topk_idx, expert_rank, num_ranks: int, num_experts: int):
    """Per-rank dispatch layout of the local tokens (call per device, inside ``shard_map``).

    Args:
      topk_idx: ``[T, K]`` int32 global expert ids; -1 = no expert. Ids outside ``[-1, E)`` are
        treated as -1.
      expert_rank: ``[E]`` int32, the rank holding each global expert.
      num_ranks: R, number of ranks in the EP group (1..64).
      num_experts: E, number of global experts.

    Returns:
      ``(tokens_per_rank [R] int32, tokens_per_expert [E] int32, is_token_in_rank [T, R] bool)``:
      tokens with at least one valid expert on rank r; tokens that selected expert e (a token
      listing e twice counts once); whether token t has a valid expert on rank r.
    """
    _require()
    num_ranks = int(num_ranks)
    num_experts = int(num_experts)
    topk_idx = jnp.asarray(topk_idx)
    expert_rank = jnp.asarray(expert_rank)
    if topk_idx.ndim != 2:
        raise ValueError(f"topk_idx must be [T, K], got shape {topk_idx.shape}")
    if topk_idx.dtype != jnp.int32:
        raise TypeError(f"topk_idx must be int32, got {topk_idx.dtype}")
    if expert_rank.shape != (num_experts,):
        raise ValueError(
            f"expert_rank must have shape ({num_experts},), got {expert_rank.shape}")
    if expert_rank.dtype != jnp.int32:
        raise TypeError(f"expert_rank must be int32, got {expert_rank.dtype}")
    if not 1 <= num_ranks <= 64:
        raise ValueError(f"num_ranks must be in [1, 64], got {num_ranks}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")

    num_tokens = topk_idx.shape[0]
    out_types = (
        jax.ShapeDtypeStruct((num_ranks,), jnp.int32),
        jax.ShapeDtypeStruct((num_experts,), jnp.int32),
        jax.ShapeDtypeStruct((num_tokens, num_ranks), jnp.bool_),
    )
    tokens_per_rank, tokens_per_expert, is_token_in_rank = jax.ffi.ffi_call(
        DISPATCH_LAYOUT_TARGET, out_types, vmap_method="sequential"
    )(topk_idx, expert_rank, num_ranks=np.int32(num_ranks), num_experts=np.int32(num_experts))
    return tokens_per_rank, tokens_per_expert, is_token_in_rank
