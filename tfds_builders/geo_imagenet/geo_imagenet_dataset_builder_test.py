"""TFDS's standard builder checks over dummy_data/.

dummy_data/ is `tfds_builders.geo_imagenet.sample.generate(seed=0, num_classes=3, images_per_class=6,
layout="mixed", image_size_range=(24, 40))` with n02979186/n02979186_3.JPEG cut to half its bytes: 12 geotagged
images, one synset as a tar, one corrupt JPEG (skipped). With the s64 config's val_fraction 0.2, the hash split
sends n02102040_1 and n02979186_17 (numbered so that s256's val has an image too) to val and the other 9
readable images to train.
"""

import tensorflow_datasets as tfds

from tfds_builders.geo_imagenet import geo_imagenet_dataset_builder


class GeoImageNetTest(tfds.testing.DatasetBuilderTestCase):
    DATASET_CLASS = geo_imagenet_dataset_builder.Builder
    BUILDER_CONFIG_NAMES_TO_TEST = ["s64"]
    SPLITS = {"train": 9, "val": 2}
    SKIP_CHECKSUMS = True

    def _make_builder(self, config=None):
        # TFDS's checks read the examples back with as_dataset, which the builder's default ArrayRecord files do
        # not offer (they are read by index): build these in TFRecord, the same examples in another container.
        return self.dataset_class(data_dir=self.tmp_dir, config=config, version=self.VERSION,
                                  file_format="tfrecord")


if __name__ == "__main__":
    tfds.testing.test_main()
