"""Shared fixtures. Tests run on 8 virtual CPU devices unless marked ``gpu``."""

import os
from pathlib import Path

# Must be set before jax initialises its backends; the CPU platform gets 8 virtual devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import Mesh, PartitionSpec as P  # noqa: E402

import jaxep  # noqa: E402


def _gpus():
    try:
        return jax.devices("gpu")
    except RuntimeError:
        return []


def pytest_collection_modifyitems(config, items):
    if _gpus():
        return
    skip = pytest.mark.skip(reason="needs CUDA GPUs")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


REPO = Path(__file__).resolve().parent.parent


def subprocess_env(**overrides: str) -> dict:
    """``os.environ`` with ``overrides`` and the repository first on ``PYTHONPATH``: the
    environment of a test that runs jaxep in a child process (jax flags must precede jax's
    initialisation, so such tests cannot run in this one)."""
    env = dict(os.environ, **overrides)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + path if path else "")
    return env


def make_mesh(num_ranks: int, platform: str = "cpu", axis: str = "ep") -> Mesh:
    devices = jax.devices(platform)
    if len(devices) < num_ranks:
        pytest.skip(f"needs {num_ranks} {platform} devices, have {len(devices)}")
    return Mesh(np.array(devices[:num_ranks]), (axis,))


def ep_call(comm, fn):
    """``jit(shard_map(fn))`` over the communicator's mesh, every argument and output split
    along its leading dim over the EP axis (scalars per rank: return them as ``x[None]``)."""
    spec = P(comm.cfg.axis_name)
    return jax.jit(jax.shard_map(fn, mesh=comm.mesh, in_specs=spec, out_specs=spec))


@pytest.fixture
def cpu_comm():
    """Factory: ``cpu_comm(R, **EPConfig fields)`` -> Communicator on R CPU devices (xla)."""

    def make(num_ranks, backend="xla", **cfg):
        return jaxep.Communicator(make_mesh(num_ranks), jaxep.EPConfig(**cfg), backend=backend)

    return make
