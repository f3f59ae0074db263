"""Makes the bundled sample available to a `sample` config: generated and built into the workdir on first use.

So `python -m geo_contrast.main --config=configs/fmow.py:sample --workdir=DIR` needs no download and no
separate `tfds build`: the fMoW-format tree is written to DIR/sample_fmow and built (builder config
"rgb_64") into DIR/data, the same code path as `tfds build tfds_builders/fmow --config=rgb_64`.
"""

import os

from absl import logging
import tensorflow_datasets as tfds

from geo_contrast import sample_data
from tfds_builders.fmow import fmow_dataset_builder


def prepare_if_sample(config, workdir):
    """For a sample config: points `config.dataset.data_dir` into the workdir and builds the sample there."""
    if not config.dataset.generate_sample:
        return
    if config.dataset.data_dir is None:
        config.dataset.data_dir = os.path.join(workdir, "data")
    _, _, builder_config = config.dataset.name.partition("/")
    builder = fmow_dataset_builder.Builder(config=builder_config or None, data_dir=config.dataset.data_dir)
    if builder.is_prepared():
        return
    manual_dir = os.path.join(workdir, "sample_fmow")
    if not os.path.isdir(os.path.join(manual_dir, "train")):
        summary = sample_data.generate(manual_dir, seed=config.seed)
        logging.info("Generated the fMoW-format sample in %s: %s", manual_dir, summary)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))

