"""tf.data pipelines over the built TFDS datasets: temporal MoCo pairs for pretraining.

Design (why it looks like this):
- The stored examples are *locations* (a time series of JPEGs). An epoch runs over *images*, as in the
  paper: each location expands into one element per image (the query), paired with a key image chosen by
  `sample_key_index`. Images stay encoded until the pair is chosen, so only the two JPEGs a pair uses are
  ever decoded, and RandomResizedCrop decodes only its window (`augment.decode_random_resized_crop`).
- Everything random is a pure function of (seed, process, epoch, position): the per-epoch shuffles are
  seeded with the epoch, the key choice with the location's index in the epoch, the augmentations with the
  element's index in the host's stream. A run restarted at step s rebuilds the same stream and skips to
  element s * local_batch of it (at most one epoch is re-read, never decoded), so a resumed run sees the
  batches an uninterrupted run would have seen.
- Each host reads its own part of the split (`tfds.split_for_jax_process`) and emits
  [local_devices, per_device, ...] batches for pmap.
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


def load_builder(name, data_dir):
  """The prepared TFDS builder `name`, or an error that says the exact command that prepares it."""
  builder = tfds.builder(name, data_dir=data_dir)
  if not builder.is_prepared():
    dataset, _, config = name.partition("/")
    where = f" --data_dir={data_dir}" if data_dir else ""
    cfg = f" --config={config}" if config else ""
    raise FileNotFoundError(
        f"The dataset {name!r} is not built in {builder.data_dir!r}. Build it first:\n"
        f"  tfds build tfds_builders/{dataset} --manual_dir=PATH_TO_RELEASE{cfg}{where}\n"
        f"(see tfds_builders/{dataset}/README.md for the download).")
  return builder


@dataclasses.dataclass(frozen=True)
class LocationIndex:
  """Per-location facts read once from a split: where each location is and how many images it has."""
  coordinates: np.ndarray  # [L, 2] float32, (lat, lon) degrees.
  num_images: np.ndarray  # [L] int64.

  @property
  def image_coordinates(self):
    """One row per image: the paper clusters the training *images'* coordinates."""
    return np.repeat(self.coordinates, self.num_images, axis=0)


def read_location_index(builder, split):
  """Reads coordinates and image counts of every location in `split`, without decoding any image."""
  ds = builder.as_dataset(
      split=split, shuffle_files=False,
      decoders=tfds.decode.PartialDecoding({"coordinates": True, "timestamps": True}))
  ds = ds.map(lambda ex: (ex["coordinates"], tf.size(ex["timestamps"], out_type=tf.int64)),
              num_parallel_calls=tf.data.AUTOTUNE)
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

  return (locations.shuffle(max(shuffle_buffer // 8, 1), seed=epoch_seed)
          .enumerate().flat_map(expand)
          .shuffle(shuffle_buffer, seed=epoch_seed + 1))


def pretrain_dataset(builder, split, *, temporal, image_size, crop_scale, local_devices, per_device_batch,
                     seed, start_step, local_images_per_epoch, shuffle_buffer):
  """Infinite batches {"query","key": [devices, per_device, S, S, 3] float32, "coordinates"} for this host.

  Starts at global step `start_step`: the host's stream position start_step * local_batch is reached by
  starting at the right epoch and skipping (not decoding) the rest.
  """
  local_batch = local_devices * per_device_batch
  position = start_step * local_batch
  first_epoch, skip = divmod(position, local_images_per_epoch)
  locations = builder.as_dataset(
      split=tfds.split_for_jax_process(split), shuffle_files=False,
      decoders={"images": tfds.decode.SkipDecoding()},
      read_config=tfds.ReadConfig(interleave_cycle_length=1, shuffle_seed=None))
  locations = locations.map(lambda ex: {"images": ex["images"], "coordinates": ex["coordinates"]})
  process_seed = seed * 1_009 + jax.process_index()

  stream = tf.data.Dataset.range(first_epoch, _MAX_INT).flat_map(
      lambda e: _pairs_of_epoch(locations, e, seed=process_seed, temporal=temporal,
                                shuffle_buffer=shuffle_buffer))
  stream = stream.skip(skip).enumerate(start=position)

  def views(index, ex):
    element_seed = tf.random.experimental.stateless_fold_in(tf.constant([seed, 7], tf.int64), index)
    seeds = tf.random.experimental.stateless_split(
        tf.random.experimental.stateless_fold_in(element_seed, jax.process_index()), 2)
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
  stream = stream.batch(local_batch, drop_remainder=True)
  stream = stream.map(lambda b: jax.tree.map(
      lambda x: tf.reshape(x, [local_devices, per_device_batch] + x.shape[1:].as_list()), b))
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
