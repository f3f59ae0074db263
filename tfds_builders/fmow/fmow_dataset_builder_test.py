"""TFDS's standard builder checks over dummy_data/ (a tiny tree from `tfds_builders.fmow.sample`, see
README.md)."""

import tensorflow_datasets as tfds

from tfds_builders.fmow import fmow_dataset_builder


class FmowDatasetBuilderTest(tfds.testing.DatasetBuilderTestCase):
    """Builds dummy_data/ with `os` and `open` blocked in the builder module, checks every split's example count
    against the tree (4 train, 2 val and 2 labelled test locations) and reads them back."""
    DATASET_CLASS = fmow_dataset_builder.Builder
    SPLITS = {"train": 4, "val": 2, "test": 2}
    SKIP_CHECKSUMS = True  # Nothing is downloaded: the data comes from the manual dir.

    def _make_builder(self, config=None):
        # TFDS's checks read the examples back with as_dataset, which the builder's default ArrayRecord files do
        # not offer (they are read by index): build these in TFRecord, the same examples in another container.
        return self.dataset_class(data_dir=self.tmp_dir, config=config, version=self.VERSION,
                                  file_format="tfrecord")

    def _assertAsDataset(self, builder):
        # A location's images differ in size, which as_dataset cannot stack into one tensor: read them undecoded,
        # as training does, and check the counts and that no location is in two splits.
        seen = {}
        for split, expected in self.SPLITS.items():
            ds = builder.as_dataset(split=split, decoders={"images": tfds.decode.SkipDecoding()})
            ids = [ex["location_id"] for ex in tfds.as_numpy(ds)]
            self.assertLen(ids, expected)
            for other, other_ids in seen.items():
                self.assertFalse(set(ids) & other_ids, f"splits {split} and {other} share locations")
            seen[split] = set(ids)


if __name__ == "__main__":
    tfds.testing.test_main()
