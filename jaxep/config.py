"""Static configuration of an expert-parallel group: :class:`EPConfig`."""

from __future__ import annotations

import dataclasses
from typing import Sequence, Union

Placement = Union[str, tuple[tuple[int, int], ...]]

_NAMED_PLACEMENTS = ("linear", "round_robin")

# The largest timeout_s / failure_exit_s accepted (about 31.7 years): the kernels take timeout_s
# as int64 nanoseconds and time.sleep takes failure_exit_s as int64 nanoseconds, both of which
# end near 9.2e9 s; an "infinite" wait is not available (a hang is what timeout_s prevents).
MAX_WAIT_S = 1e9


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"EPConfig.{name} must be an int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"EPConfig.{name} must be positive, got {value}")
    return value


@dataclasses.dataclass(frozen=True)
class EPConfig:
    """Static description of one expert-parallel (EP) dispatch/combine setup.

    Frozen and hashable, so it can be closed over by jitted functions. Every field is validated
    in ``__post_init__``; what depends on the EP group size R (``num_experts % R``, an explicit
    placement table's ranks) is validated when a :class:`jaxep.Communicator` binds it to a mesh.

    Attributes:
      num_experts: E, the number of global experts.
      num_topk: K, experts selected per token (the last dim of ``topk_idx``).
      hidden: H, the token width (the last dim of ``x``).
      max_tokens_per_rank: T_max, the static per-rank token capacity of one call. A call may pass
        fewer tokens (``x.shape[0] <= max_tokens_per_rank``); more is a trace-time error.
      axis_name: the mesh axis (or tuple of axes) that forms the EP group of size R.
      placement: ``"linear"`` (expert e on rank ``e // E_l``, slot ``e % E_l``),
        ``"round_robin"`` (rank ``e % R``, slot ``e // R``) or an explicit table: a sequence of
        ``(rank, slot)`` pairs, one per global expert, covering every (rank, slot) exactly once.
      recv_capacity: rows each rank can receive in normal mode (C). ``None`` means ``R * T``,
        which never drops. Smaller values drop the excess deterministically (counted in
        ``Dispatched.num_dropped``).
      grouped_capacity: rows M of :func:`jaxep.dispatch_grouped`'s output per rank. ``None``
        means ``R * T * min(K, E_l) + E_l * (expert_alignment - 1)`` (T the call's tokens), which
        never drops. Smaller values admit the received (token, local expert) pairs in (source
        rank, source token, local slot) order while they fit in M rows, alignment padding
        included; the rest are dropped and counted in ``Grouped.num_dropped``.
      expert_alignment: a (int >= 1, default 1): :func:`jaxep.dispatch_grouped` pads each local
        expert's group of rows with zero rows to a multiple of a (as grouped-GEMM kernels such as
        DeepGEMM want); ``Grouped.group_sizes`` include the pad rows.
      num_sms: SM budget of the communication kernels (CUDA backend): one block of 1024 threads
        per SM. ``None`` = tuned default (dispatch: every SM; combine: 32, as more SMs only add
        NVLink contention; benchmarks/RESULTS.md).
      timeout_s: a peer that does not arrive within this many seconds fails the call instead of
        hanging it (CUDA backend). Finite, at most ``jaxep.config.MAX_WAIT_S`` = 1e9 s (the kernels
        take it as int64 nanoseconds). Only jaxep's own waits honour it: those of the CUDA kernels,
        and with one process per GPU the collective creation of a Communicator. On the ``xla``
        backend the ops are XLA collectives, which jaxep cannot bound: across processes
        (``jax.distributed``; measured with 2 processes x 4 CPU devices, gloo) a dead peer makes the
        survivor's call fail with a gloo error naming a socket address, and JAX's coordination
        service then aborts the survivor (SIGABRT) once the dead process has missed its heartbeats
        for the heartbeat timeout, about 100 s by default (``heartbeat_timeout_seconds`` of
        ``jax.distributed.initialize`` shortens it); ``timeout_s`` plays no part there. On the CUDA
        backend with one process per GPU the waiting kernel gives up after ``timeout_s`` instead:
        its error names the waiting rank, the peer and the phase (``Communicator.check()`` raises
        it), and jaxep's failure watch prints it at once and ends the process ``failure_exit_s``
        later if JAX stays blocked (measured on one H200 with ``timeout_s=10``: the survivors exited
        13.6 s + 10 s after their call), well before JAX's heartbeat timeout.
      failure_exit_s: after a kernel of this communicator records such a failure, jaxep prints
        it to stderr at once and ends the process (exit status
        ``jaxep.communicator.FAILURE_EXIT_CODE``) this many seconds later, unless it has exited
        by then: the failed kernel traps, which loses the process's CUDA context, and JAX may
        then wait forever for the lost work (seen in a process-per-GPU rank). ``None`` keeps the
        process running (CUDA backend). Finite, at most ``jaxep.config.MAX_WAIT_S`` = 1e9 s.
      low_latency: allocate the CUDA low-latency buffers (``ll_*`` ops), per GPU about
        ``8 * max_tokens_per_rank * hidden * (R + max(num_topk, R))`` bytes (float32-sized row
        slots, two buffers per direction; ``Communicator.workspace_bytes`` says what was
        allocated). ``None`` (default) allocates them when that is at most 512 MiB, i.e. for
        decoding-sized ``max_tokens_per_rank``; ``False`` never (the ``ll_*`` ops then run the
        pure-JAX path).
      ranks_per_node: where node boundaries fall in the EP group, for one process per GPU
        (``Communicator.transport == "nvshmem"``). ``None`` (default): the hardware's (ranks
        whose GPUs map each other's memory form a node). An int n: ranks r and q are in one
        node when ``r // n == q // n`` (n must divide R), whatever the hardware: "virtual
        nodes", so that peers in another virtual node take the internode (NVSHMEM put) path
        even on one host or one GPU. A group spanning nodes runs the normal-mode ops on the
        hierarchical kernels (each row crosses to another node once, to the rank on its
        sender's rail, whose node pulls it over NVLink; combine sums a node's rows there and
        sends one partial back), the low-latency ops on the internode kernels (see
        ``ll_layered``), and the grouped ops on the pure-JAX path (no internode kernels for them;
        ``Communicator.implementation`` says which runs). Errors of a group spanning nodes name
        the node of the waiting rank and of the peer.
      ll_layered: how the low-latency dispatch reaches another node (with ``ranks_per_node``
        >= 2 and a group spanning nodes). ``False``: flat, each (token, destination rank) row
        is put straight to its rank (DeepEP V1). ``True``: layered, each token goes once per
        destination node, to the node's rank on the sender's rail (the same index in its
        node), which forwards it over NVLink to the destination ranks (DeepEP PR #500): fewer
        RDMA bytes for an NVLink hop, and the destination node's forwarders take part in the
        receive. ``None`` (default): layered, which ``benchmarks/model_internode.py`` predicts
        faster at 2-32 nodes x 8 GPUs for decoding batches (benchmarks/RESULTS.md,
        "Internode"). Both give bit-identical outputs; the combine is flat either way.
      ll_copy_engine: with the low-latency buffers, also allocate those of copy-engine sends
        (``ll_dispatch_send(..., copy_engine=True)``): two more receive buffers and two
        outboxes, ``16 * max_tokens_per_rank * hidden * R`` more bytes per GPU, counted in the
        automatic choice of ``low_latency``.
    """

    num_experts: int
    num_topk: int
    hidden: int
    max_tokens_per_rank: int
    axis_name: Union[str, tuple[str, ...]] = "ep"
    placement: Placement = "linear"
    recv_capacity: int | None = None
    grouped_capacity: int | None = None
    expert_alignment: int = 1
    num_sms: int | None = None
    timeout_s: float = 60.0
    failure_exit_s: float | None = 10.0
    low_latency: bool | None = None
    ll_copy_engine: bool = False
    ranks_per_node: int | None = None
    ll_layered: bool | None = None

    def __post_init__(self):
        for name in ("num_experts", "num_topk", "hidden", "max_tokens_per_rank"):
            _positive_int(name, getattr(self, name))
        if self.num_topk > self.num_experts:
            raise ValueError(
                f"EPConfig.num_topk ({self.num_topk}) must be <= num_experts ({self.num_experts})")
        axis = self.axis_name
        if isinstance(axis, (list, tuple)):
            axis = tuple(axis)
            if not axis or not all(isinstance(a, str) for a in axis):
                raise TypeError(f"EPConfig.axis_name must be a str or a non-empty tuple of str, "
                                f"got {self.axis_name!r}")
            object.__setattr__(self, "axis_name", axis)
        elif not isinstance(axis, str):
            raise TypeError(f"EPConfig.axis_name must be a str or a tuple of str, got {axis!r}")
        object.__setattr__(self, "placement", _normalize_placement(self.placement, self.num_experts))
        if self.recv_capacity is not None:
            _positive_int("recv_capacity", self.recv_capacity)
        if self.grouped_capacity is not None:
            _positive_int("grouped_capacity", self.grouped_capacity)
        _positive_int("expert_alignment", self.expert_alignment)
        if self.num_sms is not None:
            _positive_int("num_sms", self.num_sms)
        if isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, (int, float)):
            raise TypeError(f"EPConfig.timeout_s must be a number, got {self.timeout_s!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"EPConfig.timeout_s must be positive, got {self.timeout_s}")
        if not self.timeout_s <= MAX_WAIT_S:
            raise ValueError(f"EPConfig.timeout_s must be finite, at most {MAX_WAIT_S:.0e} s "
                             f"(the kernels take it as int64 nanoseconds), got {self.timeout_s}")
        if self.failure_exit_s is not None:
            if (isinstance(self.failure_exit_s, bool)
                    or not isinstance(self.failure_exit_s, (int, float))):
                raise TypeError(f"EPConfig.failure_exit_s must be None or a number, got "
                                f"{self.failure_exit_s!r}")
            if not 0 <= self.failure_exit_s <= MAX_WAIT_S:
                raise ValueError(f"EPConfig.failure_exit_s must be None or finite, >= 0 and at "
                                 f"most {MAX_WAIT_S:.0e} s, got {self.failure_exit_s}")
        if self.low_latency is not None and not isinstance(self.low_latency, bool):
            raise TypeError(f"EPConfig.low_latency must be None, True or False, got "
                            f"{self.low_latency!r}")
        if self.ranks_per_node is not None:
            _positive_int("ranks_per_node", self.ranks_per_node)
        if self.ll_layered is not None and not isinstance(self.ll_layered, bool):
            raise TypeError(f"EPConfig.ll_layered must be None, True or False, got "
                            f"{self.ll_layered!r}")
        if not isinstance(self.ll_copy_engine, bool):
            raise TypeError(f"EPConfig.ll_copy_engine must be True or False, got "
                            f"{self.ll_copy_engine!r}")

    @property
    def axis_names(self) -> tuple[str, ...]:
        """``axis_name`` as a tuple."""
        return self.axis_name if isinstance(self.axis_name, tuple) else (self.axis_name,)


def _normalize_placement(placement, num_experts: int) -> Placement:
    if isinstance(placement, str):
        if placement not in _NAMED_PLACEMENTS:
            raise ValueError(f"EPConfig.placement must be one of {_NAMED_PLACEMENTS} or a table of "
                             f"(rank, slot) pairs, got {placement!r}")
        return placement
    try:
        pairs = [tuple(p) for p in _as_pairs(placement)]
    except (TypeError, ValueError) as e:
        raise TypeError(f"EPConfig.placement table must be a sequence of (rank, slot) int pairs, "
                        f"got {placement!r}") from e
    for i, pair in enumerate(pairs):
        if len(pair) != 2 or not all(_is_int(v) for v in pair):
            raise TypeError(f"EPConfig.placement table must be a sequence of (rank, slot) int "
                            f"pairs, but entry {i} is {pair!r}")
    table = tuple((int(r), int(s)) for r, s in pairs)
    if len(table) != num_experts:
        raise ValueError(f"EPConfig.placement table must have num_experts={num_experts} entries, "
                         f"got {len(table)}")
    first = {}
    for e, pair in enumerate(table):
        if pair in first:
            raise ValueError(f"EPConfig.placement table maps experts {first[pair]} and {e} to the "
                             f"same (rank, slot) {pair}")
        first[pair] = e
    for e, (r, s) in enumerate(table):
        if r < 0 or s < 0:
            raise ValueError(f"EPConfig.placement table has a negative rank or slot: entry {e} "
                             f"is {(r, s)}")
    return table


def _is_int(value) -> bool:
    """An int or NumPy integer, not a bool or a float (a float would be truncated)."""
    import numpy as np

    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _as_pairs(placement) -> Sequence:
    import numpy as np  # local: numpy arrays are accepted as tables

    if isinstance(placement, np.ndarray):
        if placement.ndim != 2 or placement.shape[1] != 2:
            raise ValueError(f"table must have shape [E, 2], got {placement.shape}")
        return placement.tolist()
    return list(placement)
