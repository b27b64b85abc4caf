"""Binding of an :class:`EPConfig` to a device mesh: :class:`Communicator`."""

from __future__ import annotations

import math
import os
import sys
import threading
import time
import weakref

import jax
import numpy as np

from jaxep import _cuda
from jaxep.config import EPConfig

BACKENDS = ("auto", "cuda", "xla")

# Which public ops have a CUDA kernel today. Ops not listed run the pure-JAX implementation even
# with backend="cuda" (``Communicator.implementation`` says which one runs; the README's status
# table says the same). Normal-mode dispatch/combine need a transport (``choose_transport``),
# EP groups of at most 8 GPUs, K <= 32, E <= 8192.
CUDA_OPS = frozenset({"dispatch_layout"})
INTRANODE_OPS = frozenset({"dispatch", "combine"})
# The low-latency ops need the intranode transport plus the low-latency buffers
# (EPConfig.low_latency), hidden % 16 == 0 and routing tables that fit in shared memory.
LL_OPS = frozenset({"ll_dispatch", "ll_combine"})
LL_AUTO_MAX_BYTES = 512 << 20
# The grouped ops need the intranode transport and at most 512 local experts (the layout's
# per-expert tables live in shared memory).
GROUPED_OPS = frozenset({"dispatch_grouped", "combine_grouped"})
ALL_OPS = ("dispatch_layout", "dispatch", "combine", "ll_dispatch", "ll_combine",
           "dispatch_grouped", "combine_grouped")
FAILURE_EXIT_CODE = 75  # the process's exit status when jaxep ends it (EPConfig.failure_exit_s)


class Communicator:
    """An expert-parallel group: a mesh, an :class:`EPConfig` and a backend.

    Args:
      mesh: a ``jax.sharding.Mesh`` containing the axis (or axes) ``cfg.axis_name``; the EP group
        size R is the product of their sizes.
      cfg: the static configuration.
      backend: ``"xla"`` (pure JAX, any platform), ``"cuda"`` (the compiled kernels; requires the
        extension built with CUDA and GPU devices) or ``"auto"`` (``"cuda"`` when both hold,
        ``"xla"`` otherwise).

    The communicator is used by the ops *inside* ``jax.shard_map`` over ``mesh``; it holds no
    per-call state. ``close()`` (or leaving a ``with`` block) releases backend resources.

    Process models (``transport``, decided per EP group by :func:`choose_transport`):
    ``"process"`` when each EP group lies inside one process (peer access between its GPUs);
    ``"nvshmem"`` when the groups span processes that drive one GPU each (``jax.distributed``,
    one process per GPU): then creating a Communicator is a collective step, every process must
    create the same ones in the same order (checked: a difference or an absent process is an
    error within ``cfg.timeout_s``), and it needs nvshmem4py (``pip install 'jaxep[cuda]'``);
    None when the pure-JAX path communicates (``transport_reason`` says why). Under
    ``backend="cuda"`` a mesh no transport serves (EP across processes that drive several GPUs
    each) is a ``ValueError``; under ``"auto"`` it runs the pure-JAX path.
    """

    def __init__(self, mesh: jax.sharding.Mesh, cfg: EPConfig, backend: str = "auto"):
        if not isinstance(mesh, jax.sharding.Mesh):
            hint = (" (a list of devices: wrap it, e.g. jax.sharding.Mesh(np.array(devices), "
                    "('ep',)))" if isinstance(mesh, (list, tuple)) else "")
            raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}{hint}")
        if not isinstance(cfg, EPConfig):
            raise TypeError(f"cfg must be a jaxep.EPConfig, got {type(cfg).__name__}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        missing = [a for a in cfg.axis_names if a not in mesh.shape]
        if missing:
            raise ValueError(f"EPConfig.axis_name {cfg.axis_name!r}: axis {missing} not in the mesh "
                             f"axes {tuple(mesh.axis_names)}")
        self.mesh = mesh
        self.cfg = cfg
        self.num_ranks = math.prod(mesh.shape[a] for a in cfg.axis_names)
        if cfg.num_experts % self.num_ranks:
            raise ValueError(f"num_experts ({cfg.num_experts}) must be divisible by the EP group "
                             f"size R={self.num_ranks} (mesh axes {cfg.axis_names})")
        self.num_local_experts = cfg.num_experts // self.num_ranks
        if cfg.ranks_per_node is not None and self.num_ranks % min(cfg.ranks_per_node,
                                                                   self.num_ranks):
            raise ValueError(f"EPConfig.ranks_per_node ({cfg.ranks_per_node}) must divide the EP "
                             f"group size R={self.num_ranks}")
        # Ranks per node of the EP group (ranks r, q share a node when r // n == q // n): the
        # config's, else the hardware's once the process-per-GPU transport has looked.
        self.ranks_per_node = min(cfg.ranks_per_node or self.num_ranks, self.num_ranks)
        # Whether the low-latency dispatch to other nodes is layered (EPConfig.ll_layered), as
        # the internode kernels run it; False within one node.
        self.ll_layered = False
        self.expert_rank, self.expert_slot = _placement_tables(cfg, self.num_ranks)
        # global_expert[r, s]: the global expert held by rank r in local slot s.
        self.global_expert = np.empty((self.num_ranks, self.num_local_experts), np.int32)
        self.global_expert[self.expert_rank, self.expert_slot] = np.arange(cfg.num_experts)
        self.backend = _resolve_backend(backend, mesh)
        self.comm_id = None  # the CUDA registry's id of this communicator's workspaces
        self.workspace_bytes = 0  # per device, allocated outside XLA's allocator
        # "process" (the EP group inside one process), "nvshmem" (one process per GPU) or None
        # (the pure-JAX path runs the communication).
        self.transport = None
        self.transport_reason = "backend='xla'" if self.backend == "xla" else ""
        self._intranode = False
        self._internode = False  # the group spans nodes: the grouped kernels do not serve it
        self._low_latency = False
        self._closed = False
        if self.backend == "cuda":
            _cuda.register()
            self._create_transport(explicit=backend == "cuda")

    def _create_transport(self, explicit: bool) -> None:
        cfg = self.cfg
        groups = self._ep_group_devices()
        transport, reason = choose_transport(
            [[d.process_index for d in g] for g in groups],
            [d.process_index for d in self.mesh.devices.flat], jax.process_count())
        self.transport_reason = reason
        if transport is None:
            if explicit:
                raise ValueError(f"backend='cuda': {reason}")
            return
        if not self._kernels_supported():
            self.transport_reason = (f"EP group of R={self.num_ranks} ranks, K={cfg.num_topk}, "
                                     f"E={cfg.num_experts}: beyond the CUDA kernels' limits "
                                     f"(R <= {_cuda.MAX_RANKS}, K <= {_cuda.MAX_TOPK}, "
                                     f"E <= {_cuda.MAX_EXPERTS})")
            return
        me = jax.process_index()
        if transport == "process" and self.ranks_per_node < self.num_ranks:
            self.transport_reason = (
                f"EPConfig.ranks_per_node={cfg.ranks_per_node} splits the EP group into nodes, "
                "which the internode kernels reach as NVSHMEM PEs: that needs one process per "
                "GPU, and this EP group is inside one process")
            if explicit:
                raise ValueError(f"backend='cuda': {self.transport_reason}")
            return
        if transport == "process":
            ll = self._ll_wanted(cfg.ll_copy_engine)
            mine = [[d.local_hardware_id for d in g] for g in groups
                    if g[0].process_index == me]
            self.comm_id, self.workspace_bytes = _cuda.intranode_create(
                mine, cfg.max_tokens_per_rank, low_latency=ll, num_topk=cfg.num_topk,
                num_local_experts=self.num_local_experts, hidden=cfg.hidden,
                copy_engine=ll and cfg.ll_copy_engine)
        else:
            if cfg.ll_copy_engine:
                raise ValueError("EPConfig.ll_copy_engine: copy-engine low-latency sends are "
                                 "not available with one process per GPU; leave it False")
            from jaxep import _nvshmem

            group = next(g for g in groups if any(d.process_index == me for d in g))
            rank = next(i for i, d in enumerate(group) if d.process_index == me)
            ll = self._ll_wanted(False)
            made = _nvshmem.create_region(
                self, rank, group[rank].local_hardware_id, [d.process_index for d in group],
                cfg.recv_capacity or self.num_ranks * cfg.max_tokens_per_rank, ll)
            if made[0] is None:
                self.transport_reason = made[1]
                if explicit:
                    raise ValueError(f"backend='cuda': {made[1]}")
                return
            self.comm_id, self.workspace_bytes, self.ranks_per_node, self.ll_layered = made
            if self.ranks_per_node < self.num_ranks:
                self._internode = True
                self.transport_reason = (
                    f"EP groups span processes that drive one GPU each, in "
                    f"{self.num_nodes} nodes of {self.ranks_per_node} ranks: the normal-mode "
                    "and low-latency ops run the internode kernels (NVSHMEM puts between nodes; "
                    "normal mode hierarchical, the low-latency dispatch "
                    f"{'layered' if self.ll_layered else 'flat'}), the grouped ops the pure-JAX "
                    "path")
        self.transport = transport
        self._intranode = True
        self._low_latency = ll
        self._release = weakref.finalize(self, _cuda.intranode_release, self.comm_id)
        _FailureWatch.add(self.comm_id, cfg.failure_exit_s)

    # -- placement ---------------------------------------------------------------------------
    def local_expert_ids(self, rank: int) -> np.ndarray:
        """Global expert id held in each local slot of ``rank``: int32 ``[E_l]``."""
        if isinstance(rank, (bool, np.bool_)) or not isinstance(rank, (int, np.integer)):
            raise TypeError(f"rank must be an int in [0, {self.num_ranks}), got "
                            f"{type(rank).__name__} {rank!r}")
        if not 0 <= rank < self.num_ranks:
            raise ValueError(f"rank must be in [0, {self.num_ranks}), got {rank}")
        return self.global_expert[rank].copy()

    def to_placement_order(self, tree, *, sharded: bool = False):
        """Stacked expert weights from global expert order to this placement's rank-major order.

        Every leaf of ``tree`` (numpy or jax arrays: weights, quantisation scales, ...) has a
        leading dim E indexed by global expert id; the result's row ``r * E_l + s`` holds
        expert ``local_expert_ids(r)[s]``, so a ``P(EP axes)`` sharding gives rank r its
        ``E_l`` local experts in slot order, as the dispatched ``topk_idx`` / ``[E_l, ...]``
        rows index them. ``sharded=True`` also places each leaf so (``device_put``; under
        ``jit`` a sharding constraint). A leaf without leading dim E is a ``ValueError``.
        With ``"linear"`` placement this is the identity; with ``"round_robin"`` or a table,
        forgetting it silently gives wrong outputs. :meth:`from_placement_order` inverts it
        (e.g. for checkpoints)."""
        from jaxep import _placement

        return _placement.permute(self, tree, _placement.forward_order(self), sharded,
                                  "to_placement_order")

    def from_placement_order(self, tree, *, sharded: bool = False):
        """Inverse of :meth:`to_placement_order`: rank-major ``(rank, slot)`` rows back to
        global expert id order (``sharded=True`` places the result as ``P(EP axes)`` too)."""
        from jaxep import _placement

        return _placement.permute(self, tree, _placement.inverse_order(self), sharded,
                                  "from_placement_order")

    def _ep_group_devices(self) -> list[list]:
        """The devices of each EP group, in rank order (one group per combination of the mesh's
        other axes)."""
        names = list(self.mesh.axis_names)
        ep = [names.index(a) for a in self.cfg.axis_names]
        rest = [i for i in range(len(names)) if i not in ep]
        devices = np.transpose(self.mesh.devices, rest + ep).reshape(-1, self.num_ranks)
        return [list(group) for group in devices]

    def ep_groups(self) -> list[list[int]]:
        """Device ordinals of this process's EP groups, in rank order."""
        me = jax.process_index()
        return [[d.local_hardware_id for d in g] for g in self._ep_group_devices()
                if g[0].process_index == me and all(d.process_index == me for d in g)]

    @property
    def num_nodes(self) -> int:
        """Nodes the EP group spans (``R // ranks_per_node``)."""
        return self.num_ranks // self.ranks_per_node

    def _kernels_supported(self) -> bool:
        return (self.num_ranks <= _cuda.MAX_RANKS and self.cfg.num_topk <= _cuda.MAX_TOPK
                and self.cfg.num_experts <= _cuda.MAX_EXPERTS)

    def _ll_wanted(self, copy_engine: bool) -> bool:
        """Whether to allocate the low-latency buffers (see ``EPConfig.low_latency``)."""
        cfg = self.cfg
        if cfg.low_latency is False or not _cuda.ll_supported(
                self.num_ranks, cfg.max_tokens_per_rank, cfg.num_topk, cfg.num_experts,
                cfg.hidden):
            return False
        if cfg.low_latency:
            return True
        # Virtual nodes are known here (the hardware's only once the transport has looked).
        from jaxep._nvshmem import internode_layout

        rdma, relay = internode_layout(cfg, self.num_ranks, self.ranks_per_node)
        nbytes = _cuda.ll_workspace_bytes(self.num_ranks, cfg.max_tokens_per_rank, cfg.num_topk,
                                          self.num_local_experts, cfg.hidden,
                                          copy_engine=copy_engine, rdma=rdma, relay_ranks=relay)
        return nbytes <= LL_AUTO_MAX_BYTES

    def implementation(self, op: str) -> str:
        """Which implementation runs ``op`` on this communicator: ``"cuda"`` or ``"xla"``.

        The rule: ``"xla"`` unless the backend is ``"cuda"``; then ``dispatch_layout`` runs its
        kernel within its limits, the normal-mode ops (grouped ones too) where this process has
        a transport for the EP group (``transport``; grouped ones with at most
        ``_cuda.GROUPED_MAX_LOCAL_EXPERTS`` local experts, and only within one node), the
        low-latency ops where the communicator has low-latency buffers (across nodes too)."""
        if op not in ALL_OPS:
            raise ValueError(f"op must be one of {ALL_OPS}, got {op!r}")
        if self.backend != "cuda":
            return "xla"
        if op in CUDA_OPS and self._layout_supported():
            return "cuda"
        if op in INTRANODE_OPS and self._intranode:
            return "cuda"
        if op in LL_OPS and self._low_latency:
            return "cuda"
        if (op in GROUPED_OPS and self._intranode and not self._internode
                and self.num_local_experts <= _cuda.GROUPED_MAX_LOCAL_EXPERTS):
            return "cuda"
        return "xla"

    def _layout_supported(self) -> bool:
        return (self.num_ranks <= _cuda.LAYOUT_MAX_RANKS
                and self.cfg.num_experts <= _cuda.LAYOUT_MAX_EXPERTS)

    def check(self) -> None:
        """Raise ``RuntimeError`` if a kernel of this communicator recorded a failure (a peer
        that never arrived: names the waiting rank, the peer and the phase)."""
        if self._intranode:
            msg = _cuda.intranode_error(self.comm_id)
            if msg:
                raise RuntimeError(msg)

    # -- lifetime ----------------------------------------------------------------------------
    def close(self) -> None:
        """Retire the communicator; idempotent. Ops refuse it afterwards, and compiled programs
        using its CUDA workspaces fail with a clear error; the workspaces' memory (a few KB per
        device, plus the low-latency buffers) stays allocated until the process exits, so a program replayed from a CUDA graph
        never touches freed memory. The pure-JAX backend holds nothing."""
        if self._intranode:
            self._release()
        self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "Communicator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Communicator(R={self.num_ranks}, E={self.cfg.num_experts}, "
                f"axis={self.cfg.axis_name!r}, backend={self.backend!r}, "
                f"transport={self.transport!r})")


class _FailureWatch:
    """One daemon thread per process, started with the first CUDA communicator, that polls the
    kernels' host-mapped failure records (``_cuda.first_error``). A kernel that gives up on a
    peer traps, which loses the process's CUDA context; JAX may then block forever on the lost
    work. So the watch prints the failure as soon as it is recorded and ends the process after
    the failing communicator's ``EPConfig.failure_exit_s``, unless the program exits first."""

    _lock = threading.Lock()
    _grace: dict = {}  # communicator id -> failure_exit_s
    _thread = None

    @classmethod
    def add(cls, comm_id: int, failure_exit_s) -> None:
        with cls._lock:
            cls._grace[comm_id] = failure_exit_s
            if cls._thread is None:
                cls._thread = threading.Thread(target=cls._run, name="jaxep-failure-watch",
                                               daemon=True)
                cls._thread.start()

    @classmethod
    def _run(cls) -> None:
        while True:
            time.sleep(0.05)
            comm_id, msg = _cuda.first_error()
            if msg:
                break
        with cls._lock:
            grace = cls._grace.get(comm_id)
        tail = ("" if grace is None else
                f"; this process's CUDA context is lost: jaxep ends the process in {grace:g} s "
                f"(EPConfig.failure_exit_s) unless it exits first")
        print(f"{msg}{tail}", file=sys.stderr, flush=True)
        if grace is not None:
            time.sleep(grace)
            print(f"jaxep: ending the process (exit status {FAILURE_EXIT_CODE}) after: {msg}",
                  file=sys.stderr, flush=True)
            os._exit(FAILURE_EXIT_CODE)


def choose_transport(group_processes, mesh_processes, num_processes):
    """Which transport serves EP groups whose devices belong to these processes (the rule of
    docs/design.md, "Process models"): ``(transport or None, reason)``.

    Args:
      group_processes: per EP group, the process index of each rank's device.
      mesh_processes: the process index of every device of the mesh.
      num_processes: processes in the job (``jax.process_count()``).

    ``"process"`` when every EP group lies inside one process (its GPUs reach each other by
    peer access; on a multi-host mesh each process serves its own groups); ``"nvshmem"`` when
    the groups span processes that each drive exactly one GPU of the mesh and the mesh spans
    every process (NVSHMEM's symmetric allocation is collective over all of them); otherwise
    None: the pure-JAX path, since an NVSHMEM PE is one process bound to one GPU.
    """
    if all(len(set(g)) == 1 for g in group_processes):
        return "process", "every EP group lies inside one process"
    per_process = {}
    for p in mesh_processes:
        per_process[p] = per_process.get(p, 0) + 1
    several = sorted(p for p, n in per_process.items() if n > 1)
    if several:
        p = several[0]
        return None, (f"an EP group spans processes, and process {p} drives "
                      f"{per_process[p]} GPUs of the mesh: the kernels reach GPUs of other "
                      "processes through NVSHMEM, whose PE is one process bound to one GPU; "
                      "launch one process per GPU (or keep each EP group inside one process)")
    if len(per_process) != num_processes:
        return None, (f"the mesh spans {len(per_process)} of the job's {num_processes} "
                      "processes: one process per GPU needs every process in the mesh "
                      "(NVSHMEM's symmetric allocation is collective)")
    return "nvshmem", "EP groups span processes that drive one GPU each"


def _placement_tables(cfg: EPConfig, num_ranks: int) -> tuple[np.ndarray, np.ndarray]:
    """(expert_rank [E], expert_slot [E]) int32 for the configured placement."""
    e = np.arange(cfg.num_experts, dtype=np.int32)
    local = cfg.num_experts // num_ranks
    if cfg.placement == "linear":
        return e // local, e % local
    if cfg.placement == "round_robin":
        return e % num_ranks, e // num_ranks
    table = np.asarray(cfg.placement, dtype=np.int64)
    bad = (table[:, 0] >= num_ranks) | (table[:, 1] >= local)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"placement table entry {i} = {tuple(table[i].tolist())} is outside "
                         f"(rank < R={num_ranks}, slot < E_l={local})")
    return table[:, 0].astype(np.int32), table[:, 1].astype(np.int32)


def _resolve_backend(backend: str, mesh) -> str:
    on_gpu = all(d.platform == "gpu" for d in mesh.devices.flat)
    if backend == "xla":
        return "xla"
    if backend == "cuda":
        if not _cuda.available():
            raise ValueError("backend='cuda' needs jaxep's extension built with CUDA "
                             "(reinstall on a machine with nvcc); use backend='xla' or 'auto'")
        if not on_gpu:
            platforms = sorted({d.platform for d in mesh.devices.flat})
            raise ValueError(f"backend='cuda' needs a mesh of GPU devices, got {platforms}")
        return "cuda"
    return "cuda" if on_gpu and _cuda.available() else "xla"
