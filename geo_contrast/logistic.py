"""A linear readout fitted to convergence: L2-regularised multinomial logistic regression on standardised features
(numpy/scipy, float64).

The released probe (SGD for 100 epochs at lr 30, the best epoch picked) measures the encoder through a noisy
optimiser: on a small dataset its selected epoch and its final accuracy move with the probe's own seed and
schedule. A convex problem solved to convergence has one answer per regularisation strength, so the readout
measures the features alone; the strength is chosen on val, and test is scored once with it. Features are
standardised with the training split's mean and standard deviation, so one grid of strengths suits any encoder.
"""

import dataclasses

import numpy as np
from scipy import optimize

# Regularisation strengths tried (the L2 penalty on the weights, per image): 1e-5 .. 1e1, four per decade.
STRENGTHS = tuple(float(s) for s in np.logspace(-5, 1, 25))


@dataclasses.dataclass(frozen=True)
class Standardiser:
    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, features):
        features = np.asarray(features, np.float64)
        std = features.std(axis=0)
        return cls(features.mean(axis=0), np.where(std > 1e-12, std, 1.0))  # Constant features stay 0.

    def __call__(self, features):
        return (np.asarray(features, np.float64) - self.mean) / self.scale


def _unpack(flat, d, c):
    """(W [D, C], b [C]) of the solver's flat parameter vector [W row-major, b]."""
    return flat[:d * c].reshape(d, c), flat[d * c:]


def _log_probs(features, weights, bias):
    logits = features @ weights + bias
    logits -= logits.max(axis=1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))


def _objective(flat, features, onehot, strength):
    """Mean cross-entropy + strength / 2 * ||W||^2 and its gradient, for flat = [W (D x C), b (C)]."""
    n, d = features.shape
    weights, bias = _unpack(flat, d, onehot.shape[1])
    log_probs = _log_probs(features, weights, bias)
    loss = -np.sum(onehot * log_probs) / n + 0.5 * strength * np.sum(weights * weights)
    residual = (np.exp(log_probs) - onehot) / n
    gradient = np.concatenate([(features.T @ residual + strength * weights).ravel(), residual.sum(axis=0)])
    return loss, gradient


def _hessian_product(flat, vector, features, onehot, strength):
    """The objective's Hessian at `flat` times `vector` (same layout), without forming the Hessian: for softmax
    probabilities P and Z = X V + v_b, the data term's product is X^T R / n with R = P * (Z - rowsum(P * Z))."""
    n, d = features.shape
    c = onehot.shape[1]
    probs = np.exp(_log_probs(features, *_unpack(flat, d, c)))
    v_weights, v_bias = _unpack(vector, d, c)
    z = features @ v_weights + v_bias
    r = probs * (z - np.sum(probs * z, axis=1, keepdims=True)) / n
    return np.concatenate([(features.T @ r + strength * v_weights).ravel(), r.sum(axis=0)])


@dataclasses.dataclass(frozen=True)
class Fit:
    weights: np.ndarray  # [D, C]
    bias: np.ndarray  # [C]
    strength: float
    converged: bool

    def logits(self, features):
        return features @ self.weights + self.bias


# The bias of a class absent from the training labels: the unregularised optimum is -infinity (so the solver would
# never converge); a finite floor keeps softmax exact (exp underflows to 0) and free of inf - inf.
_ABSENT_BIAS = -1e4


def fit(features, labels, num_classes, strength, start=None):
    """The minimiser of the regularised loss (Newton's method in a trust region, the Newton steps solved by
    conjugate gradients on Hessian-vector products, to a gradient norm of 1e-8: a few dozen steps where L-BFGS
    takes hundreds at weak regularisation), from `start` (a Fit: a neighbouring strength's solution, which makes
    the grid cheap) or zeros. Only the classes present in `labels`
    are fitted; the others get zero weights and a bias that no image ever reaches."""
    features = np.asarray(features, np.float64)
    present, index = np.unique(np.asarray(labels), return_inverse=True)
    onehot = np.eye(len(present))[index]
    d, c = features.shape[1], len(present)
    x0 = (np.concatenate([start.weights[:, present].ravel(), start.bias[present]]) if start is not None
          else np.zeros(d * c + c))
    result = optimize.minimize(_objective, x0, args=(features, onehot, strength), jac=True,
                               hessp=_hessian_product, method="trust-ncg", options={"maxiter": 500, "gtol": 1e-8})
    weights, bias = np.zeros((d, num_classes)), np.full(num_classes, _ABSENT_BIAS)
    weights[:, present], bias[present] = _unpack(result.x, d, c)
    return Fit(weights, bias, strength, bool(result.success))


def fit_on_val(train_features, train_labels, val_features, val_labels, num_classes, strengths=STRENGTHS):
    """(the fit with the best val top-1 over `strengths`, the standardiser, every strength's val top-1).

    Ties go to the stronger regularisation (the simpler classifier). Strengths are fitted from the strongest
    down, each starting from the previous solution.
    """
    standardise = Standardiser.fit(train_features)
    train, val = standardise(train_features), standardise(val_features)
    best, previous, scores = None, None, {}
    for strength in sorted(strengths, reverse=True):
        previous = fit(train, train_labels, num_classes, strength, start=previous)
        scores[strength] = float(np.mean(previous.logits(val).argmax(axis=1) == val_labels))
        if best is None or scores[strength] > scores[best.strength]:
            best = previous
    return best, standardise, scores
