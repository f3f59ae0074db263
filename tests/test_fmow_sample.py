"""Tests of geo_contrast.sample_data: the fMoW-rgb layout and JSON schema, determinism, the CLI, and the claim
that the pictures carry learnable structure (shape decides the class, place decides the ground).

Every check reads the written tree back with independent code (regexes, PIL, numpy), never the generator's
helpers. The default-size tree is generated once per module (a few seconds).
"""

import datetime
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tfds_builders.fmow import sample as sample_data
from tfds_builders.fmow.fmow_format import CLASS_NAMES

# Every key of the release's example record (fmow-format.md).
REFERENCE_KEYS = (
    "img_filename",
    "img_width",
    "img_height",
    "gsd",
    "cloud_cover",
    "timestamp",
    "utm",
    "country_code",
    "scan_direction",
    "off_nadir_angle_dbl",
    "target_azimuth_dbl",
    "sun_azimuth_dbl",
    "sun_elevation_dbl",
    "pan_resolution_dbl",
    "multi_resolution_dbl",
    "approximate_wavelengths",
    "raw_location",
    "bounding_boxes",
)
FILE_RE = re.compile(r"^(?P<stem>(?P<folder>(?P<category>[a-z_\-]+)_(?P<loc>\d+))_(?P<t>\d+))_rgb\.(jpg|json)$")
WKT_RE = re.compile(r"^POLYGON \(\((.*)\)\)$")
SMALL = {"train": 12, "val": 4}


@pytest.fixture(scope="module")
def small_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    return root, sample_data.generate(root, seed=3, locations_per_split=SMALL)


@pytest.fixture(scope="module")
def default_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("default")
    return root, sample_data.generate(root)


def _files(root):
    """{relative path: bytes} of every file under root."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def _locations(root):
    """{(split, category, folder): [(t, record, jpg path), ...]} read from disk."""
    out = {}
    for split in sorted(os.listdir(root)):
        for category in sorted(os.listdir(root / split)):
            for folder in sorted(os.listdir(root / split / category)):
                entries = []
                for name in sorted(os.listdir(root / split / category / folder)):
                    if name.endswith(".json"):
                        with open(root / split / category / folder / name) as f:
                            record = json.load(f)
                        jpg = root / split / category / folder / name.replace(".json", ".jpg")
                        entries.append((int(FILE_RE.match(name)["t"]), record, jpg))
                out[(split, category, folder)] = entries
    return out


def _polygon(record):
    """[(lon, lat), ...] of the record's WKT footprint."""
    match = WKT_RE.match(record["raw_location"])
    assert match, record["raw_location"]
    return [tuple(float(v) for v in point.split()) for point in match.group(1).split(",")]


def _centre(record):
    """(lat, lon) of the footprint's centre."""
    corners = np.array(_polygon(record)[:4])
    return corners[:, 1].mean(), corners[:, 0].mean()


def _time(record):
    return datetime.datetime.strptime(record["timestamp"], "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=datetime.timezone.utc
    )


def _pixels(jpg):
    with Image.open(jpg) as image:
        return np.asarray(image.convert("RGB"), np.float64) / 255.0


# ----------------------------------------------------------------------------------------------------------
# Layout and schema.


def test_sample_classes_are_eight_fmow_classes_in_label_order():
    classes = sample_data.SAMPLE_CLASSES
    assert len(set(classes)) == 8 and set(classes) <= set(CLASS_NAMES)
    assert list(classes) == sorted(classes)


def test_layout_matches_the_fmow_pattern(small_tree):
    root, _ = small_tree
    assert sorted(os.listdir(root)) == ["train", "val"]
    for split in ("train", "val"):
        categories = os.listdir(root / split)
        assert set(categories) <= set(sample_data.SAMPLE_CLASSES)
        for category in categories:
            folders = os.listdir(root / split / category)
            # Location numbers run 0..k-1 per split and category, as in the release.
            assert sorted(int(f.rsplit("_", 1)[1]) for f in folders) == list(range(len(folders)))
            for folder in folders:
                assert re.fullmatch(re.escape(category) + r"_\d+", folder)
                names = os.listdir(root / split / category / folder)
                matches = [FILE_RE.match(n) for n in names]
                assert all(matches), names
                assert {(m["category"], m["folder"]) for m in matches} == {(category, folder)}
                stems = sorted({m["stem"] for m in matches})
                assert sorted(names) == sorted(s + "_rgb." + ext for s in stems for ext in ("jpg", "json"))
                assert sorted(int(FILE_RE.match(n)["t"]) for n in names if n.endswith(".jpg")) == list(
                    range(len(stems))
                )


def test_records_have_every_reference_key_and_plausible_values(small_tree):
    root, _ = small_tree
    box_ids = []
    for (_, category, _), entries in _locations(root).items():
        for _, record, jpg in entries:
            assert set(REFERENCE_KEYS) <= set(record), set(REFERENCE_KEYS) - set(record)
            assert record["img_filename"] == jpg.name
            with Image.open(jpg) as image:
                assert image.format == "JPEG" and image.mode == "RGB"
                assert (record["img_width"], record["img_height"]) == image.size
                assert 96 <= min(image.size) and max(image.size) <= 160
            assert 0.3 <= record["gsd"] <= 2.0 and record["pan_resolution_dbl"] == record["gsd"]
            assert record["multi_resolution_dbl"] > record["pan_resolution_dbl"]
            assert isinstance(record["cloud_cover"], int) and 0 <= record["cloud_cover"] <= 100
            assert 2002 <= _time(record).year <= 2017
            assert re.fullmatch(r"([1-9]|[1-5]\d|60)[C-HJ-NP-X]|[ABYZ]", record["utm"]), record["utm"]
            assert re.fullmatch(r"[A-Z]{3}", record["country_code"])
            assert record["scan_direction"] in ("Forward", "Reverse")
            assert 0 <= record["off_nadir_angle_dbl"] <= 60
            assert 0 <= record["target_azimuth_dbl"] < 360 and 0 <= record["sun_azimuth_dbl"] < 360
            assert 0 < record["sun_elevation_dbl"] <= 90
            assert record["approximate_wavelengths"] == [661, 545, 477]

            polygon = _polygon(record)
            assert len(polygon) == 5 and polygon[0] == polygon[-1]
            assert all(-180 <= lon <= 180 and -90 <= lat <= 90 for lon, lat in polygon)
            lat, lon = _centre(record)
            # Imaged mid-morning local solar time (the UTC hour shifted by the longitude).
            utc = _time(record)
            local_hour = (utc.hour + utc.minute / 60 + lon / 15) % 24
            assert 9 <= local_hour <= 12, (record["timestamp"], lon)

            (box,) = record["bounding_boxes"]
            assert set(box) == {"ID", "box", "category", "visible"}
            assert box["category"] == category and box["visible"] == "True"
            x, y, w, h = box["box"]
            width, height = record["img_width"], record["img_height"]
            assert 0 <= x and 0 <= y and x + w <= width and y + h <= height
            assert 0.3 <= w / width <= 0.65 and 0.3 <= h / height <= 0.65, (box["box"], width, height)
            box_ids.append(box["ID"])
    assert len(box_ids) == len(set(box_ids))


def test_footprints_put_the_box_centre_of_every_revisit_on_one_point(small_tree):
    """The location's coordinate is well defined: each image's box centre projects to the same lon/lat."""
    root, _ = small_tree
    for key, entries in _locations(root).items():
        points = []
        for _, record, _ in entries:
            corners = np.array(_polygon(record)[:4])
            west, east = corners[:, 0].min(), corners[:, 0].max()
            south, north = corners[:, 1].min(), corners[:, 1].max()
            x, y, w, h = record["bounding_boxes"][0]["box"]
            points.append(
                (
                    west + (x + w / 2) / record["img_width"] * (east - west),
                    north - (y + h / 2) / record["img_height"] * (north - south),
                )
            )
        np.testing.assert_allclose(points, np.broadcast_to(points[0], np.shape(points)), atol=2e-6, err_msg=key)


def test_summary_counts_what_is_on_disk(small_tree, default_tree):
    for (root, summary), expected in ((small_tree, SMALL), (default_tree, {"train": 300, "val": 300, "test": 300})):
        locations = _locations(root)
        on_disk = {
            split: {
                "locations": sum(1 for k in locations if k[0] == split),
                "images": sum(len(v) for k, v in locations.items() if k[0] == split),
            }
            for split in expected
        }
        assert summary == on_disk
        assert {split: counts["locations"] for split, counts in summary.items()} == expected


def test_one_to_six_images_per_location(default_tree):
    counts = [len(entries) for entries in _locations(default_tree[0]).values()]
    assert set(counts) == set(range(1, 7))


def test_file_index_is_never_the_time_order(small_tree):
    """`<t>` must not be time: consumers have to sort by timestamp. Timestamps are distinct per location."""
    multi = 0
    for key, entries in _locations(small_tree[0]).items():
        times = [_time(record) for _, record, _ in sorted(entries, key=lambda e: e[0])]
        assert len(set(times)) == len(times), key
        if len(times) > 1:
            multi += 1
            assert times != sorted(times), key
    assert multi > 0


def test_classes_argument_picks_the_categories(tmp_path):
    summary = sample_data.generate(tmp_path, seed=1, locations_per_split={"val": 4}, classes=("dam", "airport"))
    assert summary == {"val": {"locations": 4, "images": summary["val"]["images"]}}
    assert sorted(os.listdir(tmp_path)) == ["val"]
    assert sorted(os.listdir(tmp_path / "val")) == ["airport", "dam"]


# ----------------------------------------------------------------------------------------------------------
# Determinism, size, CLI, bad input.


def test_same_seed_writes_the_same_bytes_and_another_seed_does_not(tmp_path):
    trees = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        sample_data.generate(tmp_path / name, seed=seed, locations_per_split={"train": 5, "val": 2})
        trees[name] = _files(tmp_path / name)
    assert trees["a"] == trees["b"]
    assert trees["a"] != trees["c"]
    shared_jpgs = [p for p in set(trees["a"]) & set(trees["c"]) if p.endswith(".jpg")]
    assert all(trees["a"][p] != trees["c"][p] for p in shared_jpgs)


def test_default_tree_spans_the_antimeridian_and_the_poles(default_tree):
    centres = [_centre(entries[0][1]) for entries in _locations(default_tree[0]).values()]
    lats, lons = np.array(centres).T
    assert np.sum(lons > 179) >= 2 and np.sum(lons < -179) >= 2
    assert np.sum(lats > 70) >= 5 and np.sum(lats < -70) >= 5


def test_default_tree_is_small(default_tree):
    total = sum(len(data) for data in _files(default_tree[0]).values())
    assert total < 16 * 2**20, total  # 900 locations (300 per split), ~3,200 images.


def test_cli_writes_the_tree_and_refuses_a_non_empty_directory(tmp_path):
    command = [
        sys.executable,
        "-m",
        "tfds_builders.fmow.sample",
        str(tmp_path / "tree"),
        "--seed",
        "2",
        "--train_locations",
        "3",
        "--val_locations",
        "2",
        "--test_locations",
        "0",
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    summary = json.loads(done.stdout)
    assert set(summary) == {"train", "val"} and not (tmp_path / "tree" / "test").exists()
    for split, n_locations in (("train", 3), ("val", 2)):
        jpgs = [n for _, _, names in os.walk(tmp_path / "tree" / split) for n in names if n.endswith(".jpg")]
        assert summary[split] == {"locations": n_locations, "images": len(jpgs)}
    again = subprocess.run(command, capture_output=True, text=True)
    assert again.returncode == 2 and "not empty" in again.stderr


def test_grain_adds_pixel_noise_and_jpeg_bytes_without_moving_anything(tmp_path):
    """The benchmark's grain makes realistic (larger) JPEGs of the same scenes: same files, boxes and metadata."""
    trees = {g: tmp_path / f"g{g}" for g in (sample_data.DEFAULT_GRAIN, sample_data.BENCHMARK_GRAIN)}
    for grain, root in trees.items():
        sample_data.generate(root, seed=2, locations_per_split={"train": 2}, grain=grain)
    files = {g: sorted(str(p.relative_to(r)) for p in r.rglob("*") if p.is_file()) for g, r in trees.items()}
    faint, grainy = trees.values()
    assert files[sample_data.DEFAULT_GRAIN] == files[sample_data.BENCHMARK_GRAIN]
    jsons = [f for f in files[sample_data.DEFAULT_GRAIN] if f.endswith(".json")]
    assert jsons and all((faint / f).read_text() == (grainy / f).read_text() for f in jsons)
    jpgs = [f for f in files[sample_data.DEFAULT_GRAIN] if f.endswith(".jpg")]
    size = lambda root: sum((root / f).stat().st_size for f in jpgs)
    assert size(grainy) > 1.5 * size(faint)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"classes": ("airport", "castle")}, "castle"),
        ({"classes": ("airport", "airport")}, "distinct"),
        ({"classes": CLASS_NAMES[:9]}, "1..8"),
        ({"locations_per_split": {"training": 3}}, "training"),
        ({"locations_per_split": {"train": 0}}, "train"),
        ({"image_size_range": (160, 96)}, "image_size_range"),
        ({"seed": -1}, "seed"),
        ({"grain": -0.1}, "grain"),
    ],
)
def test_bad_arguments_are_refused_before_writing(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        sample_data.generate(tmp_path / "tree", **kwargs)
    assert not (tmp_path / "tree").exists()


# ----------------------------------------------------------------------------------------------------------
# Learnable structure, checked with simple statistics.


def _unit_vectors(lat_lon):
    lat, lon = np.radians(np.asarray(lat_lon)).T
    return np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], axis=1)


def test_surroundings_follow_the_place(default_tree):
    """Ground chromaticity outside the box: revisits of a location agree more than neighbours, which agree
    more than places far apart. (Chromaticity, because brightness changes with the sun.)"""
    features, location_ids, centres = [], [], []
    for key, entries in _locations(default_tree[0]).items():
        if key[0] != "train":
            continue
        for _, record, jpg in entries:
            pixels = _pixels(jpg)
            x, y, w, h = record["bounding_boxes"][0]["box"]
            outside = np.ones(pixels.shape[:2], bool)
            outside[max(0, y - 4) : y + h + 4, max(0, x - 4) : x + w + 4] = False
            ground = pixels[outside]
            features.append((ground / (ground.sum(axis=1, keepdims=True) + 1e-6)).mean(axis=0)[:2])
            location_ids.append(key)
            centres.append(_centre(record))
    features = np.array(features)
    distance = np.linalg.norm(features[:, None] - features[None], axis=-1)
    xyz = _unit_vectors(centres)
    angle = np.degrees(np.arccos(np.clip(xyz @ xyz.T, -1, 1)))
    _, ids = np.unique(np.array(location_ids), axis=0, return_inverse=True)
    pair = np.triu(np.ones_like(distance, bool), 1)
    same = pair & (ids[:, None] == ids[None])
    near = pair & (ids[:, None] != ids[None]) & (angle < 5)
    far = pair & (angle > 30)
    assert same.sum() > 100 and near.sum() > 100 and far.sum() > 1000
    # Revisits share a hint of the place's style (their ground changes between visits, and no noise pattern is
    # shared: no per-location fingerprint), so they agree more than places far apart, but not by much.
    assert 0.6 * distance[far].mean() < distance[same].mean() < 0.9 * distance[far].mean()
    assert distance[near].mean() < 0.9 * distance[far].mean()


def _box_features(root, split):
    """(mean box colour, gradient layout of the box, category) per image of a split."""
    colours, layouts, labels = [], [], []
    for key, entries in _locations(root).items():
        if key[0] != split:
            continue
        for _, record, jpg in entries:
            x, y, w, h = record["bounding_boxes"][0]["box"]
            box = _pixels(jpg)[y : y + h, x : x + w]
            colours.append(box.reshape(-1, 3).mean(axis=0))
            gray = Image.fromarray(np.round(box.mean(axis=2) * 255).astype(np.uint8)).resize(
                (12, 12), Image.Resampling.BILINEAR
            )
            gray = np.asarray(gray, np.float64)
            # Where the edges are and which way they run; the sign of the contrast (colours) is dropped.
            edges = np.concatenate(
                [np.abs(np.diff(gray, axis=1))[:-1].ravel(), np.abs(np.diff(gray, axis=0))[:, :-1].ravel()]
            )
            layouts.append(edges / (edges.sum() + 1e-9))
            labels.append(key[1])
    return np.array(colours), np.array(layouts), np.array(labels)


def _nearest_class_mean_accuracy(train_x, train_y, test_x, test_y):
    classes = np.unique(train_y)
    means = np.stack([train_x[train_y == c].mean(axis=0) for c in classes])
    predicted = classes[np.argmin(((test_x[:, None] - means[None]) ** 2).sum(axis=-1), axis=1)]
    return np.mean(predicted == test_y)


def test_box_colour_does_not_predict_the_class_but_its_shape_does(default_tree):
    """Nearest class mean, fit on train and scored on val (chance 1/8): the mean colour of the box stays near
    chance, a crude edge-layout statistic of the same box is far above it."""
    train_colour, train_layout, train_y = _box_features(default_tree[0], "train")
    val_colour, val_layout, val_y = _box_features(default_tree[0], "val")
    assert len(val_y) > 200 and len(np.unique(val_y)) == 8
    assert _nearest_class_mean_accuracy(train_colour, train_y, val_colour, val_y) < 0.25
    assert _nearest_class_mean_accuracy(train_layout, train_y, val_layout, val_y) > 0.7
