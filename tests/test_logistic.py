"""The converged readout (geo_contrast/logistic.py) against Newton's method written out here in float64, and the
weighted kNN monitor (geo_contrast/knn.py) against a brute-force loop."""

import numpy as np
import pytest

from geo_contrast import knn
from geo_contrast import logistic


def _newton(features, labels, num_classes, strength, iterations=50):
    """The same objective's minimiser by Newton's method with the exact Hessian: mean cross-entropy plus
    strength / 2 * ||W||^2 (bias unpenalised), over the stacked parameters [W (D x C) row-major, b (C)]."""
    n, d = features.shape
    x = np.hstack([features, np.ones((n, 1))])  # The bias as a constant feature.
    y = np.eye(num_classes)[labels]
    theta = np.zeros((d + 1, num_classes))
    penalty = np.diag([strength] * d + [0.0])
    for _ in range(iterations):
        z = x @ theta
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        grad = x.T @ (p - y) / n + penalty @ theta
        hessian = np.zeros(((d + 1) * num_classes,) * 2)
        for i in range(n):
            block = np.diag(p[i]) - np.outer(p[i], p[i])
            hessian += np.kron(np.outer(x[i], x[i]), block) / n
        hessian += np.kron(penalty, np.eye(num_classes)) + 1e-12 * np.eye(len(hessian))
        theta -= np.linalg.solve(hessian, grad.ravel()).reshape(theta.shape)
    return theta[:d], theta[d]


def _blobs(rng, n, d, num_classes, separation):
    labels = rng.integers(0, num_classes, n)
    centres = rng.normal(0.0, separation, (num_classes, d))
    return centres[labels] + rng.normal(0.0, 1.0, (n, d)), labels


@pytest.mark.parametrize("strength", [1e-3, 0.1, 3.0])
def test_fit_is_the_regularised_minimiser(strength):
    rng = np.random.default_rng(0)
    features, labels = _blobs(rng, 60, 4, 3, 1.0)
    weights, bias = _newton(features, labels, 3, strength)
    fit = logistic.fit(features, labels, 3, strength)
    assert fit.converged
    np.testing.assert_allclose(fit.weights, weights, atol=1e-5)
    # Softmax is invariant to a common shift of the biases (unpenalised): compare them centred.
    np.testing.assert_allclose(fit.bias - fit.bias.mean(), bias - bias.mean(), atol=1e-5)


def test_classes_absent_from_training_get_no_probability():
    rng = np.random.default_rng(1)
    features, labels = _blobs(rng, 50, 3, 2, 2.0)
    labels = np.where(labels == 0, 1, 4)  # Classes 1 and 4 of 6.
    fit = logistic.fit(features, labels, 6, 0.01)
    assert fit.converged
    logits = fit.logits(features)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    assert np.all(probs[:, [0, 2, 3, 5]] < 1e-300) and np.all(np.isfinite(probs))
    weights, bias = _newton(features, (labels == 4).astype(int), 2, 0.01)
    np.testing.assert_allclose(fit.weights[:, [1, 4]], weights, atol=1e-5)


def test_standardiser_uses_training_statistics_and_keeps_constant_features_at_zero():
    train = np.array([[1.0, 5.0], [3.0, 5.0]])
    standardise = logistic.Standardiser.fit(train)
    np.testing.assert_allclose(standardise(np.array([[2.0, 7.0], [4.0, 5.0]])), [[0.0, 2.0], [2.0, 0.0]])


def test_fit_on_val_keeps_the_strength_with_the_best_val_top1_and_the_stronger_one_on_ties():
    rng = np.random.default_rng(2)
    features, labels = _blobs(rng, 400, 8, 4, 0.6)
    train, val = slice(0, 200), slice(200, 400)
    strengths = (1e-4, 1e-2, 1.0, 100.0)
    best, standardise, scores = logistic.fit_on_val(features[train], labels[train], features[val], labels[val], 4,
                                                    strengths)
    top = max(scores.values())
    assert best.strength == max(s for s in strengths if scores[s] == top)
    # Each score is that strength's fit, from scratch, scored on val.
    for strength in strengths:
        fit = logistic.fit(standardise(features[train]), labels[train], 4, strength)
        assert scores[strength] == pytest.approx(np.mean(fit.logits(standardise(features[val])).argmax(1)
                                                         == labels[val]), abs=1 / 200)


def _knn_brute_force(train, train_labels, queries, num_classes, k, temperature):
    predictions = []
    for q in queries:
        sims = [float(np.dot(q, t) / np.linalg.norm(q) / np.linalg.norm(t)) for t in train]
        order = sorted(range(len(train)), key=lambda i: -sims[i])[:k]
        votes = [0.0] * num_classes
        for i in order:
            votes[train_labels[i]] += np.exp(sims[i] / temperature)
        predictions.append(int(np.argmax(votes)))
    return np.array(predictions)


@pytest.mark.parametrize("k", [1, 5, 200])
def test_knn_matches_brute_force(k):
    rng = np.random.default_rng(3)
    train, train_labels = _blobs(rng, 120, 6, 5, 1.0)
    queries, query_labels = _blobs(rng, 70, 6, 5, 1.0)
    expected = _knn_brute_force(train, train_labels, queries, 5, k, 0.07)
    np.testing.assert_array_equal(knn.predict(train, train_labels, queries, 5, k=k, temperature=0.07, chunk=16),
                                  expected)
    assert knn.top1(train, train_labels, queries, query_labels, 5, k=k) == pytest.approx(
        np.mean(expected == query_labels))


def test_knn_weights_votes_by_similarity():
    # Two neighbours of class 1 at similarity 0.6 outvote... unless the weights say otherwise: one neighbour of
    # class 0 at similarity 1.0 outweighs them at temperature 0.07 (e^(1/0.07) > 2 e^(0.6/0.07)).
    train = np.array([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]])
    assert knn.predict(train, np.array([0, 1, 1]), np.array([[1.0, 0.0]]), 2, k=3, temperature=0.07)[0] == 0
    assert knn.predict(train, np.array([0, 1, 1]), np.array([[1.0, 0.0]]), 2, k=3, temperature=10.0)[0] == 1
