"""tf.data pipelines over the built datasets: temporal MoCo pairs for pretraining, and one element per image
under the evaluation views (the linear probe).

Design (why it looks like this):
- An epoch runs over *images*, as in the paper and the released code (a DataLoader over the image list): each
  epoch's order is a uniformly random permutation of the split's images (`epoch_order`), drawn from (seed,
  epoch). The stored examples are *locations* (a time series of JPEGs), read by index (records.py, ArrayRecord):
  the query image's location is read, and its key image is chosen among the location's images by
  `sample_key_index`. Images stay encoded until the pair is chosen, so only the two JPEGs a pair uses are ever
  decoded, and the random crop decodes only its window (`augment.decode_random_resized_crop`).
  A location's images are therefore spread over the whole epoch, as in the released code; a stream that read
  locations in (even shuffled) sequence and shuffled their images in a buffer kept siblings close together,
  where the queue held them as false negatives of the query's own place.
- One global stream, whatever the number of processes. Position g of the stream is image order[g mod N] of
  epoch g div N; row r of a global batch goes to global device r // per_device_batch, and pmap numbers devices
  process by process, so each process keeps only the positions of its own devices' rows (a contiguous block of
  every batch, `HostSlice`) and reads, decodes and augments only those. The global batches, and therefore the
  losses, are the same on 1 process x 4 devices as on 2 processes x 2 devices.
- Everything random is a pure function of (seed, position): the epoch's permutation of (seed, epoch), the key
  choice and the augmentations of the position g. A run restarted at step s computes the stream from position
  s * global_batch on, so a resumed run sees the batches an uninterrupted run would have seen; the index arrays
  (a permutation and a location per image) are the only per-epoch state, O(images) integers.
"""

import dataclasses
import os

import jax
import numpy as np
import tensorflow as tf

from geo_contrast import augment
from geo_contrast import geo_clusters
from geo_contrast import records

# Stream positions handled per call of the reading generator (its Python cost is per call, not per image).
_CHUNK = 256


def hide_accelerators_from_tf():
    """Keeps TensorFlow (tf.data only) off GPUs/TPUs, which belong to JAX."""
    tf.config.set_visible_devices([], "GPU")
    tf.config.set_visible_devices([], "TPU")


@dataclasses.dataclass(frozen=True)
class Views:
    """How a pretraining view is cut: a RandomResizedCrop of `size` px from `scale` of the image's `region`
    (augment.REGIONS; `box_context` sizes the "box_square"), then MoCo-v2's augmentations."""

    size: int
    scale: tuple
    region: str = "whole"
    box_context: float = 2.0

    @classmethod
    def of_config(cls, config):
        i = config.input
        return cls(i.image_size, tuple(i.crop_scale), i.region, i.box_context)

    def __call__(self, jpeg, box, seed):
        return augment.moco_v2_view(jpeg, seed, self.size, self.scale, region=self.region, box=box,
                                    box_context=self.box_context)


def epoch_order(seed, epoch, num_images):
    """The order of the images in epoch `epoch`: a uniformly random permutation of 0..num_images-1, a pure
    function of (seed, epoch), the same on every host."""
    return np.random.default_rng([seed, epoch]).permutation(num_images)


def sample_key_index(query_index, num_images, seed, temporal):
    """The index of the key image paired with image `query_index` of a location with `num_images` images.

    Temporal positives (the paper's TP): uniform over the location's *other* images, the query itself only
    when the location has a single image. Otherwise the key is the query image (MoCo's two views).
    """
    if not temporal:
        return query_index
    offset = tf.random.stateless_uniform([], seed, minval=1, maxval=tf.maximum(num_images, 2), dtype=tf.int64)
    return tf.where(num_images > 1, (query_index + offset) % num_images, query_index)


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

    def owns(self, positions, global_batch):
        """Which stream positions fall in this process's rows of their global batch."""
        rows = global_batch // self.process_count
        return (positions % global_batch) // rows == self.process_index


def _image_locations(index):
    """(location of each image, each image's index among its location's images), images numbered as
    `records.LocationIndex.first_image` numbers them."""
    location_of = np.repeat(np.arange(len(index.num_images)), index.num_images)
    return location_of, np.arange(len(location_of)) - index.first_image[location_of]


def stream_positions(index, *, seed, global_batch, host, start):
    """This host's positions of the global stream from `start` on, in chunks: {"position": [n] global stream
    positions, "location": [n] the image's location (index in the split), "time": [n] the image's index among
    its location's images}. Reads nothing: a pure function of the location index and the seed."""
    location_of, time_of = _image_locations(index)
    num_images = len(location_of)
    epoch, offset = divmod(start, num_images)
    while True:
        order = epoch_order(seed, epoch, num_images)
        for first in range(offset, num_images, _CHUNK):
            images = order[first:first + _CHUNK]
            positions = epoch * num_images + np.arange(first, first + len(images), dtype=np.int64)
            mine = host.owns(positions, global_batch)
            images = images[mine]
            yield {"position": positions[mine], "location": location_of[images], "time": time_of[images]}
        epoch, offset = epoch + 1, 0


def _read_locations(builder, split, chunks):
    """The chunks of stream positions ({"position", "location", "time"} arrays) as a tf.data stream of single
    elements, each with its location's serialized record ("serialized", read by index: records.SplitRecords)."""
    split_records = records.SplitRecords(builder, split)

    def with_records():
        for chunk in chunks:
            yield {**chunk, "serialized": split_records.read(chunk["location"])}

    signature = {"position": tf.TensorSpec([None], tf.int64), "location": tf.TensorSpec([None], tf.int64),
                 "time": tf.TensorSpec([None], tf.int64), "serialized": tf.TensorSpec([None], tf.string)}
    return tf.data.Dataset.from_generator(with_records, output_signature=signature).unbatch()


def _training_stream(builder, split, index, element_fn, *, global_batch, host, seed, start_step):
    """Infinite batches of `host`'s rows of the global stream (see the module docstring) from global step
    `start_step` on, each row `element_fn(location, time, seeds)` of the location read for a stream position (its
    parsed record, records.LocationParser), the image's index in it and three independent seeds drawn from
    (seed, position); every leaf laid out [local devices, per_device, ...] for pmap."""
    rows = global_batch // host.process_count  # Whole: config_lib.validate checks the device count divides it.
    per_device = rows // host.local_devices
    parse = records.LocationParser(builder)
    stream = _read_locations(builder, split, stream_positions(
        index, seed=seed, global_batch=global_batch, host=host, start=start_step * global_batch))

    def element(e):
        seeds = tf.unstack(tf.random.experimental.stateless_split(
            tf.random.experimental.stateless_fold_in(tf.constant([seed, 7], tf.int64), e["position"]), 3))
        return element_fn(parse(e["serialized"]), e["time"], seeds)

    options = tf.data.Options()
    options.deterministic = True
    options.threading.private_threadpool_size = max(2, os.cpu_count() or 2)
    options.autotune.ram_budget = 4 * 1024**3
    stream = stream.map(element, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    stream = stream.batch(rows, drop_remainder=True)
    stream = stream.map(
        lambda b: {k: tf.reshape(x, [host.local_devices, per_device] + x.shape[1:].as_list()) for k, x in b.items()}
    )
    return stream.with_options(options).prefetch(2)


def pretrain_dataset(builder, split, index, *, temporal, views, global_batch, host, seed, start_step, keys=True):
    """Infinite batches {"query","key": [local devices, per_device, S, S, 3] uint8, "coordinates"} of `host`'s
    rows of the global batches (see the module docstring), starting at global step `start_step`. The pixels are
    standardised on the accelerator (`pixels.standardize`): uint8 is a quarter of float32's bytes to copy.

    `index` is the split's `records.read_location_index`; `views` (a `Views`) cuts the query and key crops;
    `keys=False` (no contrastive loss) cuts no key at all.
    """

    def pair(location, t, seeds):
        query_seed, key_seed, choice_seed = seeds
        pair = {"query": views(location["images"][t], location["boxes"][t], query_seed),
                "coordinates": location["coordinates"]}
        if keys:
            key_t = sample_key_index(t, tf.shape(location["images"], out_type=tf.int64)[0], choice_seed, temporal)
            pair["key"] = views(location["images"][key_t], location["boxes"][key_t], key_seed)
        return pair

    return _training_stream(builder, split, index, pair, global_batch=global_batch, host=host, seed=seed,
                            start_step=start_step)


def supervised_dataset(builder, split, index, *, size, scale, region, box_context, global_batch, host, seed,
                       start_step):
    """Infinite batches {"image": [local devices, per_device, S, S, 3] uint8, "label"} of `host`'s rows of the
    global batches from `start_step` on, for fine-tuning: each image a RandomResizedCrop of `scale` of its
    `region` and a horizontal flip half the time (torchvision's classification training views)."""

    def labelled(location, t, seeds):
        crop_seed, flip_seed, _ = seeds
        image = augment.supervised_view(location["images"][t], crop_seed, flip_seed, size, scale, region=region,
                                        box=location["boxes"][t], box_context=box_context)
        return {"image": image, "label": location["label"]}

    return _training_stream(builder, split, index, labelled, global_batch=global_batch, host=host, seed=seed,
                            start_step=start_step)


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


def split_images(builder, split, region="whole", box_context=2.0, locations=None):
    """One element per image of `split` (or of its `locations`, indices in the split): {"image": its `region`
    decoded (float32 [0, 1], augment.decode_region), "label", "location": the location's index in the split},
    locations in stored (or the given) order, a location's images in time order."""

    def expand(index, location):
        n = tf.shape(location["images"])[0]
        return tf.data.Dataset.from_tensor_slices({
            "jpeg": location["images"], "box": location["boxes"], "label": tf.fill([n], location["label"]),
            "location": tf.fill([n], index)})

    def decode(ex):
        return {"image": augment.decode_region(ex["jpeg"], region, ex["box"], box_context), "label": ex["label"],
                "location": ex["location"]}

    images = records.locations(builder, split, locations).flat_map(expand)
    return images.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


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


def eval_batches(builder, split, *, image_size, resize_size, batch_size, region="whole", box_context=2.0,
                 locations=None):
    """Padded batches {"image", "label", "location", "weight"} of `split` (or of its `locations`) under the eval
    transform of the `region` (augment.eval_view: resize the shorter side, centre crop)."""
    dataset = split_images(builder, split, region, box_context, locations).map(
        lambda ex: {**ex, "image": augment.eval_view(ex["image"], image_size, resize_size)},
        num_parallel_calls=tf.data.AUTOTUNE)
    return _padded_batches(dataset, batch_size)


def lincls_train_batches(builder, split, index, *, image_size, resize_size, batch_size, seed, epoch,
                         region="whole", box_context=2.0):
    """One epoch of padded batches {"inputs": augmented images, "label", "weight"} of `split` (whose
    `records.read_location_index` is `index`) in the epoch's random order (`epoch_order`), under main_lincls.py's
    training view of the `region` (augment.train_view_lincls: resize the shorter side, random crop; on a
    non-square image the crop's place along the longer side is the augmentation). Order and crops are functions
    of (seed, epoch, position), so a rerun sees the same epochs."""
    location_of, time_of = _image_locations(index)
    images = epoch_order(seed, epoch, len(location_of))
    positions = np.arange(len(images), dtype=np.int64)
    chunks = ({"position": positions[i:i + _CHUNK], "location": location_of[images[i:i + _CHUNK]],
               "time": time_of[images[i:i + _CHUNK]]} for i in range(0, len(images), _CHUNK))
    parse = records.LocationParser(builder)

    def view(element):
        location = parse(element["serialized"])
        t = element["time"]
        image = augment.decode_region(location["images"][t], region, location["boxes"][t], box_context)
        crop_seed = tf.random.experimental.stateless_fold_in(tf.constant([seed, epoch], tf.int64),
                                                             element["position"])
        return {"inputs": augment.train_view_lincls(image, crop_seed, image_size, resize_size),
                "label": location["label"]}

    stream = _read_locations(builder, split, chunks).map(view, num_parallel_calls=tf.data.AUTOTUNE,
                                                         deterministic=True)
    return _padded_batches(stream, batch_size)
