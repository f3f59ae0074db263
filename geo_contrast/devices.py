"""The one device mechanism of every stage: a `jax.pmap` over a named axis, and moving pytrees to and from it.

Every stage writes its step for one device with named-axis collectives over `AXIS` (`lax.pmean`, `lax.psum`,
`lax.all_gather`) and runs it under `pmap`, whose inputs and outputs carry a leading axis of this process's
devices. `replicate` lays a host pytree out that way (one copy per device), `shard` splits a host batch into
per-device rows and copies it ahead of the step (prefetching), and `unreplicate` fetches the first replica.

In a multi-process run a `pmap` spans every device of every process by default (pretraining, fine-tuning: the
collectives are global and each process feeds its own devices' rows); `local=True` keeps a computation on this
process's devices (the linear probe, which every process runs whole on its own devices). Either way each process
hands pmap only its local block, laid out as `replicate` lays it out, so nothing is copied or recompiled.
"""

import functools

import jax
import numpy as np
from flax import jax_utils

AXIS = "batch"


def pmap(fn, *, local=False, donate_argnums=(), static_broadcasted_argnums=()):
    """`jax.pmap(fn)` over AXIS: all devices of all processes, or with `local` only this process's devices.

    A local pmap learns the devices at its first call, not when it is defined, so modules may define theirs at
    import time: listing devices starts JAX's backend, which must wait for `jax.distributed.initialize`.
    """
    kwargs = dict(axis_name=AXIS, donate_argnums=donate_argnums,
                  static_broadcasted_argnums=static_broadcasted_argnums)
    if not local:
        return jax.pmap(fn, **kwargs)

    @functools.cache
    def on_local_devices():
        return jax.pmap(fn, devices=jax.local_devices(), **kwargs)

    @functools.wraps(fn)
    def call(*args):
        return on_local_devices()(*args)

    return call


def replicate(tree, devices=None):
    """One copy per local device, laid out as `pmap` returns its outputs, so the first step does not recompile
    for a different input sharding."""
    return jax_utils.replicate(tree, devices=devices, axis_name=AXIS)


def unreplicate(tree):
    """The first local replica of each leaf, as a host numpy array (works for any device count, including a
    one-device pmap inside a multi-device process, where flax's helper keeps the leading axis)."""
    def first(x):
        if isinstance(x, jax.Array):
            return np.asarray(x.addressable_shards[0].data)[0]
        return np.asarray(x)[0]
    return jax.tree.map(first, tree)


def split_rows(batch, num_devices):
    """A host batch whose leading axis holds num_devices * per_device rows, as [num_devices, per_device, ...]."""
    def split(x):
        if x.shape[0] % num_devices:
            raise ValueError(f"A batch of {x.shape[0]} rows does not split over {num_devices} devices.")
        return x.reshape((num_devices, x.shape[0] // num_devices) + x.shape[1:])
    return jax.tree.map(split, batch)


def shard(batches, prefetch=2, devices=None):
    """Host batches already laid out [local devices, per_device, ...] (`split_rows`), copied to the devices
    `prefetch` batches ahead of the step that consumes them (so the copy overlaps the computation)."""
    return jax_utils.prefetch_to_device(batches, prefetch, devices=devices, axis_name=AXIS)
