"""tf.data pipelines over the built TFDS datasets: temporal MoCo pairs for pretraining, and one element per
image under the evaluation views (the linear probe).

Design (why it looks like this):
- The stored examples are *locations* (a time series of JPEGs). An epoch runs over *images*, as in the
  paper: each location expands into one element per image (the query), paired with a key image chosen by
  `sample_key_index`. Images stay encoded until the pair is chosen, so only the two JPEGs a pair uses are
  ever decoded, and RandomResizedCrop decodes only its window (`augment.decode_random_resized_crop`).
- One global stream, whatever the number of processes. Every process builds the same stream of *encoded*
  pairs over the whole split and cuts it into global batches; row r of a global batch goes to global device
  r // per_device_batch, and pmap numbers devices process by process, so each process keeps only the rows of
  its own devices (a contiguous block, `HostSlice`) and decodes and augments only those. The global batches,
  and therefore the losses, are the same on 1 process x 4 devices as on 2 processes x 2 devices. Reading
  every record on every host costs I/O of the encoded split per host and epoch (a few GB for fMoW-rgb);
  decoding, the expensive part, is divided among the hosts.
- Everything random is a pure function of (seed, epoch, position): the per-epoch shuffles are seeded with the
  epoch, the key choice with the location's index in the epoch, the augmentations with the element's index in
  the global stream. A run restarted at step s rebuilds the same stream and skips to element
  s * global_batch of it (at most one epoch is re-read, never decoded), so a resumed run sees the batches an
  uninterrupted run would have seen.
"""

import dataclasses
import os

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from geo_contrast import augment
from geo_contrast import geo_clusters

_MAX_INT = np.iinfo(np.int64).max


def hide_accelerators_from_tf():
    """Keeps TensorFlow (tf.data only) off GPUs/TPUs, which belong to JAX."""
    tf.config.set_visible_devices([], "GPU")
    tf.config.set_visible_devices([], "TPU")


class DatasetNotFoundError(FileNotFoundError):
    """The configured dataset is not built where the config points; the message says how to build it."""


def load_builder(name, data_dir):
    """The prepared TFDS builder `name`, or an error that says the exact command that prepares it."""
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
        dataset, _, config = name.partition("/")
        where = f" --data_dir={data_dir}" if data_dir else ""
        cfg = f" --config={config}" if config else ""
        raise DatasetNotFoundError(
            f"The dataset {name!r} (config.dataset.name) is not built in {builder.data_dir!r} "
            f"(config.dataset.data_dir). Build it first:\n"
            f"  tfds build tfds_builders/{dataset} --manual_dir=PATH_TO_RELEASE{cfg}{where}\n"
            f"(see tfds_builders/{dataset}/README.md for the download), or point --config.dataset.data_dir at "
            "the directory that holds it."
        )
    return builder


@dataclasses.dataclass(frozen=True)
class LocationIndex:
    """Per-location facts read once from a split: where each location is and how many images it has."""

    coordinates: np.ndarray  # [L, 2] float32, (lat, lon) degrees.
    num_images: np.ndarray  # [L] int64.

    @property
    def num_distinct_locations(self):
        """Distinct places: the most geo clusters k-means can form from this split."""
        return len(np.unique(self.coordinates, axis=0))

    @property
    def image_coordinates(self):
        """One row per image: the paper clusters the training *images'* coordinates."""
        return np.repeat(self.coordinates, self.num_images, axis=0)


def is_time_series(builder):
    """fMoW-style datasets store a location's time series ("images"); single-image datasets (GeoImageNet) one
    "image" per example, which this module reads as a location with one image."""
    return "images" in builder.info.features


def encoded_locations(builder, split, read_config=None):
    """`split` in stored order as {"images": [T] encoded JPEGs, "coordinates", "label"}, for either schema."""
    key = "images" if is_time_series(builder) else "image"
    ds = builder.as_dataset(
        split=split, shuffle_files=False, decoders={key: tfds.decode.SkipDecoding()}, read_config=read_config
    )
    as_series = (lambda images: images) if key == "images" else (lambda image: image[None])
    return ds.map(
        lambda ex: {"images": as_series(ex[key]), "coordinates": ex["coordinates"], "label": ex["label"]}
    )


def read_location_index(builder, split):
    """Reads coordinates and image counts of every location in `split`, without decoding any image."""
    if is_time_series(builder):
        ds = builder.as_dataset(
            split=split,
            shuffle_files=False,
            decoders=tfds.decode.PartialDecoding({"coordinates": True, "timestamps": True}),
        )
        ds = ds.map(
            lambda ex: (ex["coordinates"], tf.size(ex["timestamps"], out_type=tf.int64)),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    else:
        ds = builder.as_dataset(
            split=split, shuffle_files=False, decoders=tfds.decode.PartialDecoding({"coordinates": True})
        )
        ds = ds.map(lambda ex: (ex["coordinates"], tf.constant(1, tf.int64)))
    coords, counts = [], []
    for c, n in ds.batch(4096).as_numpy_iterator():
        coords.append(c)
        counts.append(n)
    if not coords:
        raise ValueError(f"Split {split!r} of {builder.info.full_name} has no locations.")
    return LocationIndex(np.concatenate(coords).astype(np.float32), np.concatenate(counts))


def sample_key_index(query_index, num_images, seed, temporal):
    """The index of the key image paired with image `query_index` of a location with `num_images` images.

    Temporal positives (the paper's TP): uniform over the location's *other* images, the query itself only
    when the location has a single image. Otherwise the key is the query image (MoCo's two views).
    """
    if not temporal:
        return query_index
    offset = tf.random.stateless_uniform([], seed, minval=1, maxval=tf.maximum(num_images, 2), dtype=tf.int64)
    return tf.where(num_images > 1, (query_index + offset) % num_images, query_index)


def _pairs_of_epoch(locations, epoch, *, seed, temporal, shuffle_buffer):
    """One epoch of (query JPEG, key JPEG, coordinates), shuffled over images, as a function of `epoch`."""
    epoch_seed = seed * 1_000_003 + epoch

    def expand(location_index, ex):
        images = ex["images"]
        n = tf.shape(images, out_type=tf.int64)[0]
        loc_seed = tf.random.experimental.stateless_fold_in(tf.stack([epoch_seed, 0]), location_index)

        def pair(t):
            key_t = sample_key_index(t, n, tf.random.experimental.stateless_fold_in(loc_seed, t), temporal)
            return {"query": images[t], "key": images[key_t], "coordinates": ex["coordinates"]}

        return tf.data.Dataset.range(n).map(pair)

    return (
        locations.shuffle(max(shuffle_buffer // 8, 1), seed=epoch_seed)
        .enumerate()
        .flat_map(expand)
        .shuffle(shuffle_buffer, seed=epoch_seed + 1)
    )


@dataclasses.dataclass(frozen=True)
class HostSlice:
    """This process's block of every global batch: the rows of its `local_devices` devices.

    pmap orders the global devices process by process (process 0's local devices first), so process p owns the
    contiguous rows [p * rows, (p + 1) * rows) of each global batch, rows = global_batch / process_count.
    """

    process_index: int
    process_count: int
    local_devices: int

    @classmethod
    def of_this_process(cls):
        return cls(jax.process_index(), jax.process_count(), jax.local_device_count())


def pretrain_dataset(
    builder,
    split,
    *,
    temporal,
    image_size,
    crop_scale,
    global_batch,
    host,
    seed,
    start_step,
    images_per_epoch,
    shuffle_buffer,
):
    """Infinite batches {"query","key": [local devices, per_device, S, S, 3] uint8, "coordinates"} of `host`'s
    rows of the global batches (see the module docstring), starting at global step `start_step`. The pixels are
    standardised on the accelerator (`pixels.standardize`): uint8 is a quarter of float32's bytes to copy.

    `images_per_epoch` is the split's image count (`read_location_index(...).num_images.sum()`): the stream
    position start_step * global_batch is reached by starting at the right epoch and skipping (not decoding)
    the rest of it.
    """
    rows = global_batch // host.process_count  # Whole: config_lib.validate checks the device count divides it.
    per_device = rows // host.local_devices
    position = start_step * global_batch
    first_epoch, skip = divmod(position, images_per_epoch)
    locations = encoded_locations(builder, split, tfds.ReadConfig(interleave_cycle_length=1, shuffle_seed=None))

    stream = tf.data.Dataset.range(first_epoch, _MAX_INT).flat_map(
        lambda e: _pairs_of_epoch(locations, e, seed=seed, temporal=temporal, shuffle_buffer=shuffle_buffer)
    )
    stream = stream.skip(skip).enumerate(start=position)  # (index in the global stream, encoded pair).
    stream = stream.filter(lambda index, ex: (index % global_batch) // rows == host.process_index)

    def views(index, ex):
        seeds = tf.random.experimental.stateless_split(
            tf.random.experimental.stateless_fold_in(tf.constant([seed, 7], tf.int64), index), 2
        )
        return {
            "query": augment.moco_v2_view(ex["query"], seeds[0], image_size, scale=crop_scale),
            "key": augment.moco_v2_view(ex["key"], seeds[1], image_size, scale=crop_scale),
            "coordinates": ex["coordinates"],
        }

    options = tf.data.Options()
    options.deterministic = True
    options.threading.private_threadpool_size = max(2, os.cpu_count() or 2)
    options.autotune.ram_budget = 4 * 1024**3
    stream = stream.map(views, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    stream = stream.batch(rows, drop_remainder=True)
    stream = stream.map(
        lambda b: {k: tf.reshape(x, [host.local_devices, per_device] + x.shape[1:].as_list()) for k, x in b.items()}
    )
    return stream.with_options(options).prefetch(2)


def with_geo_labels(batches, centroids):
    """Adds each pair's geo-cluster id (`geo_clusters.assign` of its location) to numpy batches."""
    for batch in batches:
        coords = batch.pop("coordinates")
        if centroids is not None:
            batch["geo_label"] = geo_clusters.assign(coords.reshape(-1, 2), centroids).reshape(coords.shape[:-1])
        else:
            batch["geo_label"] = np.zeros(coords.shape[:-1], np.int32)
        yield batch


# ---------------------------------------------------------------------------------------------------------------
# Evaluation views: one element per image (the stored examples are locations)


def split_images(builder, split):
    """One element per image of `split`: {"image": encoded JPEG, "label", "location": the location's index}.

    Locations are read in the split's stored order, so the index is stable across reads.
    """
    locations = encoded_locations(builder, split)

    def expand(index, example):
        images = example["images"]
        n = tf.shape(images)[0]
        return tf.data.Dataset.from_tensor_slices(
            {"image": images, "label": tf.fill([n], example["label"]), "location": tf.fill([n], index)})

    return locations.enumerate().flat_map(expand)


def pad_batch(batch, size):
    """Zero-pads every array of `batch` to `size` rows and adds "weight": 1 for real rows, 0 for padding."""
    n = len(next(iter(batch.values())))
    if n > size:
        raise ValueError(f"pad_batch: batch of {n} rows exceeds size {size}.")
    padded = {k: np.concatenate([v, np.zeros((size - n,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}
    padded["weight"] = (np.arange(size) < n).astype(np.float32)
    return padded


def _padded_batches(dataset, batch_size):
    """Every element once, in batches of `batch_size` (the last padded and masked, as torch's DataLoader keeps
    a partial batch)."""
    options = tf.data.Options()
    options.deterministic = True
    dataset = dataset.batch(batch_size).prefetch(2).with_options(options)
    for batch in dataset.as_numpy_iterator():
        yield pad_batch(batch, batch_size)


def eval_batches(builder, split, *, image_size, resize_size, batch_size):
    """Padded batches {"image", "label", "location", "weight"} of `split` under the eval transform
    (augment.eval_view: resize the shorter side, centre crop)."""
    dataset = split_images(builder, split).map(
        lambda ex: {**ex, "image": augment.eval_view(ex["image"], image_size, resize_size)},
        num_parallel_calls=tf.data.AUTOTUNE)
    return _padded_batches(dataset, batch_size)


def lincls_train_batches(builder, split, *, image_size, resize_size, batch_size, seed, epoch, shuffle_buffer):
    """One epoch of padded batches {"inputs": augmented images, "label", "weight"} of `split`, shuffled, under
    main_lincls.py's training view (augment.train_view_lincls: resize the shorter side, random crop).

    Shuffle order and crops are functions of (seed, epoch, position), so a rerun sees the same epochs.
    """
    epoch_seed = seed * 1_000_003 + epoch

    def view(index, ex):
        crop_seed = tf.random.experimental.stateless_fold_in(tf.constant([seed, epoch], tf.int64), index)
        return {"inputs": augment.train_view_lincls(ex["image"], crop_seed, image_size, resize_size),
                "label": ex["label"]}

    dataset = (split_images(builder, split).shuffle(shuffle_buffer, seed=epoch_seed).enumerate()
               .map(view, num_parallel_calls=tf.data.AUTOTUNE))
    return _padded_batches(dataset, batch_size)
