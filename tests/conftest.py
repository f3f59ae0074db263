"""Shared fixtures: a tiny fMoW-format tree, generated and built once per test session, and the environment of
the command-line runs."""

import os

import pytest
import tensorflow_datasets as tfds

from tfds_builders.fmow import sample as sample_data
from tfds_builders.fmow import fmow_dataset_builder


@pytest.fixture(scope="session")
def tiny_fmow(tmp_path_factory):
    """(data_dir, manual_dir) of a built `fmow` with 12 train, 6 val and 4 test locations."""
    root = tmp_path_factory.mktemp("tiny_fmow")
    sample_data.generate(root / "raw", locations_per_split={"train": 12, "val": 6, "test": 4}, seed=0)
    builder = fmow_dataset_builder.Builder(data_dir=str(root / "data"))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(root / "raw")))
    return str(root / "data"), str(root / "raw")


@pytest.fixture(scope="session")
def env(tmp_path_factory):
    """The environment of the tests that run the real command line: CPU, and a persistent XLA compilation cache
    shared by all of them, so each model compiles once per test session."""
    cache = tmp_path_factory.mktemp("xla_cache")
    return dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", XLA_FLAGS="")
