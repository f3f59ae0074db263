"""Temporal pair sampling and the pretraining stream: shapes, determinism, and exact resumption."""

import numpy as np
import pytest
import tensorflow as tf

from geo_contrast import geo_clusters
from geo_contrast import input_pipeline


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
    builder = input_pipeline.load_builder("fmow/rgb_64", data_dir)
    index = input_pipeline.read_location_index(builder, "train")
    ds = input_pipeline.pretrain_dataset(
        builder,
        "train",
        temporal=temporal,
        image_size=16,
        crop_scale=(0.2, 1.0),
        global_batch=batch,
        host=input_pipeline.HostSlice(process, processes, devices),
        seed=3,
        start_step=start_step,
        images_per_epoch=int(index.num_images.sum()),
        shuffle_buffer=64,
    )
    return ds.as_numpy_iterator(), index


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
