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
