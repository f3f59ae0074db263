"""TFDS's standard builder checks over dummy_data/ (a tiny tree from `tfds_builders.fmow.sample`, see
README.md)."""

import tensorflow_datasets as tfds

from tfds_builders.fmow import fmow_dataset_builder


class FmowDatasetBuilderTest(tfds.testing.DatasetBuilderTestCase):
    """Builds rgb_64 from dummy_data/ with `os` and `open` blocked in the builder module, checks every split's
    example count against the tree (4 train, 2 val and 2 labelled test locations) and reads them back."""
    DATASET_CLASS = fmow_dataset_builder.Builder
    BUILDER_CONFIG_NAMES_TO_TEST = ["rgb_64"]
    SPLITS = {"train": 4, "val": 2, "test": 2}
    SKIP_CHECKSUMS = True  # Nothing is downloaded: the data comes from the manual dir.


if __name__ == "__main__":
    tfds.testing.test_main()
