"""Makes a bundled sample available to a `sample` config: generated and built into the workdir on first use.

So `python -m geo_contrast.main --config=configs/fmow.py:sample --workdir=DIR` needs no download and no separate
`tfds build`: the dataset's generated tree is written to DIR/sample_<dataset> and built (the config's builder
config, if it names one) into DIR/data, the same code path as `tfds build`.
"""

import os

import tensorflow_datasets as tfds
from absl import logging

from geo_contrast import workdir as workdir_lib
from tfds_builders.fmow import sample as sample_data
from tfds_builders.geo_imagenet import sample as sample_geo_imagenet
from tfds_builders.fmow import fmow_dataset_builder
from tfds_builders.geo_imagenet import geo_imagenet_dataset_builder

# Dataset name -> (generator of its manual-dir format, TFDS builder class).
SAMPLES = {
    "fmow": (lambda out, seed: sample_data.generate(out, seed=seed), fmow_dataset_builder.Builder),
    "geo_imagenet": (lambda out, seed: sample_geo_imagenet.generate(out, seed=seed, num_classes=6,
                                                                    images_per_class=30),
                     geo_imagenet_dataset_builder.Builder),
}


def prepare_if_sample(config, workdir):
    """For a sample config: points `config.dataset.data_dir` into the workdir and builds the sample there."""
    if not config.dataset.generate_sample:
        return
    if config.dataset.data_dir is None:
        config.dataset.data_dir = os.path.join(workdir, workdir_lib.SAMPLE_DATA)
    dataset, _, builder_config = config.dataset.name.partition("/")
    if dataset not in SAMPLES:
        raise ValueError(f"config.dataset.generate_sample is set, but there is no bundled sample of {dataset!r}; "
                         f"samples exist for {sorted(SAMPLES)}.")
    generate, builder_class = SAMPLES[dataset]
    builder = builder_class(config=builder_config or None, data_dir=config.dataset.data_dir)
    if builder.is_prepared():
        return
    manual_dir = workdir_lib.sample_manual_dir(workdir, dataset)
    if not os.path.isdir(manual_dir):
        summary = generate(manual_dir, config.dataset.sample_seed)
        logging.info("Generated the %s sample in %s: %s", dataset, manual_dir, summary)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
