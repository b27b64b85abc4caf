"""Process-per-GPU transport: NVSHMEM bootstrapped with nvshmem4py over ``jax.distributed``.

When an EP group's ranks are separate processes (one GPU each), the CUDA kernels cannot reach
each other's XLA buffers; they work instead on one *symmetric region* per rank, allocated on
NVSHMEM's symmetric heap (same size on every process), that every peer on the host maps
(``nvshmem_ptr``). This module

* initialises NVSHMEM once per process (``ensure_initialized``): process 0 creates the unique
  id, which travels through ``jax.distributed``'s key-value store (no MPI); every process then
  calls ``nvshmem.core.init(..., initializer_method="uid")`` with its process index as its PE;
* makes creating a communicator a checked collective step (``create_region``): every process
  publishes what it is creating, and a difference or an absent process is an error naming it
  instead of a hang in the symmetric allocation;
* allocates the region, maps the peers' regions and hands the addresses to the extension, which
  lays out the workspace, the stage and the low-latency buffers in it (``ffi/registry.h``).

Peers of the same node are reached by load/store through the mapped regions. When the EP group
spans nodes (``EPConfig.ranks_per_node``, or peers on other hosts) the normal-mode and
low-latency kernels reach the others with NVSHMEM's device library, linked into the extension,
whose device state the extension initialises itself (``cuda/rdma.cu``) after the host init
here.
The regions stay allocated until the process exits, like the single-process workspaces (a
program replayed from a CUDA graph must never touch freed memory).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import time

import jax
import numpy as np

# The NVSHMEM library jaxep is built and tested against (the ``cuda`` extra pins the wheel).
NVSHMEM_VERSION = "3.4.5"
_KEY = "jaxep/nvshmem"


class _NvshmemState:
    """This process's NVSHMEM state: initialised once, its regions kept for the process's life."""

    def __init__(self):
        self.initialized = False
        self.regions = []  # nvshmem buffers (never freed: see the module docstring)
        self.next_comm = 0  # communicators created so far (same order on every process)


_STATE = _NvshmemState()


def _nvshmem():
    try:
        import nvshmem.core as nvshmem
    except ImportError as e:
        raise RuntimeError(
            "jaxep: an EP group spanning processes needs nvshmem4py (pip install "
            f"'jaxep[cuda]', i.e. nvshmem4py-cu13 and nvidia-nvshmem-cu13=={NVSHMEM_VERSION}); "
            f"importing nvshmem.core failed: {e}") from e
    return nvshmem


def _client():
    from jax._src import distributed  # the coordination-service client jax.distributed made

    client = distributed.global_state.client
    if client is None:
        raise RuntimeError("jaxep: an EP group spanning processes needs jax.distributed."
                           "initialize() to have been called in every process")
    return client


def _get(client, key: str, deadline: float, me: int, waiting_for: str) -> str:
    """The value of ``key``, waiting at most until ``deadline`` (time.monotonic())."""
    ms = max(int((deadline - time.monotonic()) * 1000), 1)
    try:
        value = client.blocking_key_value_get(key, ms)
    except Exception as e:  # noqa: BLE001 -- jax raises its runtime error type on timeout
        raise RuntimeError(f"jaxep: process {me} timed out waiting for {waiting_for} "
                           f"(key {key!r}): {type(e).__name__}: {str(e)[:200]}") from e
    return value.decode() if isinstance(value, bytes) else value


def _all_gather_str(client, prefix: str, value: str, timeout_s: float, what: str) -> list[str]:
    """Every process's ``value`` under ``prefix`` (a host-side all-gather through the key-value
    store), bounded by ``timeout_s``: a missing process is named in the error."""
    me, n = jax.process_index(), jax.process_count()
    client.key_value_set(f"{prefix}/{me}", value)
    deadline = time.monotonic() + timeout_s
    return [value if p == me else _get(client, f"{prefix}/{p}", deadline, me,
                                       f"process {p} to {what} (within timeout_s={timeout_s})")
            for p in range(n)]


def ensure_initialized(device_ordinal: int, timeout_s: float) -> None:
    """Initialises NVSHMEM in this process (once; later calls return at once), with PE = the
    ``jax.distributed`` process index, bound to CUDA device ``device_ordinal``."""
    if _STATE.initialized:
        return
    nvshmem = _nvshmem()
    version = str(nvshmem.get_version().libnvshmem_version)
    if version != NVSHMEM_VERSION:
        raise RuntimeError(f"jaxep: loaded NVSHMEM {version}, but jaxep is built and tested "
                           f"against {NVSHMEM_VERSION} (pip install "
                           f"nvidia-nvshmem-cu13=={NVSHMEM_VERSION})")
    client = _client()
    me, n = jax.process_index(), jax.process_count()
    deadline = time.monotonic() + timeout_s
    if me == 0:
        uid = nvshmem.get_unique_id()
        client.key_value_set(f"{_KEY}/uid", base64.b64encode(
            np.asarray(uid._data).tobytes()).decode())
    else:
        uid = nvshmem.get_unique_id(empty=True)
        raw = base64.b64decode(_get(client, f"{_KEY}/uid", deadline, me,
                                    f"process 0's NVSHMEM unique id (timeout_s={timeout_s})"))
        uid._data[:] = np.frombuffer(raw, dtype=np.asarray(uid._data).dtype)
    # Everyone has the id before anyone enters init, so an absent process is named here rather
    # than left to NVSHMEM's bootstrap.
    _all_gather_str(client, f"{_KEY}/joined", "1", max(deadline - time.monotonic(), 1.0),
                    "join NVSHMEM initialisation")
    try:
        from cuda.core import Device
    except ImportError:  # cuda-core < 0.5
        from cuda.core.experimental import Device
    device = Device(int(device_ordinal))
    device.set_current()
    try:
        nvshmem.init(device=device, uid=uid, rank=me, nranks=n, initializer_method="uid")
    except Exception as e:
        raise RuntimeError(f"jaxep: NVSHMEM initialisation failed in process {me} of {n} "
                           f"(device {device_ordinal}): {e}") from e
    _STATE.initialized = True


def _fingerprint(comm, transport_info: dict) -> dict:
    cfg = dataclasses.asdict(comm.cfg)
    cfg = {k: (list(map(list, v)) if k == "placement" and not isinstance(v, str) else
               list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}
    return dict(cfg, mesh_shape=dict(comm.mesh.shape), num_ranks=comm.num_ranks, **transport_info)


def _first_difference(mine: dict, theirs: dict) -> str:
    for k in sorted(set(mine) | set(theirs)):
        if mine.get(k) != theirs.get(k):
            return f"{k}={mine.get(k)!r} here, {k}={theirs.get(k)!r} there"
    return "?"


def _physical_ranks_per_node(nvshmem, group_processes: list[int]) -> int | None:
    """Ranks per node of the group as the hardware places them (NVSHMEM's TEAM_NODE: the PEs
    that share this host's memory): len(group) when all do; None when the nodes are not
    contiguous blocks of one size (the kernels' node numbering, rank // ranks_per_node)."""
    try:
        teams = nvshmem.Teams
        same = [nvshmem.team_translate_pe(teams.TEAM_WORLD, pe, teams.TEAM_NODE) >= 0
                for pe in group_processes]
    except Exception:  # noqa: BLE001 -- an NVSHMEM without TEAM_NODE: one node assumed
        return len(group_processes)
    n = sum(same)
    me = jax.process_index()
    rank = group_processes.index(me)
    if n == 0 or len(group_processes) % n or any(
            same[p] != (p // n == rank // n) for p in range(len(group_processes))):
        return None
    return n


def internode_layout(cfg, num_ranks: int, ranks_per_node: int) -> tuple[bool, int]:
    """``(rdma, relay_ranks)`` of a group with these nodes: whether it spans nodes (the
    low-latency staging area), and the layered dispatch's relay width (EPConfig.ll_layered;
    None: layered), 0 when flat or with one rank per node (the forwarder is the destination)."""
    rdma = ranks_per_node < num_ranks
    layered = rdma and ranks_per_node > 1 and cfg.ll_layered is not False
    return rdma, ranks_per_node if layered else 0


def create_region(comm, rank: int, device: int, group_processes: list[int], capacity: int,
                  low_latency: bool):
    """Allocates and registers this process's rank of ``comm``'s EP group (collective over all
    processes). Returns ``(comm_id, bytes, ranks_per_node, layered)``, or ``(None, reason)`` when the
    group spans nodes and the extension cannot reach them (built without NVSHMEM's device
    library, or nodes that are not contiguous blocks of ranks); every process returns the same
    kind of answer."""
    from jaxep import _cuda

    cfg = comm.cfg
    timeout_s = float(cfg.timeout_s)
    ensure_initialized(device, timeout_s)
    nvshmem = _nvshmem()
    client = _client()
    me = jax.process_index()
    seq = _STATE.next_comm
    _STATE.next_comm += 1
    prefix = f"{_KEY}/comm{seq}"
    n = len(group_processes)
    per_node = cfg.ranks_per_node if cfg.ranks_per_node is not None else \
        _physical_ranks_per_node(nvshmem, group_processes)
    per_node = None if per_node is None else min(per_node, n)
    internode = per_node is None or per_node < n
    refusal = None
    if per_node is None:
        refusal = ("the EP group's nodes are not contiguous blocks of ranks of one size "
                   "(set EPConfig.ranks_per_node, or order the mesh by host)")
    elif internode and not _cuda.nvshmem_device_linked():
        refusal = ("the EP group spans nodes, and jaxep was built without NVSHMEM's device "
                   "library (pip install nvidia-nvshmem-cu13 before building jaxep)")

    # 1. Every process creates the same communicator: the symmetric allocation below is
    #    collective and would hang (or mismatch sizes) otherwise.
    mine = _fingerprint(comm, dict(backend=comm.backend))
    for p, text in enumerate(_all_gather_str(client, f"{prefix}/cfg", json.dumps(mine),
                                             timeout_s, f"create communicator #{seq}")):
        theirs = json.loads(text)
        if theirs != mine:
            raise ValueError(
                f"jaxep: communicator #{seq} differs between processes {me} and {p}: "
                f"{_first_difference(mine, theirs)}. Every process must create the same "
                "Communicators (config, mesh, backend) in the same order")

    # 2. Every process plans alike (the allocation below is collective): the same nodes (the
    #    hardware's may look different from different hosts), or the same refusal.
    plans = [json.loads(t) for t in _all_gather_str(
        client, f"{prefix}/plan", json.dumps([per_node, refusal or ""]), timeout_s,
        f"plan communicator #{seq}")]
    refusal = next((r for _, r in plans if r), None)
    if refusal is None and len({k for k, _ in plans}) > 1:
        refusal = (f"the processes see different nodes (ranks per node by process: "
                   f"{[k for k, _ in plans]}); set EPConfig.ranks_per_node")
    if refusal:
        return None, refusal

    _, relay_ranks = internode_layout(cfg, n, per_node)
    in_my_node = [p // per_node == rank // per_node for p in range(n)]
    # What the region holds: sized and registered alike.
    contents = dict(low_latency=low_latency, num_topk=cfg.num_topk,
                    num_local_experts=comm.num_local_experts, hidden=cfg.hidden,
                    ranks_per_node=per_node if internode else 0, layered=relay_ranks > 0)

    # 3. The region, and the node peers' regions as this process addresses them (a rank in
    #    another node is reached with puts only: 0).
    nbytes = int(_cuda.process_region_bytes(comm.num_ranks, cfg.max_tokens_per_rank, capacity,
                                            **contents))
    region = nvshmem.buffer(nbytes)
    _STATE.regions.append(region)
    bases = []
    for p, pe in enumerate(group_processes):
        if pe == me:
            bases.append(int(region.handle))
            continue
        if not in_my_node[p]:
            bases.append(0)
            continue
        try:
            peer = nvshmem.get_peer_buffer(region, pe)
            bases.append(int(peer.handle) if peer is not None else 0)
        except Exception:  # noqa: BLE001 -- not load/store reachable
            bases.append(0)
    reachable = all(b or not mine for b, mine in zip(bases, in_my_node))
    flags = _all_gather_str(client, f"{prefix}/reachable", "1" if reachable else "0", timeout_s,
                            f"map communicator #{seq}'s peers")
    if not all(f == "1" for f in flags):
        return None, ("a peer of the EP group's node is not load/store reachable "
                      f"(processes' flags: {flags})")

    # 4. Register (zeroes this rank's region), then wait until every rank has, so no peer
    #    writes into a region before it is initialised.
    comm_id, nbytes = _cuda.process_create(device, rank, bases, cfg.max_tokens_per_rank,
                                           capacity, pes=list(group_processes), **contents)
    _all_gather_str(client, f"{prefix}/ready", "1", timeout_s,
                    f"initialise communicator #{seq}")
    return comm_id, nbytes, per_node, relay_ranks > 0
