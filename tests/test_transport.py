"""Which transport serves an EP group (``jaxep.communicator.choose_transport``), decided from the
process index of every device, so no GPU or second process is needed."""

import numpy as np
import pytest

import jaxep
from jaxep.communicator import choose_transport


def _groups(process_of_device, ep):
    """EP groups of a (rest, ep) device grid given each device's process index."""
    grid = np.asarray(process_of_device).reshape(-1, ep)
    return grid.tolist(), grid.ravel().tolist()


@pytest.mark.parametrize("processes,ep", [
    ([0, 0, 0, 0], 4),                     # one process, one EP group
    ([0, 0, 0, 0, 1, 1, 1, 1], 4),         # DP over 2 hosts x EP over each host's 4 GPUs
    ([0, 0, 1, 1, 2, 2, 3, 3], 2),         # 4 processes with 2 GPUs each, EP inside each
])
def test_ep_inside_a_process_uses_peer_access(processes, ep):
    groups, mesh = _groups(processes, ep)
    transport, reason = choose_transport(groups, mesh, max(processes) + 1)
    assert transport == "process", reason


@pytest.mark.parametrize("processes,ep", [
    ([0, 1], 2),
    ([0, 1, 2, 3], 4),
    ([0, 1, 2, 3, 4, 5, 6, 7], 4),         # DP 2 x EP 4, one process per GPU
    ([0, 2, 1, 3], 2),                     # any order of processes
])
def test_ep_across_single_gpu_processes_uses_nvshmem(processes, ep):
    groups, mesh = _groups(processes, ep)
    transport, reason = choose_transport(groups, mesh, len(processes))
    assert transport == "nvshmem", reason


def test_ep_across_multi_gpu_processes_falls_back_with_reason():
    # one process per host driving 4 GPUs, EP across the 2 hosts: not expressible in NVSHMEM
    groups, mesh = _groups([0, 0, 0, 0, 1, 1, 1, 1], 8)
    transport, reason = choose_transport(groups, mesh, 2)
    assert transport is None
    assert "one process per GPU" in reason and "process 0 drives 4 GPUs" in reason


def test_mesh_missing_a_process_falls_back():
    groups, mesh = _groups([0, 1], 2)
    transport, reason = choose_transport(groups, mesh, 3)
    assert transport is None and "2 of the job's 3 processes" in reason


def test_xla_backend_has_no_transport(cpu_comm):
    comm = cpu_comm(4, num_experts=8, num_topk=2, hidden=16, max_tokens_per_rank=4)
    assert comm.transport is None and comm.implementation("dispatch") == "xla"
    assert "xla" in repr(comm)


def test_auto_on_cpu_runs_xla(cpu_comm):
    comm = cpu_comm(2, backend="auto", num_experts=8, num_topk=2, hidden=16,
                    max_tokens_per_rank=4)
    assert comm.backend == "xla" and comm.transport is None


# ---- nodes of the EP group (EPConfig.ranks_per_node) -----------------------------------------


@pytest.mark.parametrize("value,error", [(0, ValueError), (-2, ValueError), (True, TypeError),
                                         (2.0, TypeError)])
def test_ranks_per_node_is_a_positive_int(value, error):
    with pytest.raises(error, match="ranks_per_node"):
        jaxep.EPConfig(num_experts=8, num_topk=2, hidden=16, max_tokens_per_rank=4,
                       ranks_per_node=value)


def test_ll_layered_is_a_bool_or_none():
    with pytest.raises(TypeError, match="ll_layered must be None, True or False"):
        jaxep.EPConfig(num_experts=8, num_topk=2, hidden=16, max_tokens_per_rank=4,
                       ll_layered=1)


def test_ranks_per_node_must_divide_the_group(cpu_comm):
    with pytest.raises(ValueError, match=r"ranks_per_node \(3\) must divide the EP group size R=4"):
        cpu_comm(4, num_experts=8, num_topk=2, hidden=16, max_tokens_per_rank=4,
                 ranks_per_node=3)


@pytest.mark.parametrize("rpn,nodes", [(None, 1), (1, 4), (2, 2), (4, 1), (8, 1)])
def test_nodes_of_the_group(cpu_comm, rpn, nodes):
    comm = cpu_comm(4, num_experts=8, num_topk=2, hidden=16, max_tokens_per_rank=4,
                    ranks_per_node=rpn)
    assert comm.num_nodes == nodes and comm.ranks_per_node == 4 // nodes
    # the xla backend computes the same function whatever the nodes
    assert all(comm.implementation(op) == "xla" for op in ("dispatch", "ll_dispatch"))


def test_the_rule_across_nodes(cpu_comm, monkeypatch):
    """A group spanning nodes: the normal-mode and low-latency ops on their (internode)
    kernels, the grouped ops on the pure-JAX path, dispatch_layout (local) on its kernel."""
    monkeypatch.setattr(jaxep._cuda, "GROUPED_MAX_LOCAL_EXPERTS", 512)  # also without CUDA
    comm = cpu_comm(4, num_experts=8, num_topk=2, hidden=16, max_tokens_per_rank=4,
                    ranks_per_node=2)
    # what Communicator._create_transport sets for a process-per-GPU group across nodes
    comm.backend, comm.transport = "cuda", "nvshmem"
    comm._intranode, comm._internode, comm._low_latency = True, True, True
    impl = {op: comm.implementation(op) for op in jaxep.communicator.ALL_OPS}
    assert impl == dict(dispatch_layout=impl["dispatch_layout"], dispatch="cuda", combine="cuda",
                        ll_dispatch="cuda", ll_combine="cuda", dispatch_grouped="xla",
                        combine_grouped="xla")
    comm._internode = False  # one node: every op on its kernels
    assert all(comm.implementation(op) == "cuda"
               for op in ("dispatch", "combine", "ll_dispatch", "dispatch_grouped"))


class _FakeNvshmem:
    """nvshmem.core's team queries for _physical_ranks_per_node: `node` lists the PEs that share
    this process's node (TEAM_NODE); translate_pe gives -1 for the others."""

    class Teams:
        TEAM_WORLD, TEAM_NODE = "world", "node"

    def __init__(self, node, fail=False):
        self.node, self.fail = list(node), fail

    def team_translate_pe(self, src, pe, dest):
        assert (src, dest) == ("world", "node")
        if self.fail:
            raise RuntimeError("no TEAM_NODE")
        return self.node.index(pe) if pe in self.node else -1


@pytest.mark.parametrize("node,want", [([0, 1, 2, 3], 4),   # one node
                                        ([0, 1], 2),         # two nodes of two
                                        ([0], 1),            # four nodes of one
                                        ([0, 2], None),      # not contiguous: no node numbering
                                        ([0, 1, 2], None)])  # nodes of different sizes
def test_physical_nodes_from_nvshmem_team_node(node, want):
    from jaxep import _nvshmem

    # this process (jax.process_index() == 0) is rank 0 of a group of PEs 0..3
    assert _nvshmem._physical_ranks_per_node(_FakeNvshmem(node), [0, 1, 2, 3]) == want


def test_physical_nodes_without_team_node_assume_one():
    from jaxep import _nvshmem

    assert _nvshmem._physical_ranks_per_node(_FakeNvshmem([], fail=True), [0, 1, 2, 3]) == 4


@pytest.mark.skipif(not jaxep._cuda.available(), reason="needs the extension built with CUDA")
@pytest.mark.parametrize("R,rpn", [(2, 1), (4, 2), (8, 4)])
def test_internode_buffer_sizes(R, rpn):
    """What a group across nodes adds to the low-latency buffers (docs/design.md, "Across
    nodes"): the staging area, 2 dispatch bundles per rank plus one combine slot of 4H bytes per
    (rank, token, max(K, R)); the layered dispatch's relays, 4 per rank."""
    T, K, El, H = 32, 8, 4, 256
    up = lambda n: (n + 255) // 256 * 256  # noqa: E731
    size = lambda **kw: jaxep._cuda.ll_workspace_bytes(R, T, K, El, H, **kw)  # noqa: E731
    counts = (4 * El + 15) // 16 * 16
    meta = 1 + 2 * K
    bundle = up(counts + (T * meta * 4 + 15) // 16 * 16 + T * 4 * H)
    assert size(rdma=True) - size() == 2 * R * bundle + up(R * T * max(K, R) * 4 * H)
    relay = up(rpn * counts + (T * rpn * meta * 4 + 15) // 16 * 16 + T * 4 * H)
    assert size(rdma=True, relay_ranks=rpn) - size(rdma=True) == 4 * R * relay


@pytest.mark.skipif(not jaxep._cuda.available(), reason="needs the extension built with CUDA")
@pytest.mark.parametrize("R,rpn", [(2, 1), (4, 2), (8, 4), (8, 2)])
def test_normal_relay_size(R, rpn):
    """What a group across nodes adds to the process region for normal mode (docs/design.md,
    "Across nodes"): one relay slot per node, each with int32 counts (256 bytes), int32
    positions [R][T], a stage's worth of inputs and a float32 row of H per token for the
    partial sums."""
    T, C, K, El, H = 32, 64, 8, 4, 256
    up = lambda n, a=256: (n + a - 1) // a * a  # noqa: E731
    size = lambda **kw: jaxep._cuda.process_region_bytes(  # noqa: E731
        R, T, C, low_latency=False, num_topk=K, num_local_experts=El, hidden=H, **kw)
    groups = H // 128
    dispatch = sum(up(b) for b in (T * 4 * H, T * 4 * groups, T * K * 4, T * K * 4))
    rows = max(C, T) * 4 * H
    grouped = 2 * up(T * K * 4) + R * T * 4 * H  # the grouped combine's partial rows
    stage = up(max(dispatch, rows, grouped))
    partial = up(T * 4 * H)
    slot = up(256 + 4 * R * T) + max(stage, partial) + partial
    assert size(ranks_per_node=rpn) - size() == up(slot * (R // rpn), 4096)


def test_dispatch_rows_across_nodes_needs_send_slot(cpu_comm):
    """Across nodes the dispatch along a handle sends each row once per node that needs it,
    which only the handle's send_slot says: without it the call is refused, not guessed."""
    import jax.numpy as jnp

    comm = cpu_comm(4, num_experts=8, num_topk=2, hidden=16, max_tokens_per_rank=4,
                    ranks_per_node=2)
    comm._internode = True
    with pytest.raises(ValueError, match="send_slot"):
        jaxep._cuda.dispatch_rows(comm, jnp.zeros((4, 16)), jnp.zeros((16,), jnp.int32))
