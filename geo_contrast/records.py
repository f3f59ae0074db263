"""Reading a built dataset: the prepared TFDS builder, a split's serialized locations read by index (its
ArrayRecord files), their parsing inside the tf.data graph, and the per-location facts read once.

Random access is what lets every epoch be a uniformly random permutation of the images (input_pipeline.py), and
lets each host read only the locations of its own rows. The serialized records are parsed by TFDS's own parser
(with the images left encoded), so the schema has one definition: the builders'.

Both schemas read as locations: fMoW stores a time series per example ("images"), GeoImageNet one "image" per
example, read here as a location of one image.
"""

import dataclasses

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.core import file_adapters

# Records read per call: amortises Python's per-call cost; ArrayRecord reads a call's records in parallel.
_READ_CHUNK = 256


class DatasetNotFoundError(FileNotFoundError):
    """The configured dataset is not built (or not readable) where the config points; the message says how."""


def load_builder(name, data_dir):
    """The prepared TFDS builder `name`, or an error that says the exact command that prepares it."""
    builder = tfds.builder(name, data_dir=data_dir)
    dataset, _, config = name.partition("/")
    where = f" --data_dir={data_dir}" if data_dir else ""
    cfg = f" --config={config}" if config else ""
    command = f"tfds build tfds_builders/{dataset} --manual_dir=PATH_TO_RELEASE{cfg}{where}"
    if not builder.is_prepared():
        raise DatasetNotFoundError(
            f"The dataset {name!r} (config.dataset.name) is not built in {builder.data_dir!r} "
            f"(config.dataset.data_dir). Build it first:\n  {command}\n(see tfds_builders/{dataset}/README.md "
            "for the download), or point --config.dataset.data_dir at the directory that holds it.")
    if builder.info.file_format != file_adapters.FileFormat.ARRAY_RECORD:
        raise DatasetNotFoundError(
            f"The dataset {name!r} in {builder.data_dir!r} is stored as {builder.info.file_format.value}; training "
            "reads ArrayRecord files by index (each epoch a random permutation of the images). Rebuild it (the "
            f"builders' default format):\n  {command} --file_format=array_record")
    return builder


def is_time_series(builder):
    """fMoW-style datasets store a location's time series ("images"); GeoImageNet one "image" per example."""
    return "images" in builder.info.features


class SplitRecords:
    """A split's serialized examples (locations), read by index in any order."""

    def __init__(self, builder, split):
        self.name = f"{builder.info.full_name}:{split}"
        self._source = builder.as_data_source(split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)

    def __len__(self):
        return len(self._source)

    def read(self, indices):
        """The serialized examples at `indices`, as a numpy array of bytes objects."""
        return np.array(self._source.__getitems__([int(i) for i in indices]), dtype=object)


class LocationParser:
    """Parses serialized locations in the graph into {"images": [T] encoded JPEGs, "coordinates": [2] float32
    (lat, lon), "label": int64, "boxes": [T, 4] the labelled boxes as (ymin, xmin, ymax, xmax) fractions of each
    image (GeoImageNet, which has none: the whole image)}.

    The features are read straight from the tf.train.Example: TFDS stores a nested feature under its path joined
    by "/" and a Sequence of fixed-shape tensors as one flat list. TFDS's own decoding would loop over every
    element of a sequence (tf.map_fn) for nothing here, where the images stay encoded.
    """

    def __init__(self, builder):
        self._time_series = is_time_series(builder)
        spec = {"coordinates": tf.io.FixedLenFeature([2], tf.float32), "label": tf.io.FixedLenFeature([], tf.int64)}
        if self._time_series:
            spec["images"] = tf.io.RaggedFeature(tf.string)
            spec["metadata/box"] = tf.io.RaggedFeature(tf.float32)
        else:
            spec["image"] = tf.io.FixedLenFeature([], tf.string)
        self._spec = spec

    def __call__(self, serialized):
        ex = tf.io.parse_single_example(serialized, self._spec)
        if self._time_series:
            return {"images": ex["images"], "coordinates": ex["coordinates"], "label": ex["label"],
                    "boxes": tf.reshape(ex["metadata/box"], [-1, 4])}
        whole = tf.constant([[0.0, 0.0, 1.0, 1.0]])  # No labelled box: the whole image.
        return {"images": ex["image"][None], "coordinates": ex["coordinates"], "label": ex["label"],
                "boxes": whole}


def locations(builder, split, indices=None):
    """The locations at `indices` of `split` (default: every one, in stored order) as a tf.data stream of
    (index, parsed location: LocationParser's dict), images left encoded."""
    split_records = SplitRecords(builder, split)
    indices = np.arange(len(split_records)) if indices is None else np.asarray(indices, np.int64)

    def chunks():
        for start in range(0, len(indices), _READ_CHUNK):
            chunk = indices[start:start + _READ_CHUNK]
            yield chunk, split_records.read(chunk)

    parse = LocationParser(builder)
    signature = (tf.TensorSpec([None], tf.int64), tf.TensorSpec([None], tf.string))
    return tf.data.Dataset.from_generator(chunks, output_signature=signature).unbatch().map(
        lambda index, serialized: (index, parse(serialized)), num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True)


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

    @property
    def first_image(self):
        """[L] index of each location's first image in the split's image numbering (locations in stored order,
        a location's images in time order)."""
        return np.concatenate([[0], np.cumsum(self.num_images)[:-1]]).astype(np.int64)


def read_location_index(builder, split):
    """Reads coordinates and image counts of every location in `split`, without decoding any image."""
    ds = locations(builder, split).map(
        lambda _, ex: (ex["coordinates"], tf.shape(ex["images"], out_type=tf.int64)[0]))
    coords, counts = [], []
    for c, n in ds.batch(4096).as_numpy_iterator():
        coords.append(c)
        counts.append(n)
    if not coords:
        raise ValueError(f"Split {split!r} of {builder.info.full_name} has no locations.")
    return LocationIndex(np.concatenate(coords).astype(np.float32), np.concatenate(counts))
