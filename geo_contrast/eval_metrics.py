"""Classification metrics of the linear evaluation: pure numpy functions of scores, labels and locations.

Kept apart from the evaluation loop so every formula can be checked on hand-made predictions. Conventions:
- Predictions are the argmax of the scores, ties going to the lowest class index (numpy's argmax); top-k uses
  the same order (a stable sort of the negated scores), so top-1 always equals the accuracy of the predictions.
- Macro-F1 averages the per-class F1 over the classes that occur among the labels *or* the predictions
  (scikit-learn's `f1_score(average="macro")`): a class that is present but never predicted counts with F1 0,
  a class that is predicted but absent counts with F1 0, and a class that is neither does not count. The
  classifier has all 62 fMoW outputs, so on a split with fewer classes this is the only meaningful average.
- Per-location ("temporal", the paper's Table 2) scores sum the softmax of all images of a location; the
  location's prediction is the argmax of that sum.
"""

import numpy as np


def softmax(logits):
    """Row-wise softmax in float64, stable for large logits."""
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)


def top_k_accuracy(scores, labels, k):
    """Fraction of rows whose label is among the k highest scores (ties to the lower class index)."""
    scores, labels = _check_scores(scores, labels, "top_k_accuracy")
    if not 1 <= k <= scores.shape[1]:
        raise ValueError(f"top_k_accuracy: k={k} must be in [1, {scores.shape[1]}] (the number of classes).")
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(top == labels[:, None], axis=1)))


def per_class_f1(predictions, labels):
    """(classes, f1): the classes among labels or predictions, ascending, and each one's F1 = 2TP/(2TP+FP+FN)."""
    predictions = np.asarray(predictions, np.int64)
    labels = np.asarray(labels, np.int64)
    if predictions.shape != labels.shape or predictions.ndim != 1 or predictions.size == 0:
        raise ValueError(f"per_class_f1: predictions {predictions.shape} and labels {labels.shape} must be "
                         "non-empty vectors of equal length.")
    classes = np.union1d(labels, predictions)
    hit = predictions == labels
    tp = np.array([np.sum(hit & (labels == c)) for c in classes])
    predicted = np.array([np.sum(predictions == c) for c in classes])
    actual = np.array([np.sum(labels == c) for c in classes])
    # 2TP + FP + FN = predicted + actual, never 0 for a class in the union.
    return classes, 2.0 * tp / (predicted + actual)


def macro_f1(predictions, labels):
    """Mean per-class F1 over the classes present among labels or predictions (see the module docstring)."""
    _, f1 = per_class_f1(predictions, labels)
    return float(np.mean(f1))


def location_votes(scores, labels, location_ids):
    """Sums each location's image scores; returns (summed scores [L, C], location labels [L]).

    Locations are ordered by ascending id. Every image of a location must carry the location's label: a
    disagreement means the images were attributed to the wrong locations, so it is an error.
    """
    scores, labels = _check_scores(scores, labels, "location_votes")
    location_ids = np.asarray(location_ids)
    if location_ids.shape != labels.shape:
        raise ValueError(f"location_votes: location_ids {location_ids.shape} must match labels {labels.shape}.")
    unique, index = np.unique(location_ids, return_inverse=True)
    summed = np.zeros((unique.size, scores.shape[1]), np.float64)
    np.add.at(summed, index, scores)
    location_labels = np.full(unique.size, -1, np.int64)
    location_labels[index] = labels
    mismatch = np.flatnonzero(location_labels[index] != labels)
    if mismatch.size:
        bad = unique[index[mismatch[0]]]
        raise ValueError(f"location_votes: the images of location {bad} carry different labels.")
    return summed, location_labels


def classification_report(probs, labels, location_ids, class_names):
    """Every reported metric of one split from the classifier's softmax outputs.

    Returns a JSON-able dict: image-level top1/top5/macro_f1, the same at location level (summed softmax),
    per-class F1 of the image-level predictions keyed by class name, and the image and location counts.
    """
    probs, labels = _check_scores(probs, labels, "classification_report")
    if probs.shape[1] != len(class_names):
        raise ValueError(f"classification_report: {probs.shape[1]} scores per image but {len(class_names)} "
                         "class names.")
    votes, location_labels = location_votes(probs, labels, location_ids)
    predictions = probs.argmax(axis=1)
    classes, f1 = per_class_f1(predictions, labels)
    return {
        "top1": top_k_accuracy(probs, labels, 1),
        "top5": top_k_accuracy(probs, labels, 5),
        "macro_f1": float(np.mean(f1)),
        "location_top1": top_k_accuracy(votes, location_labels, 1),
        "location_top5": top_k_accuracy(votes, location_labels, 5),
        "location_macro_f1": macro_f1(votes.argmax(axis=1), location_labels),
        "per_class_f1": {class_names[c]: float(v) for c, v in zip(classes, f1)},
        "num_images": int(labels.size),
        "num_locations": int(location_labels.size),
    }


def _check_scores(scores, labels, where):
    scores = np.asarray(scores)
    labels = np.asarray(labels)
    if scores.ndim != 2 or labels.shape != (scores.shape[0],) or scores.shape[0] == 0:
        raise ValueError(f"{where}: need scores [N, C] and labels [N] with N > 0, got {scores.shape} and "
                         f"{labels.shape}.")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= scores.shape[1]:
        raise ValueError(f"{where}: labels must be integers in [0, {scores.shape[1]}), got {labels.dtype} "
                         f"in [{labels.min()}, {labels.max()}].")
    return scores, labels.astype(np.int64)
