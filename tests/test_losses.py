"""Losses and metrics against explicit numpy re-derivations (float64 loops)."""

import jax.numpy as jnp
import numpy as np
import pytest

from geo_contrast.losses import contrastive_accuracy, geo_cross_entropy, info_nce, l2_normalize, top1_accuracy


def _unit_rows(rng, n, d):
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _np_cross_entropy(logits, labels):
    """Mean over rows of logsumexp(row) - row[label], with the max shifted out per row."""
    losses = []
    for row, label in zip(np.asarray(logits, np.float64), labels):
        m = row.max()
        losses.append(m + np.log(np.sum(np.exp(row - m))) - row[label])
    return np.mean(losses)


@pytest.mark.parametrize("temperature", [0.2, 0.02])
def test_info_nce_matches_numpy(temperature):
    rng = np.random.default_rng(0)
    q, k, queue = _unit_rows(rng, 8, 16), _unit_rows(rng, 8, 16), _unit_rows(rng, 32, 16)
    expected_logits = np.zeros((8, 33))
    losses = []
    for i in range(8):
        expected_logits[i, 0] = np.dot(q[i], k[i]) / temperature
        for j in range(32):
            expected_logits[i, 1 + j] = np.dot(q[i], queue[j]) / temperature
        losses.append(np.log(np.sum(np.exp(expected_logits[i]))) - expected_logits[i, 0])
    loss, logits = info_nce(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32),
                            jnp.asarray(queue, jnp.float32), temperature)
    assert logits.dtype == jnp.float32 and logits.shape == (8, 33)
    np.testing.assert_allclose(logits, expected_logits, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(loss, np.mean(losses), rtol=1e-5)


def test_info_nce_positive_is_column_zero():
    rng = np.random.default_rng(1)
    q, queue = _unit_rows(rng, 4, 8), _unit_rows(rng, 16, 8)
    # The key equals the query: the positive logit is 1 / tau, the largest possible, and sits in column 0.
    loss, logits = info_nce(jnp.asarray(q), jnp.asarray(q), jnp.asarray(queue), 0.02)
    np.testing.assert_allclose(logits[:, 0], 50.0, rtol=1e-6)
    np.testing.assert_allclose(logits[:, 1:], q @ queue.T / 0.02, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(loss, _np_cross_entropy(np.asarray(logits), np.zeros(4, int)), atol=1e-6)


def test_info_nce_accepts_bfloat16_and_computes_in_float32():
    rng = np.random.default_rng(2)
    q, k, queue = (jnp.asarray(_unit_rows(rng, n, 8), jnp.bfloat16) for n in (4, 4, 16))
    loss, logits = info_nce(q, k, queue, 0.02)
    assert loss.dtype == jnp.float32 and logits.dtype == jnp.float32
    q, k, queue = (np.asarray(a, np.float64) for a in (q, k, queue))
    expected = np.concatenate([np.sum(q * k, axis=1, keepdims=True), q @ queue.T], axis=1) / 0.02
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-4)


def test_info_nce_rejects_mismatched_shapes():
    q = jnp.zeros((4, 8))
    with pytest.raises(ValueError, match="queue"):
        info_nce(q, q, jnp.zeros((16, 7)), 0.2)
    with pytest.raises(ValueError, match="k"):
        info_nce(q, jnp.zeros((3, 8)), jnp.zeros((16, 8)), 0.2)


@pytest.mark.parametrize("scale", [1.0, 50.0, 2000.0])
def test_geo_cross_entropy_matches_numpy(scale):
    """scale 2000 puts logits far past float32's exp overflow (~88): only a shifted log-sum-exp survives."""
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(16, 100)) * scale
    labels = rng.integers(0, 100, size=16)
    loss = geo_cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(labels, jnp.int32))
    assert np.isfinite(loss)
    np.testing.assert_allclose(loss, _np_cross_entropy(np.float32(logits), labels), rtol=1e-5, atol=1e-3)


def test_geo_cross_entropy_rejects_mismatched_labels():
    with pytest.raises(ValueError, match="labels"):
        geo_cross_entropy(jnp.zeros((4, 10)), jnp.zeros((5,), jnp.int32))


def test_top1_accuracy_matches_numpy():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(64, 10))
    labels = rng.integers(0, 10, size=64)
    labels[:20] = np.argmax(logits[:20], axis=1)  # some certainly right
    expected = np.mean([np.argmax(row) == label for row, label in zip(logits, labels)])
    assert 20 / 64 <= expected < 1
    np.testing.assert_allclose(top1_accuracy(jnp.asarray(logits), jnp.asarray(labels)), expected, rtol=1e-6)


def test_contrastive_accuracy_counts_rows_whose_positive_is_max():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(32, 9))
    logits[:10, 0] = 10.0  # positive certainly the max
    logits[10, 0] = logits[10, 1:].max()  # a tie counts as correct
    expected = np.mean([row[0] >= row[1:].max() for row in logits])
    assert 11 / 32 <= expected < 1
    np.testing.assert_allclose(contrastive_accuracy(jnp.asarray(logits, jnp.float32)), expected, rtol=1e-6)


def test_l2_normalize():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(5, 7)) * 30
    x[2] = 0.0
    x_bf16 = jnp.asarray(x, jnp.bfloat16)
    out = np.asarray(l2_normalize(x_bf16))
    assert out.dtype == np.float32
    x = np.asarray(x_bf16, np.float64)
    expected = x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(out[2], 0.0)  # a zero vector stays zero rather than NaN
