"""The process-per-GPU bootstrap's host-side checks, without GPUs or other processes: the
key-value all-gather names an absent process within its bound, and a communicator created with
a different config in another process is a ValueError naming the field."""

import json
import time

import pytest

from jaxep import _nvshmem


class FakeClient:
    """jax.distributed's key-value store, with the other processes' keys preset."""

    def __init__(self, preset):
        self.store = dict(preset)

    def key_value_set(self, key, value):
        self.store[key] = value

    def blocking_key_value_get(self, key, timeout_ms):
        if key in self.store:
            return self.store[key]
        time.sleep(timeout_ms / 1000)
        raise RuntimeError(f"DEADLINE_EXCEEDED: {key}")


@pytest.fixture
def three_processes(monkeypatch):
    monkeypatch.setattr(_nvshmem.jax, "process_index", lambda: 0)
    monkeypatch.setattr(_nvshmem.jax, "process_count", lambda: 3)


def test_all_gather_returns_every_process_value(three_processes):
    client = FakeClient({"k/1": "b", "k/2": "c"})
    assert _nvshmem._all_gather_str(client, "k", "a", 1.0, "join") == ["a", "b", "c"]
    assert client.store["k/0"] == "a"


def test_all_gather_names_the_absent_process_within_its_bound(three_processes):
    client = FakeClient({"k/1": "b"})
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"process 0 timed out waiting for process 2 to join"):
        _nvshmem._all_gather_str(client, "k", "a", 0.3, "join")
    assert time.monotonic() - t0 < 2.0


def test_first_difference_names_the_field():
    mine = {"hidden": 1024, "num_topk": 8, "num_ranks": 4}
    theirs = dict(mine, hidden=512)
    assert _nvshmem._first_difference(mine, theirs) == "hidden=1024 here, hidden=512 there"


def test_fingerprint_is_json_and_tells_configs_apart(cpu_comm):
    a = cpu_comm(2, num_experts=8, num_topk=2, hidden=16, max_tokens_per_rank=4,
                 placement=((0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3)))
    b = cpu_comm(2, num_experts=8, num_topk=2, hidden=32, max_tokens_per_rank=4)
    fa, fb = (_nvshmem._fingerprint(c, dict(backend=c.backend)) for c in (a, b))
    assert json.loads(json.dumps(fa)) == fa  # what travels through the key-value store
    assert "hidden=16 here, hidden=32 there" in _nvshmem._first_difference(fa, fb)
