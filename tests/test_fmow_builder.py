"""Tests of the fMoW TFDS builder on tiny trees from `tfds_builders.fmow.sample`, and of its pure parsing rules.

Expected values come from the tree on disk and the JSONs, computed here independently (numpy triangle fans
for centroids, `time.strptime` for times), never from the builder's own functions.
"""

import calendar
import io
import json
import logging
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from tfds_builders.fmow import sample as sample_data
from tfds_builders.fmow import fmow_dataset_builder
from tfds_builders.fmow import fmow_format
from tfds_builders.fmow import fmow_reader

REPO = pathlib.Path(__file__).resolve().parents[1]
S3_URI = "s3://spacenet-dataset/Hosted-Datasets/fmow/fmow-rgb/"


# ---------------------------------------------------------------------------------------------------------
# Helpers: builds and independent expectations.


def _build(manual_dir, data_dir):
    builder = fmow_dataset_builder.Builder(data_dir=str(data_dir))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
    return builder


def _examples(builder, split):
    """{location_id: example} of a built split, decoded (images as arrays), read by index as training reads."""
    source = builder.as_data_source(split)
    return {source[i]["location_id"].decode(): source[i] for i in range(len(source))}


def _stored_jpegs(builder, split):
    """{location_id: [the stored JPEG bytes, in the example's order]} of a built split."""
    source = builder.as_data_source(split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
    stored = {}
    for i in range(len(source)):
        features = tf.train.Example.FromString(source[i]).features.feature
        stored[features["location_id"].bytes_list.value[0].decode()] = list(features["images"].bytes_list.value)
    return stored


def _pairs_on_disk(location_dir):
    """Stems that have both an `_rgb.jpg` and an `_rgb.json`."""
    jpgs = {p.name[:-4] for p in location_dir.glob("*_rgb.jpg")}
    return sorted(jpgs & {p.name[:-5] for p in location_dir.glob("*_rgb.json")})


def _locations_on_disk(root, split):
    return {f"{split}/{d.parent.name}/{d.name}": d for d in (root / split).glob("*/*") if d.is_dir()}


def _unix_seconds(text):
    return calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ"))


def _fan_centroid(wkt):
    """(lat, lon) area centroid of a WKT footprint by a triangle fan from the first vertex, longitudes unwrapped
    around it."""
    numbers = re.findall(r"-?\d+(?:\.\d+)?", wkt)
    vertices = np.array(numbers, dtype=np.float64).reshape(-1, 2)
    if np.allclose(vertices[0], vertices[-1]):
        vertices = vertices[:-1]
    rel = vertices - vertices[0]
    rel[:, 0] = (rel[:, 0] + 180) % 360 - 180
    a, b = rel[1:-1], rel[2:]
    areas = (a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]) / 2
    centroid = (areas[:, None] * (a + b) / 3).sum(axis=0) / areas.sum() + vertices[0]
    return centroid[1], (centroid[0] + 180) % 360 - 180


def _sphere_mean(lat_lons):
    lat, lon = np.radians(np.array(lat_lons)).T
    v = np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], 1).sum(0)
    return np.degrees(np.arctan2(v[2], np.hypot(v[0], v[1]))), np.degrees(np.arctan2(v[1], v[0]))


def _lon_diff(a, b):
    return abs((a - b + 180) % 360 - 180)


# ---------------------------------------------------------------------------------------------------------
# A clean tree, built once.


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("clean") / "fmow-rgb"
    summary = sample_data.generate(root, seed=3, locations_per_split={"train": 5, "val": 2, "test": 2},
                                   image_size_range=(48, 72))
    builder = _build(root, tmp_path_factory.mktemp("clean_data"))
    return root, summary, builder


def test_one_example_per_location_with_every_image(clean):
    root, summary, builder = clean
    assert set(builder.info.splits.keys()) == {"train", "val", "test"}
    for split in ("train", "val", "test"):
        examples = _examples(builder, split)
        on_disk = _locations_on_disk(root, split)
        assert set(examples) == set(on_disk)
        assert len(examples) == summary[split]["locations"]
        assert sum(len(ex["images"]) for ex in examples.values()) == summary[split]["images"]
        for location_id, ex in examples.items():
            stems = [s.decode() for s in ex["metadata"]["image_stem"]]
            assert sorted(stems) == _pairs_on_disk(on_disk[location_id])
            sizes = [Image.open(on_disk[location_id] / f"{stem}.jpg").size for stem in stems]
            assert [image.shape for image in ex["images"]] == [(h, w, 3) for w, h in sizes]  # Whole, as on disk.
            assert len(ex["timestamps"]) == len(stems)


def test_timestamps_ascending_and_equal_to_the_jsons(clean):
    root, _, builder = clean
    for location_id, ex in _examples(builder, "train").items():
        stems = [s.decode() for s in ex["metadata"]["image_stem"]]
        records = [json.loads((root / location_id / f"{stem}.json").read_text()) for stem in stems]
        assert list(ex["timestamps"]) == [_unix_seconds(r["timestamp"]) for r in records]
        assert np.all(np.diff(ex["timestamps"]) > 0)
        np.testing.assert_allclose(ex["metadata"]["gsd"], [r["gsd"] for r in records], rtol=1e-6)
        assert [c.decode() for c in ex["metadata"]["country_code"]] == [r["country_code"] for r in records]


def test_coordinates_are_the_footprint_centroids(clean):
    root, _, builder = clean
    for split in ("train", "val"):
        for location_id, ex in _examples(builder, split).items():
            records = [json.loads(p.read_text()) for p in (root / location_id).glob("*_rgb.json")]
            lat, lon = _sphere_mean([_fan_centroid(r["raw_location"]) for r in records])
            assert abs(ex["coordinates"][0] - lat) < 1e-4, location_id
            assert _lon_diff(ex["coordinates"][1], lon) < 1e-4, location_id


def test_labels_are_the_folder_classes(clean):
    _, _, builder = clean
    names = builder.info.features["label"].names
    assert tuple(names) == fmow_format.CLASS_NAMES
    for location_id, ex in _examples(builder, "train").items():
        assert names[ex["label"]] == location_id.split("/")[1]


def test_small_images_are_stored_byte_for_byte_with_their_box(clean):
    """Images whose shorter side is at most 448 px are the release's own JPEG bytes (no re-encoding), and the
    labelled box is stored as (ymin, xmin, ymax, xmax) fractions of the image."""
    root, _, builder = clean
    stored = _stored_jpegs(builder, "train")
    for location_id, ex in _examples(builder, "train").items():
        stems = [s.decode() for s in ex["metadata"]["image_stem"]]
        assert stored[location_id] == [(root / location_id / f"{stem}.jpg").read_bytes() for stem in stems]
        for stem, box in zip(stems, ex["metadata"]["box"], strict=True):
            record = json.loads((root / location_id / f"{stem}.json").read_text())
            x, y, w, h = record["bounding_boxes"][0]["box"]
            width, height = record["img_width"], record["img_height"]
            np.testing.assert_allclose(box, [y / height, x / width, (y + h) / height, (x + w) / width], atol=1e-6)


def test_a_large_image_is_stored_as_torchvisions_resize_448_makes_it():
    yy, xx = np.mgrid[0:1200, 0:1700]
    pixels = np.stack([xx * 255 // 1700, yy * 255 // 1200, (xx + yy) * 255 // 2900], -1).astype(np.uint8)
    pixels[500:800, 700:1000] = (250, 250, 40)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    jpeg, original = fmow_reader.fit_to_jpeg(buffer.getvalue(), 448)
    got = np.asarray(Image.open(io.BytesIO(jpeg)), np.float32)
    assert original == (1700, 1200)
    assert got.shape == (448, int(448 * 1700 / 1200), 3)  # torchvision's Resize(448): the long side truncated.
    expected = np.asarray(Image.fromarray(pixels).resize((634, 448), Image.Resampling.BILINEAR), np.float32)
    assert np.abs(got - expected).mean() < 3.0
    # A landscape image resized the other way round would not even have this shape; a grey one is converted.
    grey = io.BytesIO()
    Image.fromarray(pixels[:300, :200, 0]).save(grey, format="JPEG")
    jpeg, original = fmow_reader.fit_to_jpeg(grey.getvalue(), 448)
    assert original == (200, 300) and Image.open(io.BytesIO(jpeg)).mode == "RGB"


# ---------------------------------------------------------------------------------------------------------
# A messy tree: every kind of bad file, plus harmless oddities that must not matter.


def _location_with_images(root, split, at_least, exclude=()):
    for d in sorted((root / split).glob("*/*")):
        if len(_pairs_on_disk(d)) >= at_least and d not in exclude:
            return d
    raise AssertionError(f"no {split} location with {at_least} images in the generated tree")


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    root = tmp_path_factory.mktemp("messy") / "fmow-rgb"
    sample_data.generate(root, seed=5, locations_per_split={"train": 11, "val": 2}, image_size_range=(48, 64))
    used = []

    def pick(at_least=2):
        used.append(_location_with_images(root, "train", at_least, used))
        return used[-1]

    bad = {}
    d = pick()
    bad["truncated"] = d / f"{_pairs_on_disk(d)[0]}.jpg"
    bad["truncated"].write_bytes(bad["truncated"].read_bytes()[:200])
    d = pick()
    bad["no_location"] = d / f"{_pairs_on_disk(d)[0]}.json"
    record = json.loads(bad["no_location"].read_text())
    del record["raw_location"]
    bad["no_location"].write_text(json.dumps(record))
    d = pick()
    bad["bad_time"] = d / f"{_pairs_on_disk(d)[0]}.json"
    record = json.loads(bad["bad_time"].read_text())
    record["timestamp"] = "yesterday"
    bad["bad_time"].write_text(json.dumps(record))
    d = pick()
    bad["lone_json"] = d / f"{_pairs_on_disk(d)[0]}.json"
    bad["lone_json"].with_suffix(".jpg").unlink()
    bad["lone_image"] = d / f"{_pairs_on_disk(d)[0]}.jpg"
    bad["lone_image"].with_suffix(".json").unlink()
    # A location whose only image is corrupt: keep one pair and overwrite its JPEG with garbage.
    d = pick(at_least=1)
    for stem in _pairs_on_disk(d)[1:]:
        (d / f"{stem}.jpg").unlink()
        (d / f"{stem}.json").unlink()
    bad["dropped"] = d
    bad["only_image"] = d / f"{_pairs_on_disk(d)[0]}.jpg"
    bad["only_image"].write_bytes(b"not a jpeg at all")
    # Footprints off the globe (a NaN vertex, a latitude of 95) and a box wholly outside its image.
    for key, edit in (("nan_location", lambda r: r.update(raw_location=r["raw_location"].replace(
                          r["raw_location"].split("((")[1].split(" ")[0], "nan", 1))),
                      ("far_location", lambda r: r.update(raw_location="POLYGON ((10 95, 10.01 95, 10.01 95.01, "
                                                                        "10 95.01, 10 95))")),
                      ("box_outside",
                       lambda r: r["bounding_boxes"][0].update(box=[r["img_width"] + 5, 0, 10, 10]))):
        d = pick()
        bad[key] = d / f"{_pairs_on_disk(d)[0]}.json"
        record = json.loads(bad[key].read_text())
        edit(record)
        bad[key].write_text(json.dumps(record))
    # Harmless: extra keys, a decoy box first, _min/_max_dbl variants, _msrgb companions, a stray file.
    d = pick()
    odd = d / f"{_pairs_on_disk(d)[0]}.json"
    record = json.loads(odd.read_text())
    angle = record.pop("off_nadir_angle_dbl")
    record.update(off_nadir_angle_min_dbl=angle - 1.0, off_nadir_angle_max_dbl=angle + 3.0, catalog_id="10400",
                  coordinates="[1.0, 2.0]")
    record["bounding_boxes"].insert(0, {"ID": 1, "box": [0, 0, 3, 3], "category": "false_detection"})
    odd.write_text(json.dumps(record))
    bad["odd"], bad["odd_angle"] = odd, angle + 1.0
    for stem in _pairs_on_disk(d):
        for ext in (".jpg", ".json"):
            shutil.copy(d / f"{stem}{ext}", d / f"{stem[:-len('_rgb')]}_msrgb{ext}")
    (d / "notes.txt").write_text("stray file")
    (root / "train" / "false_detection" / "false_detection_0").mkdir(parents=True)
    return root, bad


def test_messy_release_skips_and_counts_bad_files(messy, tmp_path, caplog):
    root, bad = messy
    caplog.set_level(logging.INFO)
    builder = _build(root, tmp_path)
    examples = _examples(builder, "train")

    dropped_id = f"train/{bad['dropped'].parent.name}/{bad['dropped'].name}"
    expected_ids = set(_locations_on_disk(root, "train")) - {dropped_id, "train/false_detection/false_detection_0"}
    assert set(examples) == expected_ids
    skipped_stems = {bad[k].name[:-len(bad[k].suffix)] for k in
                     ("truncated", "no_location", "bad_time", "lone_json", "lone_image", "nan_location",
                      "far_location", "box_outside")}
    for location_id, ex in examples.items():
        expected = sorted(set(_pairs_on_disk(root / location_id)) - skipped_stems)
        assert sorted(s.decode() for s in ex["metadata"]["image_stem"]) == expected
        assert np.all(np.isfinite(ex["coordinates"])) and abs(ex["coordinates"][0]) <= 90

    odd_id = f"train/{bad['odd'].parent.parent.name}/{bad['odd'].parent.name}"
    odd = examples[odd_id]
    index = [s.decode() for s in odd["metadata"]["image_stem"]].index(bad["odd"].stem)
    assert odd["metadata"]["off_nadir_angle_dbl"][index] == pytest.approx(bad["odd_angle"], abs=1e-3)

    messages = [r.getMessage() for r in caplog.records]
    summary = [m for m in messages if "fmow train: wrote" in m]
    assert len(summary) == 1
    assert (f"wrote {len(expected_ids)} locations" in summary[0]
            and "skipped images: box_outside_image=1, image_without_json=1, invalid_field=1, invalid_location=2, "
                "json_without_image=1, missing_field=1, unreadable_image=2; dropped locations: 1" in summary[0]), \
        summary[0]
    warnings = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    for key in ("truncated", "no_location", "bad_time", "lone_json", "lone_image", "only_image", "nan_location",
                "far_location", "box_outside"):
        assert str(bad[key]) in warnings, key
    assert dropped_id in warnings


def test_split_with_no_usable_location_is_an_error(tmp_path):
    root = tmp_path / "fmow-rgb"
    sample_data.generate(root, seed=1, locations_per_split={"train": 2, "val": 1}, image_size_range=(48, 56))
    for image in (root / "val").glob("*/*/*.jpg"):
        image.write_bytes(b"")
    with pytest.raises(ValueError, match=r"val: no usable location in .*val"):
        _build(root, tmp_path / "data")


# ---------------------------------------------------------------------------------------------------------
# Bad manual dirs.


def test_missing_manual_dir_is_a_clear_error(tmp_path):
    with pytest.raises(AssertionError, match="does not exist or is empty") as error:
        _build(tmp_path / "nowhere", tmp_path / "data")
    assert S3_URI in str(error.value)


def test_empty_manual_dir_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(AssertionError, match="does not exist or is empty") as error:
        _build(tmp_path / "empty", tmp_path / "data")
    assert S3_URI in str(error.value)


@pytest.mark.parametrize("layout", ["no_train", "train_without_categories"])
def test_wrong_layout_is_a_clear_error(tmp_path, layout):
    root = tmp_path / "release"
    if layout == "no_train":
        (root / "fmow-rgb" / "train" / "airport").mkdir(parents=True)  # One level too high.
    else:
        (root / "train" / "0000001" / "0000001_0").mkdir(parents=True)
    with pytest.raises(fmow_reader.LayoutError, match=r"not an fMoW-rgb release root: expected .*train/<category>/"
                       ) as error:
        _build(root, tmp_path / "data")
    assert S3_URI in str(error.value)
    assert f"found {'fmow-rgb/' if layout == 'no_train' else 'train/'}." in str(error.value)


# ---------------------------------------------------------------------------------------------------------
# The real `tfds build` command.


def test_tfds_build_cli_and_load(tmp_path):
    root = tmp_path / "fmow-rgb"
    summary = sample_data.generate(root, seed=4, locations_per_split={"train": 2, "val": 1},
                                   image_size_range=(48, 56))
    tfds_cli = pathlib.Path(sys.executable).parent / "tfds"
    # The README's command exactly: no --config, no --file_format. It builds the one dataset users need, as
    # ArrayRecord, even on a tree without the optional _msrgb files.
    result = subprocess.run(
        [str(tfds_cli), "build", "tfds_builders/fmow", f"--manual_dir={root}", f"--data_dir={tmp_path / 'data'}"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 0, result.stderr[-3000:]
    built = tmp_path / "data" / "fmow" / str(fmow_dataset_builder.Builder.VERSION)
    assert [p.name for p in (tmp_path / "data" / "fmow").iterdir()] == [built.name]  # One dataset, no configs.
    builder = tfds.builder_from_directory(str(built))
    assert builder.info.file_format.value == "array_record"
    for split in ("train", "val"):
        examples = _examples(builder, split)
        assert len(examples) == summary[split]["locations"]
        assert sum(len(ex["timestamps"]) for ex in examples.values()) == summary[split]["images"]


# ---------------------------------------------------------------------------------------------------------
# Streaming: the bounded map.


def test_map_unordered_bounds_the_work_in_flight():
    pulled = []

    def items():
        for i in range(50):
            pulled.append(i)
            yield i

    results = []
    for result in fmow_dataset_builder._map_unordered(lambda i: i * i, items(), workers=2, max_in_flight=3):
        assert len(pulled) <= len(results) + 3
        results.append(result)
    assert sorted(results) == [i * i for i in range(50)]


# ---------------------------------------------------------------------------------------------------------
# Pure functions.


def test_parse_timestamp():
    assert fmow_format.parse_timestamp("2012-04-02T10:32:22Z") == calendar.timegm((2012, 4, 2, 10, 32, 22))
    assert fmow_format.parse_timestamp("2012-04-02T10:32:22.999Z") == calendar.timegm((2012, 4, 2, 10, 32, 22))
    assert fmow_format.parse_timestamp("2012-04-02T12:32:22+02:00") == calendar.timegm((2012, 4, 2, 10, 32, 22))
    assert fmow_format.parse_timestamp("2012-04-02T10:32:22") == calendar.timegm((2012, 4, 2, 10, 32, 22))
    assert fmow_format.parse_timestamp("1969-12-31T23:59:59.5Z") == -1
    for bad in ("yesterday", "", 1333362742, None):
        with pytest.raises(ValueError):
            fmow_format.parse_timestamp(bad)


def _wkt(*rings):
    return "POLYGON (" + ", ".join("(" + ", ".join(f"{x} {y}" for x, y in ring) + ")" for ring in rings) + ")"


def test_footprint_centroid_simple_shapes():
    square = [(10, 40), (12, 40), (12, 41), (10, 41), (10, 40)]
    assert fmow_format.footprint_centroid(_wkt(square)) == pytest.approx((40.5, 11.0))
    assert fmow_format.footprint_centroid(_wkt(square[::-1])) == pytest.approx((40.5, 11.0))  # Clockwise.
    # An L: unit squares at (0,0), (1,0), (0,1) -> centroid (5/6, 5/6); not the vertex mean (6/7-ish).
    ell = [(0, 0), (2, 0), (2, 1), (1, 1), (1, 2), (0, 2), (0, 0)]
    assert fmow_format.footprint_centroid(_wkt(ell)) == pytest.approx((5 / 6, 5 / 6))
    # A 4x4 square with a 1x1 hole at [2,3]x[2,3]: (16 * 2 - 1 * 2.5) / 15 on both axes.
    outer = [(0, 0), (4, 0), (4, 4), (0, 4), (0, 0)]
    hole = [(2, 2), (3, 2), (3, 3), (2, 3), (2, 2)]
    assert fmow_format.footprint_centroid(_wkt(outer, hole)) == pytest.approx((29.5 / 15, 29.5 / 15))
    # Z ordinates are dropped; a degenerate footprint falls back to its vertex mean.
    assert fmow_format.footprint_centroid("POLYGON Z ((0 0 5, 2 0 5, 2 2 5, 0 2 5, 0 0 5))") == pytest.approx((1, 1))
    assert fmow_format.footprint_centroid(_wkt([(0, 0), (1, 1), (2, 2), (0, 0)])) == pytest.approx((1, 1))


def test_footprint_centroid_across_the_antimeridian():
    straddling = [(179.99, -17.0), (-179.97, -17.0), (-179.97, -16.98), (179.99, -16.98), (179.99, -17.0)]
    lat, lon = fmow_format.footprint_centroid(_wkt(straddling))
    assert lat == pytest.approx(-16.99)
    assert _lon_diff(lon, -179.99) < 1e-9 and -180 <= lon < 180
    lat, lon = fmow_format.mean_lat_lon([(10.0, 179.9), (10.0, -179.9)])
    assert lat == pytest.approx(10.0, abs=1e-3) and _lon_diff(lon, 180.0) < 1e-9
    lat, lon = fmow_format.mean_lat_lon([(0.0, 10.0), (0.0, 20.0), (0.0, 30.0)])
    assert (lat, lon) == pytest.approx((0.0, 20.0))


@pytest.mark.parametrize("wkt", ["POINT (1 2)", "POLYGON ((0 0, 1 1))", "POLYGON ((a b, c d, e f))", "", None])
def test_footprint_centroid_rejects_bad_wkt(wkt):
    with pytest.raises(ValueError):
        fmow_format.footprint_centroid(wkt)


def test_choose_box():
    boxes = [{"box": [1, 2, 3, 4], "category": "tower"}, {"box": [5, 6, 7, 8], "category": "airport"}]
    assert fmow_format.choose_box(boxes, "airport") == (5, 6, 7, 8)
    assert fmow_format.choose_box(boxes, "zoo") == (1, 2, 3, 4)
    for bad in ([], "box", [{"box": [1, 2, 3]}], [{"ID": 1}], [{"box": [1, 2, "x", 4]}],
                [{"box": [0, 0, 1e300, 1]}]):
        with pytest.raises(ValueError):
            fmow_format.choose_box(bad, "airport")


def test_parse_image_record():
    record = {"timestamp": "2012-04-02T10:32:22Z", "raw_location": _wkt([(0, 0), (2, 0), (2, 2), (0, 2), (0, 0)]),
              "bounding_boxes": [{"box": [1, 2, 3, 4], "category": "dam"}], "gsd": "0.5", "cloud_cover": 12,
              "sun_elevation_start_dbl": 10.0, "sun_elevation_end_dbl": 20.0, "extra": {"nested": [1]}}
    parsed = fmow_format.parse_image_record(record, "dam")
    assert parsed.timestamp == calendar.timegm((2012, 4, 2, 10, 32, 22))
    assert parsed.lat_lon == pytest.approx((1.0, 1.0)) and parsed.box == (1, 2, 3, 4)
    assert parsed.metadata["gsd"] == 0.5 and parsed.metadata["sun_elevation_dbl"] == 15.0
    assert math.isnan(parsed.metadata["off_nadir_angle_dbl"]) and parsed.metadata["country_code"] == ""
    for key, reason in (("timestamp", "missing_field"), ("raw_location", "missing_field"),
                        ("bounding_boxes", "missing_field")):
        with pytest.raises(fmow_format.RecordError, match=key) as error:
            fmow_format.parse_image_record({k: v for k, v in record.items() if k != key}, "dam")
        assert error.value.reason == reason
    for key, value in (("timestamp", "soon"), ("raw_location", "POINT (0 0)"), ("bounding_boxes", [{"x": 1}])):
        with pytest.raises(fmow_format.RecordError) as error:
            fmow_format.parse_image_record({**record, key: value}, "dam")
        assert error.value.reason == "invalid_field"
    with pytest.raises(fmow_format.RecordError):
        fmow_format.parse_image_record(["not", "a", "dict"], "dam")
    # A footprint off the globe is its own reason: one such image would make its location's coordinates NaN.
    for footprint in ("POLYGON ((0 0, nan 0, 2 2, 0 0))", "POLYGON ((0 0, 2 0, 2 91, 0 0))",
                      "POLYGON ((180.5 0, 181 0, 181 1, 180.5 0))", "POLYGON ((0 0, inf 0, 2 2, 0 0))"):
        with pytest.raises(fmow_format.RecordError, match="raw_location") as error:
            fmow_format.parse_image_record({**record, "raw_location": footprint}, "dam")
        assert error.value.reason == "invalid_location"
    assert fmow_format.parse_image_record({**record, "raw_location": "POLYGON ((179 -90, 180 -90, 180 -89, "
                                                                     "179 -90))"}, "dam").lat_lon[0] < -89
