"""GeoImageNet: geotagged ImageNet-21k images (`tfds build tfds_builders/geo_imagenet --manual_dir=DIR`).

Kept free of imports so the geotagger can use `geotags_format` without loading TensorFlow.
"""
