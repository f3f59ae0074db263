"""TFDS builder for fMoW-rgb (Functional Map of the World), one example per location.

    tfds build tfds_builders/fmow --manual_dir=PATH [--data_dir=DIR]

PATH is the extracted fmow-rgb release root (train/, val/, and test/ when it has the labelled layout). Every
image is stored whole, as the authors' data loader opens it, with its shorter side at most 448 px (the released
scripts' `Resize(448)`: nothing larger is ever used), its labelled box beside it, and a location's images sorted
by their JSON timestamps. One dataset serves every recipe: the released crops (the whole image, or its centre
square) and MoCo-v2's square crop around the box are cut at read time (geo_contrast/augment.py).

The files are ArrayRecord (`--file_format=array_record`, this builder's default): training reads locations by
index, so each epoch can be a uniformly random permutation of the images (geo_contrast/input_pipeline.py).

The build streams: locations are read one at a time by a bounded pool of threads (PIL releases the GIL
while decoding, resizing and encoding), so memory holds only the in-flight locations whatever the size of
the release. Unusable images are skipped with a warning naming the file and counted per reason; the counts
are logged at the end of each split.
"""

import collections
import concurrent.futures
import itertools
import multiprocessing
import time
from collections.abc import Callable, Iterable, Iterator

from absl import logging
from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from . import fmow_format
from . import fmow_reader

# The released scripts resize every image to 448 px on its shorter side before cropping (main_moco_tp.py:288,
# main_moco_geo+tp.py:288 and 311): a larger stored image would only cost disk and decoding time.
MAX_SHORTER_SIDE = 448
# Reader threads: one per core, at most _MAX_WORKERS. Each holds one decoded source image at a time (tens of
# MB for the release's largest), and past a few dozen threads the GIL-bound JSON work stops scaling anyway.
_MAX_WORKERS = 32
# Locations queued per worker thread: enough to keep every core busy, few enough to bound memory.
_IN_FLIGHT_PER_WORKER = 4
# Seconds between progress lines.
_PROGRESS_EVERY_S = 30.0
# Random access by index is what makes each epoch a full permutation of the images.
FILE_FORMAT = "array_record"


class Builder(tfds.core.GeneratorBasedBuilder):
    """fMoW-rgb: satellite image time series per location, 62 classes."""

    VERSION = tfds.core.Version("2.0.0")
    RELEASE_NOTES = {
        "1.0.0": "One example per location; images cropped around the labelled box.",
        "2.0.0": "Whole images (shorter side <= 448 px) with their labelled box, as the authors' loader reads "
                 "them; ArrayRecord files by default; one dataset instead of per-size configs.",
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = fmow_reader.DOWNLOAD_INSTRUCTIONS

    def __init__(self, *, file_format=None, **kwargs):
        """ArrayRecord for a new build unless `file_format` (or `tfds build --file_format`) asks for another; a
        prepared dataset keeps the format it was built in (so a reader can say how to rebuild it)."""
        super().__init__(file_format=file_format, **kwargs)
        if file_format is None and not self.is_prepared():
            self.info.set_file_format(FILE_FORMAT, override=True)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "location_id": tfds.features.Text(),
                "label": tfds.features.ClassLabel(names=fmow_format.CLASS_NAMES),
                "coordinates": tfds.features.Tensor(shape=(2,), dtype=np.float32),
                "images": tfds.features.Sequence(
                    tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg")),
                "timestamps": tfds.features.Sequence(np.int64),
                "metadata": tfds.features.Sequence({
                    "gsd": np.float32,
                    "cloud_cover": np.float32,
                    "off_nadir_angle_dbl": np.float32,
                    "sun_elevation_dbl": np.float32,
                    "country_code": tfds.features.Text(),
                    "image_stem": tfds.features.Text(),
                    "box": tfds.features.BBoxFeature(),
                }),
            }),
            supervised_keys=None,
            homepage="https://github.com/fMoW/dataset",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        splits = fmow_reader.find_splits(epath.Path(dl_manager.manual_dir))
        if "val" not in splits:
            logging.warning("fmow: %s has no val/ with category folders; building train%s only.",
                            dl_manager.manual_dir, " and test" if "test" in splits else "")
        return {split: self._generate_examples(split, split_dir) for split, split_dir in splits.items()}

    def _generate_examples(self, split: str, split_dir: epath.Path):
        """Yields (location_id, example) as locations finish reading; logs progress and skip counts."""
        locations = fmow_reader.list_locations(split, split_dir)
        tally = _SplitTally(f"fmow {split}", total=len(locations))

        def read(location):
            return fmow_reader.read_location(location, max_shorter_side=MAX_SHORTER_SIDE)

        workers = min(multiprocessing.cpu_count(), _MAX_WORKERS)
        for result in _map_unordered(read, locations, workers, workers * _IN_FLIGHT_PER_WORKER):
            tally.add(result)
            if result.example is not None:
                yield result.location_id, result.example
        tally.finish(split_dir)


def _map_unordered(fn: Callable, items: Iterable, workers: int, max_in_flight: int) -> Iterator:
    """fn(item) for every item on a thread pool, yielded as they complete. At most `max_in_flight` items are
    submitted and not yet yielded (a new one is submitted only once a result has been taken), so memory stays
    bounded however many items there are."""
    items = iter(items)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        pending = {pool.submit(fn, item) for item in itertools.islice(items, max_in_flight)}
        while pending:
            done, pending = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                yield future.result()
                pending |= {pool.submit(fn, item) for item in itertools.islice(items, 1)}


class _SplitTally:
    """Counts a split's results, logs each skipped image, progress every _PROGRESS_EVERY_S and a summary."""

    def __init__(self, name: str, total: int):
        self.name, self.total = name, total
        self.done = self.written = self.images = self.dropped = 0
        self.skips = collections.Counter()
        self.start = self.last_report = time.monotonic()

    def add(self, result: fmow_reader.LocationResult):
        self.done += 1
        for skip in result.skipped:
            self.skips[skip.reason] += 1
            logging.warning("%s: skipping %s (%s): %s", self.name, skip.path, skip.reason, skip.detail)
        if result.example is None:
            self.dropped += 1
            logging.warning("%s: dropping location %s: no usable image", self.name, result.location_id)
        else:
            self.written += 1
            self.images += result.num_images
        now = time.monotonic()
        if now - self.last_report >= _PROGRESS_EVERY_S:
            self.last_report = now
            logging.info("%s: %d/%d locations, %d images (%.1f images/s)", self.name, self.done, self.total,
                         self.images, self.images / (now - self.start))

    def finish(self, split_dir: epath.Path):
        """Logs the split's counts; raises if no location survived."""
        elapsed = max(time.monotonic() - self.start, 1e-9)
        skipped = ", ".join(f"{reason}={count}" for reason, count in sorted(self.skips.items())) or "none"
        logging.info("%s: wrote %d locations, %d images in %.1f s (%.1f images/s); skipped images: %s; "
                     "dropped locations: %d", self.name, self.written, self.images, elapsed,
                     self.images / elapsed, skipped, self.dropped)
        if not self.written:
            raise ValueError(f"{self.name}: no usable location in {split_dir} ({self.total} location folders; "
                             f"skipped images: {skipped}). Check the release against the layout in "
                             "MANUAL_DOWNLOAD_INSTRUCTIONS.")
