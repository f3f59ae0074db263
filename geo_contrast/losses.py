"""Pretraining losses and their metrics: MoCo's InfoNCE and the geo-location cross-entropy (pure jnp).

Everything is computed in float32 whatever the inputs' dtype: with the released temperature 0.02 the logits
are cosine similarities times 50, where bfloat16's 8-bit mantissa would blur differences between negatives.
Cross-entropies use a max-shifted log-sum-exp, so large logits cannot overflow. Shape errors raise at trace
time. The public functions are jitted so eager calls (evaluation, tests) run compiled; inside the jitted
train step they simply inline.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# The queue matmul must be exact float32: on TPU/GPU the default precision rounds inputs to bf16/tf32, which
# at temperature 0.02 moves logits by ~0.1. It costs B * K * D = 256 * 65536 * 128 flops, noise next to ResNet.
_PRECISION = jax.lax.Precision.HIGHEST


@jax.jit
def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||, eps) along the last axis, in float32 (torch.nn.functional.normalize's definition)."""
    x = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Batch mean of -log softmax(logits)[label], float32."""
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"expected logits [B, C] and labels [B], got {logits.shape} and {labels.shape}")
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(log_probs, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
    return -jnp.mean(picked)


@jax.jit
def info_nce(q: jax.Array, k: jax.Array, queue: jax.Array, temperature: float) -> tuple[jax.Array, jax.Array]:
    """MoCo's InfoNCE loss for L2-normalised queries q [B, D], their keys k [B, D] and a queue [K, D].

    Returns (loss, logits): logits [B, 1 + K] = [q.k, q @ queue.T] / temperature, so the positive is column 0
    and the loss is the batch-mean cross-entropy with target 0. The logits are returned for the accuracy
    metric. k and queue come from the EMA key encoder: stopping their gradients is the caller's job.
    """
    if q.ndim != 2 or k.shape != q.shape or queue.ndim != 2 or queue.shape[1] != q.shape[1]:
        raise ValueError(f"info_nce expects q, k [B, D] and queue [K, D]; got q {q.shape}, k {k.shape}, "
                         f"queue {queue.shape}")
    q, k, queue = (a.astype(jnp.float32) for a in (q, k, queue))
    positive = jnp.sum(q * k, axis=-1, keepdims=True)
    negatives = jnp.matmul(q, queue.T, precision=_PRECISION)
    logits = jnp.concatenate([positive, negatives], axis=1) / temperature
    loss = _cross_entropy(logits, jnp.zeros(q.shape[0], jnp.int32))
    return loss, logits


@jax.jit
def geo_cross_entropy(logits: jax.Array, cluster_ids: jax.Array) -> jax.Array:
    """Geo-location classification loss: batch-mean cross-entropy of logits [B, C] against cluster ids [B]."""
    return _cross_entropy(logits, cluster_ids)


@jax.jit
def top1_accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Fraction of rows whose argmax equals the label (float32 scalar); ties go to the lowest index."""
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"expected logits [B, C] and labels [B], got {logits.shape} and {labels.shape}")
    return jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))


@jax.jit
def contrastive_accuracy(logits: jax.Array) -> jax.Array:
    """Fraction of queries whose positive (column 0 of info_nce's logits) is the largest logit; ties count."""
    return top1_accuracy(logits, jnp.zeros(logits.shape[0], jnp.int32))
