"""A peer that never arrives fails the call within ``timeout_s``, never hangs it, and the error
names the waiting rank, the missing peer and the phase.

Ranks 0 and 1 of a 4-GPU communicator call dispatch; ranks 2 and 3 never do. The kernels on
ranks 0/1 give up after ``timeout_s``, record (rank, peer, phase) in host-mapped memory and trap.
A trap ends the CUDA context, so this runs in a subprocess.
"""

import subprocess
import sys
import textwrap
import time

import pytest

from conftest import subprocess_env
from jaxep import _cuda

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not _cuda.available(), reason="extension built without CUDA")]

SCRIPT = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, PartitionSpec as P
    import jaxep
    from jaxep import _cuda

    devices = jax.devices("gpu")
    cfg = jaxep.EPConfig(num_experts=8, num_topk=2, hidden=128, max_tokens_per_rank=16,
                         timeout_s=2.0)
    comm = jaxep.Communicator(Mesh(np.array(devices[:4]), ("ep",)), cfg, backend="cuda")
    assert comm.implementation("dispatch") == "cuda"
    only_two = Mesh(np.array(devices[:2]), ("ep",))   # ranks 2 and 3 never arrive

    def f(x, idx, w):
        return _cuda.dispatch(comm, x, idx, w, capacity=64)["x"]

    x = jnp.ones((32, 128), jnp.bfloat16)
    idx = jnp.tile(jnp.array([[0, 7]], jnp.int32), (32, 1))
    w = jnp.ones((32, 2), jnp.float32)
    try:
        jax.block_until_ready(jax.jit(jax.shard_map(
            f, mesh=only_two, in_specs=P("ep"), out_specs=P("ep")))(x, idx, w))
        print("NO ERROR FROM XLA")
    except Exception as e:  # the trapped kernel fails the jitted call
        print("XLA error:", type(e).__name__)
    try:
        comm.check()
    except RuntimeError as e:
        print("CHECK:", e)
        sys.exit(3)
    sys.exit(0)
""")


def test_missing_peer_times_out_with_clear_error():
    import jax

    if len(jax.devices("gpu")) < 4:
        pytest.skip("needs 4 GPUs")
    env = subprocess_env()
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          timeout=180, env=env)
    elapsed = time.monotonic() - start
    log = f"exit {proc.returncode} after {elapsed:.1f} s\n{proc.stdout}\n{proc.stderr[-4000:]}"
    assert proc.returncode == 3, log
    assert "NO ERROR FROM XLA" not in proc.stdout, log
    assert "timed out waiting for peer" in proc.stdout, log
    line = next(l for l in proc.stdout.splitlines() if l.startswith("CHECK:"))
    assert ("rank 0 timed out waiting for peer 2" in line
            or "rank 1 timed out waiting for peer 2" in line), log
    assert "dispatch (start barrier)" in line, log
