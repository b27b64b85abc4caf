"""The command-line flags of one process per GPU, shared by ``examples/train_moe.py`` and the
benchmarks (``benchmarks/bench_normal.py``, ``benchmarks/bench_ll.py``); no dependency but jax.

``--distributed`` calls ``jax.distributed.initialize()``, which reads SLURM's or OpenMPI's
environment; ``--coordinator HOST:PORT --num-processes N --process-id I`` serve a plain launcher
(``benchmarks/launch_local.py`` or a shell loop). Either must run before anything asks jax for
its devices.
"""

from __future__ import annotations

import argparse


def add_distributed_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--distributed", action="store_true",
                   help="jax.distributed.initialize() from SLURM / OpenMPI (one process per GPU)")
    p.add_argument("--coordinator", default=None, help="host:port of process 0 (plain launcher)")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)


def wants_distributed(args) -> bool:
    """Whether ``args`` ask for a multi-process job."""
    return bool(getattr(args, "distributed", False) or getattr(args, "coordinator", None)
                or getattr(args, "num_processes", None)
                or getattr(args, "process_id", None) is not None)


def init_distributed(args) -> None:
    """Joins the multi-process job when asked to (before any other jax call)."""
    import jax

    if (getattr(args, "coordinator", None) or getattr(args, "num_processes", None)
            or getattr(args, "process_id", None) is not None):
        jax.distributed.initialize(coordinator_address=args.coordinator,
                                   num_processes=args.num_processes, process_id=args.process_id)
    elif getattr(args, "distributed", False):
        jax.distributed.initialize()
