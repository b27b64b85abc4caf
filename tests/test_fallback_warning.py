"""The once-per-communicator warning when backend "cuda" runs an op on the xla path for a
reason the user can change (issue 20, item 3), decided without GPUs on stand-in communicators."""

import types
import warnings

import pytest

import jaxep
from jaxep import _cuda, _fallback


class _Comm(types.SimpleNamespace):
    """A stand-in Communicator (weak-referenceable and hashable by identity, as the real one)."""

    __hash__ = object.__hash__


def fake(backend="cuda", intranode=True, low_latency=None, ll_buffers=False, impl="xla",
         reason="every EP group lies inside one process", internode=False):
    cfg = jaxep.EPConfig(num_experts=256, num_topk=8, hidden=7168, max_tokens_per_rank=4096,
                         low_latency=low_latency)
    return _Comm(backend=backend, cfg=cfg, num_ranks=8, num_local_experts=32,
                 _intranode=intranode, _internode=internode, _low_latency=ll_buffers,
                 transport_reason=reason, implementation=lambda op: impl)


@pytest.fixture
def kernels(monkeypatch):
    monkeypatch.setattr(_cuda, "ll_supported", lambda *a: True)
    monkeypatch.setattr(_cuda, "ll_workspace_bytes", lambda *a, **k: 3 << 30)


def test_reasons(kernels):
    # real sizes: the LL buffers exceed the automatic limit
    assert "3072 MiB" in _fallback.reason(fake(), "ll_dispatch")
    assert _fallback.reason(fake(impl="cuda"), "ll_dispatch") is None
    assert _fallback.reason(fake(backend="xla"), "ll_combine") is None
    assert _fallback.reason(fake(low_latency=False), "ll_dispatch") is None  # the user's choice
    assert _fallback.reason(fake(), "dispatch") is None
    why = _fallback.reason(fake(intranode=False, reason="beyond the CUDA kernels' limits"),
                           "dispatch")
    assert "beyond the CUDA kernels' limits" in why
    # a group across nodes: the grouped ops run the pure-JAX path, and the reason says so
    why = _fallback.reason(fake(internode=True, reason="in 2 nodes of 4 ranks"),
                           "dispatch_grouped")
    assert "in 2 nodes of 4 ranks" in why


def test_unsupported_ll_sizes(monkeypatch):
    monkeypatch.setattr(_cuda, "ll_supported", lambda *a: False)
    assert "do not support these sizes" in _fallback.reason(fake(), "ll_combine")


def test_warns_once_per_communicator(kernels):
    a, b = fake(), fake()
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        for _ in range(3):
            _fallback.warn_once(a, "ll_dispatch")
            _fallback.warn_once(a, "ll_combine")
        _fallback.warn_once(b, "ll_dispatch")  # same cause for both ops of a: one warning
        _fallback.warn_once(fake(backend="xla"), "ll_dispatch")
    assert len(got) == 2 and all("pure-JAX" in str(w.message) for w in got)
