"""Joining a multi-process run (several hosts, or several processes on one machine) before JAX starts.

Every process runs the same command; `jax.distributed.initialize` connects them through a coordinator (process
0) so that `jax.devices()` lists every process's devices and the collectives of the pmapped step span all
hosts. Two ways in:

- `auto`: JAX finds the coordinator, process count and id itself on Cloud TPU pods, SLURM, Open MPI and
  Kubernetes (JobSet), and from the JAX_COORDINATOR_ADDRESS environment variable.
- explicit: coordinator address, process count and this process's id, for clusters JAX does not detect; any
  of them left out is auto-detected. Several processes on one machine (2 processes x 2 CPU devices is how the
  tests run it) use CPU collectives over TCP (gloo, JAX's default).

It must run before anything touches a JAX backend.
"""

import jax
from absl import logging


class DistributedInitError(RuntimeError):
    pass


def initialize(*, auto, coordinator_address=None, num_processes=None, process_id=None):
    """Joins the run when `auto` or any explicit setting asks for it; returns whether it did.

    With neither, this is a single-process run and nothing happens.
    """
    explicit = {
        "coordinator_address": coordinator_address,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    if not auto and all(v is None for v in explicit.values()):
        return False
    # SIGTERM belongs to preemption.StopRequest, whose per-step vote already stops every process at the same
    # step; JAX's own preemption notifier would be a second owner of the same signal.
    jax.config.update("jax_enable_preemption_service", False)
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
        )
    except (ValueError, RuntimeError) as e:
        given = ", ".join(f"--{k}={v}" for k, v in explicit.items() if v is not None) or "none"
        raise DistributedInitError(
            f"Could not join the multi-process run (explicit settings: {given}): {e}. Outside a cluster JAX "
            "detects (Cloud TPU, SLURM, Open MPI, Kubernetes), pass --coordinator_address=HOST:PORT "
            "--num_processes=N --process_id=I on every process, the same address and N everywhere."
        ) from e
    logging.info(
        "Process %d of %d; %d local and %d global devices.",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True
