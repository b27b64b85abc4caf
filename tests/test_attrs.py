"""Every target's attribute dictionary, as ``jaxep/_cuda.py`` builds it, decodes as its handler's
attribute struct (``.Attrs<T>()``: the names and types must match the struct's members exactly),
checked without a GPU: the handlers are registered for the CPU platform too and called with
the operands and attributes that tracing the CUDA branch of every op passes
(``test_backends.test_cuda_branch_traces_every_target``). On a CPU only the stream context
(operand 0) may fail to decode; an attribute of the wrong name or type, or one missing or too
many, makes XLA report the attributes' operand too. A dictionary with one extra attribute must be
reported, which shows the dictionary is decoded at all."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxep import _cuda

import test_backends


def _bad_operands(target, out_types, args, attrs):
    """The operands XLA could not decode (0: the stream context, on a CPU); -1 stands for a wrong
    number of attributes, which a binding of single ``.Attr``s reports before it decodes any."""
    try:
        jax.block_until_ready(jax.ffi.ffi_call(target, out_types)(*args, **attrs))
    except Exception as e:  # noqa: BLE001 -- the decoder's report is what is tested
        m = re.search(r"bad operands at: ([0-9, ]+)", str(e))
        if m:
            return {int(i) for i in m.group(1).split(",")}
        return {-1} if "Wrong number of attributes" in str(e) else set()
    return set()


@pytest.mark.skipif(not _cuda.available(), reason="extension built without CUDA")
def test_every_target_decodes_the_attributes_python_passes(monkeypatch):
    calls = {}
    ffi = _cuda._ffi

    def record(target, out_types, args, axes=(), **attrs):
        avals = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args)
        calls.setdefault((target, tuple(sorted(attrs))), (out_types, avals, attrs))
        return ffi(target, out_types, args, axes, **attrs)

    monkeypatch.setattr(_cuda, "_ffi", record)
    test_backends.test_cuda_branch_traces_every_target()
    assert {t for t, _ in calls} == set(_cuda._ext.registrations())

    for name, capsule in _cuda._ext.registrations().items():
        jax.ffi.register_ffi_target("jaxep_cpu_probe_" + name, capsule, platform="cpu")
    for (target, _), (out_types, avals, attrs) in sorted(calls.items()):
        args = [jnp.zeros(a.shape, a.dtype) for a in avals]
        probe = "jaxep_cpu_probe_" + target
        bad = _bad_operands(probe, out_types, args, attrs)
        assert bad <= {0}, (target, {k: np.asarray(v).dtype for k, v in attrs.items()}, bad)
        # the dictionary is decoded at all: one attribute more is noticed
        spoiled = _bad_operands(probe, out_types, args, dict(attrs, jaxep_probe=np.int32(0)))
        assert spoiled - bad, (target, sorted(attrs), spoiled)
