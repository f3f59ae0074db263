"""Temporal pair sampling and the pretraining stream: shapes, determinism, and exact resumption."""

import numpy as np
import pytest
import tensorflow as tf

from geo_contrast import geo_clusters
from geo_contrast import input_pipeline
from geo_contrast import records


def _draws(query_index, num_images, temporal, n=400):
    return np.array(
        [
            int(
                input_pipeline.sample_key_index(
                    tf.constant(query_index, tf.int64),
                    tf.constant(num_images, tf.int64),
                    tf.constant([i, 17], tf.int64),
                    temporal,
                )
            )
            for i in range(n)
        ]
    )


@pytest.mark.parametrize("num_images,query_index", [(2, 0), (2, 1), (5, 0), (5, 3), (21, 20)])
def test_temporal_key_is_never_the_query_and_covers_every_other_image(num_images, query_index):
    draws = _draws(query_index, num_images, temporal=True)
    assert np.all(draws != query_index)
    assert np.all((draws >= 0) & (draws < num_images))
    others = sorted(set(range(num_images)) - {query_index})
    counts = np.array([np.sum(draws == o) for o in others])
    assert set(draws) == set(others)
    # Uniform over the other images: each count within 5 binomial sigmas of its expectation.
    p = 1 / len(others)
    assert np.all(np.abs(counts - 400 * p) <= 5 * np.sqrt(400 * p * (1 - p)))


def test_single_image_location_pairs_the_image_with_itself():
    assert np.all(_draws(0, 1, temporal=True) == 0)


def test_without_temporal_positives_the_key_is_the_query():
    assert np.all(_draws(3, 5, temporal=False) == 3)


def _stream(data_dir, start_step, *, temporal=True, batch=4, devices=1, process=0, processes=1):
    builder = records.load_builder("fmow", data_dir)
    index = records.read_location_index(builder, "train")
    ds = input_pipeline.pretrain_dataset(
        builder, "train", index, temporal=temporal, views=input_pipeline.Views(16, (0.2, 1.0), "center_square"),
        global_batch=batch, host=input_pipeline.HostSlice(process, processes, devices), seed=3,
        start_step=start_step)
    return ds.as_numpy_iterator(), index


# ---------------------------------------------------------------------------------------------------------------
# The epoch order: a full permutation of the images, so a location's images are spread over the whole epoch.


def _index(num_locations=3000, seed=0):
    """A split of many multi-image locations (1..8 images, ~4.5 on average as in fMoW's 4.4)."""
    counts = np.random.default_rng(seed).integers(1, 9, num_locations)
    return records.LocationIndex(np.zeros((num_locations, 2), np.float32), counts)


def _siblings_before(locations, window):
    """For each position p >= window, how many of the `window` positions before it hold an image of p's
    location (the queue's false negatives under temporal positives, were the queue `window` keys long)."""
    counts = []
    for p in range(window, len(locations)):
        counts.append(np.sum(locations[p - window:p] == locations[p]))
    return np.array(counts)


def _permutation_expectation(index, window):
    """E[siblings among the previous `window` positions] under a uniformly random order of the images: each of a
    query's n - 1 siblings is in any given other position with probability 1 / (N - 1)."""
    n = index.num_images.astype(np.float64)
    total = n.sum()
    return window / (total - 1) * np.sum(n * (n - 1)) / total


def _grouped_order(index, seed, buffer):
    """The order the stream had before: locations shuffled, each one's images entering together, then a shuffle
    buffer of `buffer` images (tf.data's algorithm: draw uniformly from the buffer, refill from the stream)."""
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(len(index.num_images))
    stream = np.repeat(shuffled, index.num_images[shuffled])
    pool, out = [], []
    for item in stream:
        pool.append(item)
        if len(pool) == buffer:
            out.append(pool.pop(rng.integers(len(pool))))
    while pool:
        out.append(pool.pop(rng.integers(len(pool))))
    return np.array(out)


def test_siblings_before_a_query_are_those_of_a_full_permutation():
    """Each epoch is a uniformly random permutation of the images: the mean number of a query's siblings among
    the previous Q positions is the permutation's expectation, within sampling noise; the order the stream had
    before (locations entering whole, a 2,048-image shuffle buffer) holds several times more of them."""
    index, window = _index(), 1024
    host = input_pipeline.HostSlice(0, 1, 1)
    expected = _permutation_expectation(index, window)
    location_of = np.repeat(np.arange(len(index.num_images)), index.num_images)
    # The sampling noise of the mean: its spread over independently drawn permutations.
    noise = np.std([_siblings_before(location_of[np.random.default_rng(100 + i).permutation(len(location_of))],
                                     window).mean() for i in range(6)])
    for seed in (0, 1):
        chunks = input_pipeline.stream_positions(index, seed=seed, global_batch=8, host=host, start=0)
        locations = np.concatenate([next(chunks)["location"] for _ in range(-(-len(location_of) // 256))])
        assert sorted(locations) == sorted(location_of)  # The epoch visits every image once.
        assert abs(_siblings_before(locations, window).mean() - expected) < 4 * noise
    grouped = _siblings_before(_grouped_order(index, 0, buffer=2048), window).mean()
    assert grouped - expected > 20 * noise  # ~2.9x the expectation.


def test_batches_are_laid_out_for_pmap_as_uint8_pixels(tiny_fmow):
    it, _ = _stream(tiny_fmow[0], 0, batch=4, devices=2)
    batch = next(it)
    assert batch["query"].shape == (2, 2, 16, 16, 3) and batch["key"].shape == (2, 2, 16, 16, 3)
    assert batch["query"].dtype == np.uint8 and batch["key"].dtype == np.uint8
    assert batch["coordinates"].shape == (2, 2, 2)
    assert batch["query"].std() > 5  # Real image content, standardised later on the accelerator.


def test_stream_is_deterministic_and_resumes_exactly(tiny_fmow):
    """A stream started at step s equals an uninterrupted stream from step s on, across an epoch boundary."""
    it, index = _stream(tiny_fmow[0], 0)
    steps_per_epoch = int(index.num_images.sum()) // 4
    uninterrupted = [next(it) for _ in range(steps_per_epoch + 3)]
    again, _ = _stream(tiny_fmow[0], 0)
    np.testing.assert_array_equal(next(again)["query"], uninterrupted[0]["query"])
    start = steps_per_epoch - 1  # Resume one step before the epoch ends.
    resumed, _ = _stream(tiny_fmow[0], start)
    for expected in uninterrupted[start:]:
        got = next(resumed)
        for name in ("query", "key", "coordinates"):
            np.testing.assert_array_equal(got[name], expected[name])


def test_an_epoch_visits_every_image_once(tiny_fmow):
    """Over one epoch the query coordinates are those of every image (each location once per image)."""
    it, index = _stream(tiny_fmow[0], 0, batch=1)
    n = int(index.num_images.sum())
    seen = np.concatenate([next(it)["coordinates"].reshape(-1, 2) for _ in range(n)])
    key = lambda a: sorted(map(tuple, np.round(a, 4)))
    assert key(seen) == key(index.image_coordinates)


def test_processes_split_the_same_global_batches(tiny_fmow):
    """2 processes x 2 devices see, device by device, the global batches of 1 process x 4 devices, from the
    start and after a resume: the global stream does not depend on the process count."""
    steps = 4
    for start in (0, 5):
        single, _ = _stream(tiny_fmow[0], start, batch=8, devices=4)
        first, _ = _stream(tiny_fmow[0], start, batch=8, devices=2, process=0, processes=2)
        second, _ = _stream(tiny_fmow[0], start, batch=8, devices=2, process=1, processes=2)
        for _ in range(steps):
            whole, a, b = next(single), next(first), next(second)
            assert a["query"].shape == (2, 2, 16, 16, 3)
            for name in ("query", "key", "coordinates"):
                np.testing.assert_array_equal(np.concatenate([a[name], b[name]]), whole[name])
            assert not np.array_equal(a["query"], b["query"])


def test_with_geo_labels_assigns_the_nearest_centroid():
    centroids = geo_clusters.fit(np.array([[0, 0], [0, 90], [45, -90]], np.float32), 3, seed=0)
    coords = np.array([[[1, 1], [1, 89]], [[44, -91], [-1, -1]]], np.float32)
    out = next(input_pipeline.with_geo_labels(iter([{"coordinates": coords}]), centroids))
    expected = geo_clusters.assign(coords.reshape(-1, 2), centroids).reshape(2, 2)
    np.testing.assert_array_equal(out["geo_label"], expected)
    assert len(set(out["geo_label"].ravel())) == 3 and out["geo_label"][0, 0] == out["geo_label"][1, 1]
