"""The weighted k-nearest-neighbour classifier that monitors pretraining (InstDisc, Wu et al. 2018; as in
solo-learn): pure numpy.

Each query image votes with its k nearest training images by cosine similarity, each neighbour's vote weighted by
exp(similarity / temperature); the class with the largest summed weight is the prediction. It needs no training,
so it can be read off the encoder every few thousand steps: a run whose encoder is not learning shows it early.
"""

import numpy as np


def _unit(features):
    features = np.asarray(features, np.float64)
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


def predict(train_features, train_labels, query_features, num_classes, k=20, temperature=0.07, chunk=1024):
    """Predicted class of every query row: argmax of the exp(cos / temperature)-weighted votes of its k nearest
    training rows (ties between classes to the lowest index; k capped at the training set's size)."""
    bank, labels = _unit(train_features), np.asarray(train_labels)
    k = min(k, len(bank))
    predictions = []
    for start in range(0, len(query_features), chunk):
        similarity = _unit(query_features[start:start + chunk]) @ bank.T
        nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
        weights = np.exp(np.take_along_axis(similarity, nearest, axis=1) / temperature)
        votes = np.zeros((len(similarity), num_classes))
        np.add.at(votes, (np.arange(len(similarity))[:, None], labels[nearest]), weights)
        predictions.append(votes.argmax(axis=1))
    return np.concatenate(predictions)


def top1(train_features, train_labels, query_features, query_labels, num_classes, k=20, temperature=0.07):
    return float(np.mean(predict(train_features, train_labels, query_features, num_classes, k, temperature)
                         == np.asarray(query_labels)))
