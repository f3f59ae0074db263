"""The MoCo-v2 (+TP, +Geo) update, written for one device with named-axis collectives.

`train_step` runs under `jax.pmap(axis_name=AXIS)`; every cross-device fact (the global batch, the shuffle
permutation, the queue) is computed identically on all devices, so the state stays replicated without a
broadcast. Per step, following MoCo's `forward`:

1. momentum update of the key encoder's parameters from the current query encoder's (MoCo's
   `_momentum_update_key_encoder` runs over `parameters()` only);
2. keys from the key encoder with *shuffle BN*: the global key batch is permuted across every BN group of
   every device, encoded, and un-permuted, so a query and its key never share BN statistics. The key encoder
   normalises with its batch statistics and keeps running statistics of its own, as torch's BN in train mode;
3. InfoNCE of the queries against [own key, queue] (+ the geo-cluster cross-entropy on the query's
   un-normalised projection for the geo variants), gradients averaged over devices, one SGD step;
4. the global batch's keys enqueued FIFO.

A device's batch is split into `bn_groups` groups, each with its own BN statistics (a `vmap` over groups).
So 4 devices x 1 group and 1 device x 4 groups are the same computation, and one GPU trains with shuffle BN
(the PyTorch original refuses a single GPU).
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp
from jax import lax

from geo_contrast import losses
from geo_contrast import pixels
from geo_contrast.devices import AXIS


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # {"encoder": ..., "geo_head": ... (geo variants only)}
    batch_stats: Any  # The query encoder's BN running statistics.
    # The contrastive variants' key encoder and queue (None for geo-location classification only):
    key_params: Any  # EMA of params["encoder"].
    key_batch_stats: Any  # The key encoder's own BN running statistics (never used to normalise: kept as MoCo's).
    opt_state: Any
    queue: Any  # [queue_size, dim] L2-normalised keys; row `queue_ptr` is the oldest.
    queue_ptr: Any  # int32 scalar.
    rng: jax.Array  # Base key of the per-step randomness (the shuffle-BN permutation).


@flax.struct.dataclass
class StepConfig:
    """The static numbers of the step (hashable, so the step can be rebuilt identically on resume)."""

    temperature: float = flax.struct.field(pytree_node=False)
    momentum: float = flax.struct.field(pytree_node=False)
    bn_groups: int = flax.struct.field(pytree_node=False)
    infonce_weight: float = flax.struct.field(pytree_node=False)
    geo_weight: float = flax.struct.field(pytree_node=False)  # 0 turns the geo loss off.
    contrastive: bool = flax.struct.field(pytree_node=False, default=True)  # False: no key encoder, no queue.


def ema_update(ema, new, momentum):
    """`momentum * ema + (1 - momentum) * new`, leaf by leaf (MoCo's key-encoder update)."""
    return jax.tree.map(lambda e, n: momentum * e + (1.0 - momentum) * n, ema, new)


def enqueue(queue, ptr, keys):
    """Writes `keys` [n, d] into the FIFO `queue` at `ptr`; returns (queue, new ptr).

    The queue size is a multiple of n (validated with the config), so a batch never straddles the end.
    """
    n = keys.shape[0]
    queue = lax.dynamic_update_slice_in_dim(queue, keys.astype(queue.dtype), ptr, axis=0)
    return queue, (ptr + n) % queue.shape[0]


def apply_in_groups(apply_fn, variables, images, groups):
    """Runs a train-mode encoder with separate BN statistics for each of `groups` contiguous chunks.

    Returns the outputs in the original order and the BN statistics averaged over groups (what averaging over
    devices does for the per-device groups).
    """
    b = images.shape[0]
    grouped = images.reshape((groups, b // groups) + images.shape[1:])
    outputs, new_vars = jax.vmap(lambda x: apply_fn(variables, x, train=True, mutable=["batch_stats"]))(grouped)
    outputs = jax.tree.map(lambda y: y.reshape((b,) + y.shape[2:]), outputs)
    return outputs, jax.tree.map(lambda s: s.mean(axis=0), new_vars["batch_stats"])


def shuffle_bn_keys(apply_fn, variables, key_images, perm, groups):
    """Encodes this device's key images with shuffle BN; returns (own keys [b, d], all keys [n, d], the key
    encoder's updated BN running statistics on this device).

    `perm` is one permutation of the global batch, the same on every device: device i encodes the global
    images perm[i*b:(i+1)*b] (its groups get consecutive chunks), and the encoded global batch is put back in
    the original order, so each device reads its own keys and every device enqueues the same global batch.
    """
    b = key_images.shape[0]
    device = lax.axis_index(AXIS)
    everyone = lax.all_gather(key_images, AXIS, tiled=True)
    mine = jnp.take(everyone, lax.dynamic_slice_in_dim(perm, device * b, b), axis=0)
    (_, projection), batch_stats = apply_in_groups(apply_fn, variables, mine, groups)
    keys = losses.l2_normalize(projection.astype(jnp.float32))
    shuffled = lax.all_gather(keys, AXIS, tiled=True)
    ordered = jnp.zeros_like(shuffled).at[perm].set(shuffled)
    return lax.dynamic_slice_in_dim(ordered, device * b, b), ordered, batch_stats


def train_step(state, batch, *, encoder, geo_head, tx, lr_fn, cfg):
    """One MoCo update on this device's part of the global batch; see the module docstring.

    batch: {"query": [b, H, W, 3] uint8, "key": [b, H, W, 3] uint8 (contrastive variants only), "geo_label":
    [b] int32}. Without the contrastive loss (`cfg.contrastive` False: geo-location classification only) there
    is no key encoder, no key and no queue, and none is computed.
    Returns (new state, metrics averaged over devices).
    """
    query = pixels.standardize(batch["query"])
    if cfg.contrastive:
        b = query.shape[0]
        key_params = ema_update(state.key_params, state.params["encoder"], cfg.momentum)
        perm = jax.random.permutation(jax.random.fold_in(state.rng, state.step), b * lax.psum(1, AXIS))
        k, all_keys, key_batch_stats = shuffle_bn_keys(
            encoder.apply, {"params": key_params, "batch_stats": state.key_batch_stats},
            pixels.standardize(batch["key"]), perm, cfg.bn_groups)
        k = lax.stop_gradient(k)

    def loss_fn(params):
        (_, projection), batch_stats = apply_in_groups(
            encoder.apply,
            {"params": params["encoder"], "batch_stats": state.batch_stats},
            query,
            cfg.bn_groups,
        )
        projection = projection.astype(jnp.float32)
        metrics, loss = {}, 0.0
        if cfg.contrastive:
            nce, logits = losses.info_nce(losses.l2_normalize(projection), k, state.queue, cfg.temperature)
            metrics.update(info_nce=nce, contrastive_accuracy=losses.contrastive_accuracy(logits))
            loss = cfg.infonce_weight * nce
        if cfg.geo_weight:
            geo_logits = geo_head.apply({"params": params["geo_head"]}, projection).astype(jnp.float32)
            geo_ce = losses.geo_cross_entropy(geo_logits, batch["geo_label"])
            loss = loss + cfg.geo_weight * geo_ce
            metrics.update(geo_ce=geo_ce, geo_accuracy=losses.top1_accuracy(geo_logits, batch["geo_label"]))
        metrics["loss"] = loss
        return loss, (metrics, batch_stats)

    (_, (metrics, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = lax.pmean(grads, AXIS)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = jax.tree.map(lambda p, u: p + u, state.params, updates)
    metrics = lax.pmean(metrics, AXIS)
    metrics["lr"] = lr_fn(state.step)
    state = state.replace(step=state.step + 1, params=params, batch_stats=lax.pmean(batch_stats, AXIS),
                          opt_state=opt_state)
    if cfg.contrastive:
        queue, queue_ptr = enqueue(state.queue, state.queue_ptr, all_keys)
        state = state.replace(key_params=key_params, key_batch_stats=lax.pmean(key_batch_stats, AXIS),
                              queue=queue, queue_ptr=queue_ptr)
    return state, metrics
