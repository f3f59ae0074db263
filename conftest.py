"""Marks the repository root as pytest's rootdir, so `configs`, `geo_contrast` and `tfds_builders` import from
this checkout even without the editable install."""
