"""CUDA kernels: ``jax.ffi.ffi_call`` wrappers for the compiled XLA FFI targets.

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

These are raw kernels: the CUDA backend's ops, with their custom VJPs, are in
``jaxep._cuda_ops``. Naming chain (grep-able; the full table is in docs/design.md, "Naming
chain"): public op -> ``jaxep._cuda_ops.<op>`` -> function here -> FFI target
``jaxep_<op>_ffi`` -> handler ``Jaxep<Op>Ffi`` in ``ffi/`` -> ``Launch<Op>`` in ``cuda/``.
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


def _varying_axes(x) -> frozenset:
    t = jax.typeof(x)
    vma = getattr(t, "vma", None)  # newer jax
    if vma is None:
        mat = getattr(t, "mat", None)  # jax 0.10
        vma = getattr(mat, "varying", frozenset()) if mat is not None else frozenset()
    return frozenset(vma)


def _varying(x, axes):
    """``x`` typed as varying over ``axes`` inside shard_map (a type cast, no data movement)."""
    missing = tuple(a for a in axes if a not in _varying_axes(x))
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def _vma_checked(axes) -> bool:
    """Whether ``axes`` are bound manual (shard_map) axes with varying-axes checking on."""
    try:
        jax.lax.axis_size(axes[0] if len(axes) == 1 else tuple(axes))
    except NameError:  # not inside a shard_map binding them
        return False
    try:
        probe = jax.lax.pcast(jnp.zeros((), jnp.int32), tuple(axes), to="varying")
    except Exception:  # noqa: BLE001 -- a capability probe: no varying-axes typing here
        return False
    return bool(_varying_axes(probe))


def _ffi(target, out_types, args, axes=(), **attrs):
    """``ffi_call`` of ``target`` on this device's shards.

    ffi_call outputs carry no varying manual axes and its inputs must agree on theirs, so inside
    ``shard_map`` every input and output is typed as varying over the union of the inputs'
    varying axes and ``axes`` (the EP axes: every rank's result differs). Outside shard_map, or
    with ``check_vma=False``, this is a plain ffi_call.
    """
    vary = set()
    if axes and _vma_checked(tuple(axes)):
        vary = set(axes).union(*(_varying_axes(a) for a in args))
    vary = tuple(sorted(vary, key=str))
    outs = jax.ffi.ffi_call(target, out_types, vmap_method="sequential")(
        *(_varying(a, vary) for a in args), **attrs)
    return jax.tree.map(lambda o: _varying(o, vary), outs)


def dispatch_layout(topk_idx, expert_rank, num_ranks: int, num_experts: int, axes=()):
    """Per-rank dispatch layout of the local tokens (call per device, inside ``shard_map``).

    Args:
      topk_idx: ``[T, K]`` int32 global expert ids; -1 = no expert. Ids outside ``[-1, E)`` are
        treated as -1.
      expert_rank: ``[E]`` int32, the rank holding each global expert.
      num_ranks: R, number of ranks in the EP group (1..64).
      num_experts: E, number of global experts.
      axes: the EP mesh axes (outputs are typed as varying over them inside shard_map).

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
    return _ffi(DISPATCH_LAYOUT_TARGET, out_types, (topk_idx, expert_rank), axes,
                num_ranks=np.int32(num_ranks), num_experts=np.int32(num_experts))


# ---- intranode normal mode (one process, several GPUs) ------------------------------------


DISPATCH_TARGET = "jaxep_dispatch_ffi"
COMBINE_TARGET = "jaxep_combine_ffi"
DISPATCH_ROWS_TARGET = "jaxep_dispatch_rows_ffi"
# The kernels' limits, from the extension (0 without the CUDA build: nothing runs there).
_LIMITS = dict(_ext.limits()) if available() else {}
LAYOUT_MAX_RANKS = int(_LIMITS.get("layout_max_ranks", 0))
LAYOUT_MAX_EXPERTS = int(_LIMITS.get("layout_max_experts", 0))
MAX_RANKS = int(_LIMITS.get("max_ranks", 0))
MAX_TOPK = int(_LIMITS.get("max_topk", 0))
MAX_EXPERTS = int(_LIMITS.get("max_experts", 0))
GROUPED_MAX_LOCAL_EXPERTS = int(_LIMITS.get("grouped_max_local_experts", 0))


def intranode_create(groups, max_tokens: int, *, low_latency: bool = False, num_topk: int = 0,
                     num_local_experts: int = 0, hidden: int = 0,
                     copy_engine: bool = False) -> tuple[int, int]:
    """Allocate the workspaces of a communicator (and its low-latency buffers when
    ``low_latency``, with those of copy-engine sends when ``copy_engine``):
    ``(id, bytes per device)``."""
    _require()
    comm_id, nbytes = _ext.intranode_create(
        [list(map(int, g)) for g in groups], int(max_tokens), bool(low_latency), int(num_topk),
        int(num_local_experts), int(hidden), bool(copy_engine))
    return int(comm_id), int(nbytes)


def process_region_bytes(num_ranks, max_tokens, capacity, *, low_latency, num_topk,
                         num_local_experts, hidden, ranks_per_node=0, layered=False) -> int:
    """Bytes of one rank's symmetric region (one process per GPU); the same on every rank.
    ``ranks_per_node`` in (0, R): the group spans nodes (the low-latency puts' staging area and
    the normal-mode relay are included); ``layered``: with the layered dispatch's relays (as
    ``process_create`` takes them)."""
    _require()
    return int(_ext.process_region_bytes(int(num_ranks), int(max_tokens), int(capacity),
                                         bool(low_latency), int(num_topk),
                                         int(num_local_experts), int(hidden),
                                         int(ranks_per_node), bool(layered)))


def process_create(device, rank, bases, max_tokens, capacity, *, low_latency, num_topk,
                   num_local_experts, hidden, ranks_per_node=0, pes=(),
                   layered=False) -> tuple[int, int]:
    """Registers this process's rank of an EP group spanning processes, in the symmetric regions
    ``bases`` (rank p's as this process addresses it; 0 for a rank in another node):
    ``(id, bytes per rank)``. ``ranks_per_node`` in (0, R): the group spans nodes, rank p is
    NVSHMEM PE ``pes[p]`` (the extension initialises NVSHMEM's device state for its kernels);
    ``layered``: the low-latency dispatch sends once per node through forwarders."""
    _require()
    comm_id, nbytes = _ext.process_create(int(device), int(rank), [int(b) for b in bases],
                                          int(max_tokens), int(capacity), bool(low_latency),
                                          int(num_topk), int(num_local_experts), int(hidden),
                                          int(ranks_per_node), [int(p) for p in pes],
                                          bool(layered))
    return int(comm_id), int(nbytes)


def nvshmem_device_linked() -> bool:
    """Whether the kernels were built with NVSHMEM's device library (the internode paths)."""
    return available() and bool(_ext.nvshmem_device_linked())


def intranode_release(comm_id: int) -> None:
    """Retire a communicator's workspaces: later calls fail with a clear error. The memory (a few
    KB per device) stays allocated until the process exits, so a compiled program replayed from
    a CUDA graph never touches freed memory."""
    if available():
        _ext.intranode_release(comm_id)


def intranode_error(comm_id: int) -> str:
    """A recorded kernel failure (barrier timeout: rank, peer, phase), or ''."""
    return _ext.intranode_error(comm_id) if available() else ""


def first_error() -> tuple[int, str]:
    """(communicator id, message) of the first recorded kernel failure of any live
    communicator of this process, or (0, '')."""
    if not available():
        return 0, ""
    comm_id, msg = _ext.first_error()
    return int(comm_id), str(msg)


def ll_copy_engine_sends(comm) -> list[int]:
    """Per device of ``comm``'s mesh: copy-engine dispatch sends enqueued so far (-1: no buffers)."""
    return [int(_ext.ll_copy_engine_sends(comm.comm_id, d)) for g in comm.ep_groups() for d in g]


def _ep_call(comm, target, out_types, *args, **attrs):
    """An intranode op on this rank's shards (the communicator's id and limits as attributes,
    then the op's own ``attrs``)."""
    return _ffi(target, out_types, args, comm.cfg.axis_names, comm_id=np.int64(comm.comm_id),
                num_sms=np.int32(comm.cfg.num_sms or 0),
                timeout_ns=np.int64(int(comm.cfg.timeout_s * 1e9)), **attrs)


def dispatch(comm, x, topk_idx, topk_weights, capacity: int) -> dict:
    """Normal-mode dispatch kernel; same fields as ``jaxep._xla.dispatch``."""
    t, k = topk_idx.shape
    payload, scales = x if isinstance(x, tuple) else (x, jnp.zeros((t, 0), jnp.float32))
    sds = jax.ShapeDtypeStruct
    i32 = jnp.int32
    out_types = (
        sds((capacity,) + payload.shape[1:], payload.dtype),
        sds((capacity,) + scales.shape[1:], scales.dtype),
        sds((capacity, k), i32), sds((capacity, k), jnp.float32), sds((capacity,), i32),
        sds((t, comm.num_ranks), i32), sds((comm.num_local_experts,), i32), sds((3,), i32))
    (recv_x, recv_s, recv_idx, recv_w, src_index, send_slot, per_expert,
     meta) = _ep_call(comm, DISPATCH_TARGET, out_types, payload, scales, topk_idx,
                      topk_weights.astype(jnp.float32), jnp.asarray(comm.expert_rank),
                      jnp.asarray(comm.expert_slot))
    return dict(x=(recv_x, recv_s) if isinstance(x, tuple) else recv_x, topk_idx=recv_idx,
                topk_weights=recv_w.astype(topk_weights.dtype), num_tokens=meta[0],
                tokens_per_expert=per_expert, num_dropped=meta[1], num_invalid=meta[2],
                src_index=src_index, send_slot=send_slot)


def combine_rows(comm, rows, send_slot):
    """``out[t] = sum_r rows_r[send_slot[t, r]]`` (float32 accumulation), bf16 or f32 rows."""
    t = send_slot.shape[0]
    out = jax.ShapeDtypeStruct((t,) + rows.shape[1:], rows.dtype)
    return _ep_call(comm, COMBINE_TARGET, out, rows, send_slot)


def dispatch_rows(comm, rows, src_index, send_slot=None):
    """``out[c] = rows_src[src_index[c]]`` (zeros where -1): dispatch along a cached handle.
    ``send_slot [T, R]`` (the handle's): which ranks receive which rows, which the internode
    kernels need to send each row once per node; None within one node."""
    out = jax.ShapeDtypeStruct(src_index.shape + rows.shape[1:], rows.dtype)
    if send_slot is None:
        if comm._internode:
            raise ValueError("dispatch_rows across nodes needs the handle's send_slot")
        send_slot = jnp.zeros((0, comm.num_ranks), jnp.int32)
    return _ep_call(comm, DISPATCH_ROWS_TARGET, out, rows, src_index, send_slot)


# ---- expert-grouped normal mode ----------------------------------------------------------

DISPATCH_GROUPED_TARGET = "jaxep_dispatch_grouped_ffi"
COMBINE_GROUPED_TARGET = "jaxep_combine_grouped_ffi"
GROUPED_ENTRIES_TARGET = "jaxep_grouped_entries_ffi"


def dispatch_grouped(comm, x, topk_idx, topk_weights, rows: int, *, zero_padding: bool) -> dict:
    """Grouped dispatch kernel into ``rows`` (M) rows: the fields of ``jaxep.Grouped`` by name
    (``x``, ``group_sizes``, ``weights``, ``num_dropped``, ``num_invalid``) and the handle's
    ``src_index``, ``dest_row``, ``dest_rank``."""
    t, k = topk_idx.shape
    payload, scales = x if isinstance(x, tuple) else (x, jnp.zeros((t, 0), jnp.float32))
    sds = jax.ShapeDtypeStruct
    i32 = jnp.int32
    out_types = (
        sds((rows,) + payload.shape[1:], payload.dtype), sds((rows,) + scales.shape[1:], scales.dtype),
        sds((comm.num_local_experts,), i32), sds((rows,), jnp.float32), sds((rows,), i32),
        sds((t, k), i32), sds((t, k), i32), sds((2,), i32))
    gx, gs, sizes, weights, src_index, dest_row, dest_rank, meta = _ep_call(
        comm, DISPATCH_GROUPED_TARGET, out_types, payload, scales, topk_idx,
        topk_weights.astype(jnp.float32), jnp.asarray(comm.expert_rank),
        jnp.asarray(comm.expert_slot), alignment=np.int32(comm.cfg.expert_alignment),
        zero_padding=bool(zero_padding))
    return dict(x=(gx, gs) if isinstance(x, tuple) else gx, group_sizes=sizes, weights=weights,
                num_dropped=meta[0], num_invalid=meta[1], src_index=src_index,
                dest_row=dest_row, dest_rank=dest_rank)


def combine_grouped(comm, y, weights, dest_row, dest_rank, *, weighted: bool):
    """``out[t] = sum over t's rows on every rank of weights[row] * y[row]`` (1 for each row
    without ``weighted``), float32 accumulation, bf16 or f32 ``y``: ``[T, H]``."""
    out = jax.ShapeDtypeStruct((dest_row.shape[0],) + y.shape[1:], y.dtype)
    return _ep_call(comm, COMBINE_GROUPED_TARGET, out, y, weights.astype(jnp.float32), dest_row,
                    dest_rank, weighted=bool(weighted))


def grouped_entries(comm, vals, dest_row, dest_rank):
    """``out[t, k] = vals_r[dest_row[t, k]]`` on rank ``r = dest_rank[t, k]`` (0 where -1):
    each top-k entry's value of its grouped row, ``[T, K]`` float32."""
    out = jax.ShapeDtypeStruct(dest_row.shape, jnp.float32)
    return _ep_call(comm, GROUPED_ENTRIES_TARGET, out, vals.astype(jnp.float32), dest_row,
                    dest_rank)


# ---- low-latency mode (one process, several GPUs) -----------------------------------------

LL_DISPATCH_SEND_TARGET = "jaxep_ll_dispatch_send_ffi"
LL_DISPATCH_SEND_CE_TARGET = "jaxep_ll_dispatch_send_ce_ffi"  # copy engines; not in CUDA graphs
LL_DISPATCH_RECV_TARGET = "jaxep_ll_dispatch_recv_ffi"
LL_DISPATCH_TARGET = "jaxep_ll_dispatch_ffi"  # both phases in one kernel
LL_COMBINE_SEND_TARGET = "jaxep_ll_combine_send_ffi"
LL_COMBINE_SEND_REDUCED_TARGET = "jaxep_ll_combine_send_reduced_ffi"
LL_COMBINE_RECV_TARGET = "jaxep_ll_combine_recv_ffi"
LL_COMBINE_TARGET = "jaxep_ll_combine_ffi"  # both phases in one kernel
LL_MAX_TOPK = int(_LIMITS.get("ll_max_topk", 0))


def ll_workspace_bytes(num_ranks, max_tokens, num_topk, num_local_experts, hidden, *,
                       copy_engine=False, rdma=False, relay_ranks=0) -> int:
    """Bytes per device of the low-latency buffers for these sizes; ``rdma``: an EP group
    across nodes (the puts' staging area), ``relay_ranks`` > 0: the layered dispatch's relays
    for nodes of that many ranks."""
    return int(_ext.ll_workspace_bytes(num_ranks, max_tokens, num_topk, num_local_experts, hidden,
                                       bool(copy_engine), bool(rdma), int(relay_ranks)))


def ll_supported(num_ranks, max_tokens, num_topk, num_experts, hidden) -> bool:
    """Whether the low-latency kernels handle these sizes (shared memory, K, hidden % 16)."""
    if not available() or num_topk > LL_MAX_TOPK or hidden % 16 or num_ranks > MAX_RANKS:
        return False
    need, limit = _ext.ll_shared_bytes(num_ranks, max_tokens, num_topk, num_experts)
    return need <= limit


def _ll_call(comm, target, out_types, *args, **attrs):
    # The kernels are never differentiated directly (jaxep._cuda_ops gives custom VJPs);
    # stop_gradient keeps integer handles out of JAX's JVP of ffi_call.
    args = tuple(jax.lax.stop_gradient(a) for a in args)
    return _ffi(target, out_types, args, comm.cfg.axis_names, comm_id=np.int64(comm.comm_id),
                num_sms=np.int32(comm.cfg.num_sms or 0),
                timeout_ns=np.int64(int(comm.cfg.timeout_s * 1e9)), **attrs)


def ll_dispatch_send(comm, x, topk_idx, weights=None, *, fp8=False, round_scale=False,
                     copy_engine=False):
    """Send phase: writes ``x [T, H]`` (quantised with ``fp8``) into the destinations' buffers.

    ``weights [T, K]`` (optional) travel with the rows and scale them on receipt (the gradient
    of ``ll_combine``). ``copy_engine``: the kernel packs the rows locally and copy engines
    move them (outside CUDA-graph capture). Returns ``info [4]`` int32 (num_invalid, the
    call's number at its buffer low/high, buffer) for the recv.
    """
    w = jnp.zeros((0,), jnp.float32) if weights is None else weights.astype(jnp.float32)
    target = LL_DISPATCH_SEND_CE_TARGET if copy_engine else LL_DISPATCH_SEND_TARGET
    return _ll_call(comm, target, jax.ShapeDtypeStruct((4,), jnp.int32), x,
                    topk_idx, w, jnp.asarray(comm.expert_rank), jnp.asarray(comm.expert_slot),
                    fp8=bool(fp8), round_scale=bool(round_scale), copy_engine=bool(copy_engine))


def _ll_received_types(comm, num_tokens, dtype, fp8, ue8m0):
    """Result types of a dispatch recv: x, scales (empty without fp8), counts, src_index,
    src_topk, recv_rows, num_invalid."""
    el, rt, h = comm.num_local_experts, comm.num_ranks * num_tokens, comm.cfg.hidden
    sds = jax.ShapeDtypeStruct
    if fp8:
        x_t = sds((el, rt, h), jnp.float8_e4m3fn)
        g = h // 128
        s_t = sds((el, rt, -(-g // 4)), jnp.int32) if ue8m0 else sds((el, rt, g), jnp.float32)
    else:
        x_t = sds((el, rt, h), dtype)
        s_t = sds((el, rt, 0), jnp.float32)
    i32 = jnp.int32
    return (x_t, s_t, sds((el,), i32), sds((el, rt), i32), sds((el, rt), i32),
            sds((rt, comm.cfg.num_topk), i32), sds((), i32))


def _ll_received(out, fp8):
    x, scales, counts, src_index, src_topk, recv_rows, num_invalid = out
    return x, (scales if fp8 else None), counts, src_index, src_topk, recv_rows, num_invalid


def ll_dispatch_recv(comm, info, num_tokens, dtype, *, fp8=False, ue8m0=False,
                     zero_padding=True, weighted=False):
    """Receive phase: ``(x, scales or None, counts, src_index, src_topk, recv_rows,
    num_invalid)``."""
    out = _ll_call(comm, LL_DISPATCH_RECV_TARGET,
                   _ll_received_types(comm, num_tokens, dtype, fp8, ue8m0), info,
                   ue8m0=bool(ue8m0), zero_padding=bool(zero_padding), weighted=bool(weighted))
    return _ll_received(out, fp8)


def ll_dispatch(comm, x, topk_idx, *, fp8=False, round_scale=False, ue8m0=False,
                zero_padding=True):
    """Both phases in one kernel (an SM send, then its receive in the same blocks); the
    results of :func:`ll_dispatch_recv`."""
    out = _ll_call(comm, LL_DISPATCH_TARGET,
                   _ll_received_types(comm, x.shape[0], x.dtype, fp8, ue8m0), x, topk_idx,
                   jnp.asarray(comm.expert_rank), jnp.asarray(comm.expert_slot), fp8=bool(fp8),
                   round_scale=bool(round_scale), ue8m0=bool(ue8m0),
                   zero_padding=bool(zero_padding))
    return _ll_received(out, fp8)


def ll_combine_send(comm, y, src_index, src_topk, counts):
    """Send phase of combine: writes each valid row of ``y [E_l, R*T, H]`` to its source."""
    return _ll_call(comm, LL_COMBINE_SEND_TARGET, jax.ShapeDtypeStruct((2,), jnp.int32), y,
                    src_index, src_topk, counts)


def _prereduce_attr(prereduce) -> np.int32:
    """The LL combine targets' ``prereduce`` attribute (``ffi/attrs.h``, ``Prereduce``) of the
    public ``prereduce`` option: 0 = False (rows per entry), 1 = True (partial sums in y's dtype),
    2 = ``"float32"`` (float32 partial sums)."""
    return np.int32(2 if prereduce == "float32" else 1 if prereduce else 0)


def ll_combine_send_reduced(comm, y, recv_rows, topk_idx, weights, *, prereduce=True):
    """Send phase of the pre-reduced combine: exchanges the top-k ``weights [T, K]``, then sends
    per source token the float32 sum of its weighted rows of ``y`` held here, in y's dtype
    (``prereduce=True``) or float32 (``"float32"``); a token's single row here as it is."""
    return _ll_call(comm, LL_COMBINE_SEND_REDUCED_TARGET, jax.ShapeDtypeStruct((2,), jnp.int32),
                    y, recv_rows, topk_idx, weights.astype(jnp.float32),
                    prereduce=_prereduce_attr(prereduce))


def _ll_combined_types(comm, topk_idx, dtype, want_rows):
    t, k = topk_idx.shape
    h = comm.cfg.hidden
    sds = jax.ShapeDtypeStruct
    return sds((t, h), dtype), sds((t, k, h), dtype) if want_rows else sds((0,), dtype)


def ll_combine_recv(comm, info, topk_idx, weights, dtype, *, want_rows=False, prereduce=False):
    """Receive phase of combine: ``(out [T, H], rows [T, K, H] or None)``. ``prereduce``: the
    send's (False, True or ``"float32"``; no per-entry rows when pre-reduced)."""
    out, rows = _ll_call(comm, LL_COMBINE_RECV_TARGET,
                         _ll_combined_types(comm, topk_idx, dtype, want_rows), info,
                         topk_idx, weights.astype(jnp.float32), jnp.asarray(comm.expert_rank),
                         prereduce=_prereduce_attr(prereduce))
    return out, (rows if want_rows else None)


def ll_combine(comm, y, src_index, src_topk, counts, recv_rows, topk_idx, weights, *,
               want_rows=False, prereduce=False):
    """Both phases of combine in one kernel (the send, then its receive in the same blocks):
    ``(out [T, H], rows [T, K, H] or None)``, as :func:`ll_combine_recv`. The handle's arrays
    all pass; ``prereduce`` (False, True or ``"float32"``) picks the send (pre-reduced, it reads
    ``recv_rows``, else the other three)."""
    out, rows = _ll_call(comm, LL_COMBINE_TARGET,
                         _ll_combined_types(comm, topk_idx, y.dtype, want_rows), y, src_index,
                         src_topk, counts, recv_rows, topk_idx, weights.astype(jnp.float32),
                         jnp.asarray(comm.expert_rank), prereduce=_prereduce_attr(prereduce))
    return out, (rows if want_rows else None)
