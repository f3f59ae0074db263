"""Moving pytrees between the host and pmap's per-device layout (leading axis = local devices).

In a multi-process run these are still this process's devices only: pmap takes each process's local block
(laid out as `replicate` lays it out, so without a copy) as its part of the global array, and returns each
process its local block of the outputs.
"""

import jax
import numpy as np
from flax import jax_utils

from geo_contrast.train_step import AXIS


def replicate(tree, devices=None):
    """One copy per local device, laid out as `jax.pmap(axis_name=AXIS)` returns its outputs, so the first
    step does not recompile for a different input sharding."""
    return jax_utils.replicate(tree, devices=devices, axis_name=AXIS)


def unreplicate(tree):
    """The first local replica of each leaf, as a host numpy array (works for any device count, including a
    one-device pmap inside a multi-device process, where flax's helper keeps the leading axis)."""
    def first(x):
        if isinstance(x, jax.Array):
            return np.asarray(x.addressable_shards[0].data)[0]
        return np.asarray(x)[0]
    return jax.tree.map(first, tree)
