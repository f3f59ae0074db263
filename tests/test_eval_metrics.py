"""eval_metrics against hand-computed values and an independent confusion-matrix recomputation."""

import numpy as np
import pytest

from geo_contrast import eval_metrics

NAMES = tuple(f"class_{i}" for i in range(6))


def _confusion_macro_f1(predictions, labels, num_classes):
    """Macro-F1 from a confusion matrix, averaged over classes with any support or any prediction."""
    confusion = np.zeros((num_classes, num_classes))
    for p, t in zip(predictions, labels):
        confusion[t, p] += 1
    scores = []
    for c in range(num_classes):
        tp = confusion[c, c]
        fp = confusion[:, c].sum() - tp
        fn = confusion[c, :].sum() - tp
        if tp + fp + fn == 0:
            continue
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        scores.append(0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall))
    return np.mean(scores)


def test_top_k_on_known_scores():
    scores = np.array([
        [0.1, 0.5, 0.2, 0.05, 0.1, 0.05],  # label 1: rank 1
        [0.3, 0.25, 0.2, 0.15, 0.06, 0.04],  # label 3: rank 4
        [0.3, 0.25, 0.2, 0.15, 0.06, 0.04],  # label 5: rank 6
        [0.2, 0.2, 0.2, 0.2, 0.1, 0.1],  # label 0: tied top, lowest index wins -> rank 1
        [0.2, 0.2, 0.2, 0.2, 0.1, 0.1],  # label 4: behind the four ties and before index 5 -> rank 5
    ])
    labels = np.array([1, 3, 5, 0, 4])
    assert eval_metrics.top_k_accuracy(scores, labels, 1) == pytest.approx(2 / 5)
    assert eval_metrics.top_k_accuracy(scores, labels, 4) == pytest.approx(3 / 5)
    assert eval_metrics.top_k_accuracy(scores, labels, 5) == pytest.approx(4 / 5)
    assert eval_metrics.top_k_accuracy(scores, labels, 6) == 1.0


def test_top1_equals_accuracy_of_argmax_on_random_scores():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(200, 6)).astype(float)  # Many ties.
    labels = rng.integers(0, 6, size=200)
    assert eval_metrics.top_k_accuracy(scores, labels, 1) == pytest.approx(np.mean(scores.argmax(1) == labels))


def test_top_k_refuses_k_beyond_classes():
    with pytest.raises(ValueError, match="k=7"):
        eval_metrics.top_k_accuracy(np.zeros((2, 6)), np.array([0, 1]), 7)


def test_macro_f1_hand_computed_with_absent_and_unpredicted_classes():
    labels = np.array([0, 0, 1, 1, 2, 0])
    predictions = np.array([0, 1, 1, 1, 0, 3])
    # class 0: TP 1, FP 1, FN 2 -> 2/5; class 1: TP 2, FP 1 -> 4/5; class 2 never predicted -> 0;
    # class 3 predicted but absent -> 0; classes 4 and 5 neither -> not averaged.
    expected = (2 / 5 + 4 / 5 + 0 + 0) / 4
    assert eval_metrics.macro_f1(predictions, labels) == pytest.approx(expected)
    classes, f1 = eval_metrics.per_class_f1(predictions, labels)
    np.testing.assert_array_equal(classes, [0, 1, 2, 3])
    np.testing.assert_allclose(f1, [2 / 5, 4 / 5, 0, 0])


def test_macro_f1_matches_confusion_matrix_on_random_predictions():
    rng = np.random.default_rng(1)
    for _ in range(20):
        labels = rng.integers(0, 9, size=50)
        predictions = np.where(rng.random(50) < 0.5, labels, rng.integers(0, 12, size=50))
        assert eval_metrics.macro_f1(predictions, labels) == pytest.approx(
            _confusion_macro_f1(predictions, labels, 12))


def test_location_vote_sums_softmax_rather_than_counting_image_votes():
    # Location 7 (class 1): two images lean to class 0, one is confident in class 1; summed [1.4, 1.6] -> 1.
    # Location 3 (class 0): both images pick class 0. Ids are not contiguous and images interleave.
    probs = np.array([[0.55, 0.45], [0.9, 0.1], [0.3, 0.7], [0.8, 0.2], [0.55, 0.45]])
    labels = np.array([1, 0, 1, 0, 1])
    locations = np.array([7, 3, 7, 3, 7])
    votes, location_labels = eval_metrics.location_votes(probs, labels, locations)
    np.testing.assert_allclose(votes, [[1.7, 0.3], [1.4, 1.6]])  # Ascending ids: 3, then 7.
    np.testing.assert_array_equal(location_labels, [0, 1])
    assert eval_metrics.top_k_accuracy(votes, location_labels, 1) == 1.0
    assert np.mean(probs.argmax(1) == labels) == pytest.approx(3 / 5)  # Per image, 2 of 3 images miss.


def test_location_vote_refuses_mixed_labels():
    with pytest.raises(ValueError, match="location 4"):
        eval_metrics.location_votes(np.ones((3, 2)) / 2, np.array([0, 1, 1]), np.array([4, 4, 5]))


def test_classification_report_on_known_predictions():
    logits = np.full((6, 6), -5.0)
    # (label, predicted class, location): two locations of class 0 and one of class 2.
    rows = [(0, 0, 0), (0, 1, 0), (0, 0, 0), (0, 2, 1), (2, 2, 2), (2, 1, 2)]
    for i, (_, predicted, _) in enumerate(rows):
        logits[i, predicted] = 5.0
        logits[i, 5] = 1.0  # Second choice of every image: class 5.
    labels = np.array([r[0] for r in rows])
    locations = np.array([r[2] for r in rows])
    report = eval_metrics.classification_report(eval_metrics.softmax(logits), labels, locations, NAMES)
    assert report["top1"] == pytest.approx(3 / 6)
    assert report["top5"] == pytest.approx(6 / 6)
    # Image level: class 0 TP 2 FN 2 FP 0 -> 4/6; class 1 FP 2 -> 0; class 2 TP 1 FP 1 FN 1 -> 1/2.
    assert report["macro_f1"] == pytest.approx((4 / 6 + 0 + 1 / 2) / 3)
    assert report["per_class_f1"] == pytest.approx({"class_0": 4 / 6, "class_1": 0.0, "class_2": 0.5})
    # Locations: 0 -> class 0 (two of three images), 1 -> class 2 (wrong), 2 -> a tie between classes 1 and 2
    # broken towards class 1 (wrong). Predicted [0, 2, 1] against [0, 0, 2].
    assert report["location_top1"] == pytest.approx(1 / 3)
    assert report["location_macro_f1"] == pytest.approx((2 / 3 + 0 + 0) / 3)
    assert (report["num_images"], report["num_locations"]) == (6, 3)
