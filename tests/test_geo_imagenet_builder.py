"""GeoImageNet builder and sample generator on generated trees, checked against geotags.csv read independently."""

import collections
import csv
import hashlib
import io
import itertools
import logging
import os
import pathlib
import re
import subprocess
import sys
import tarfile

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from tfds_builders.geo_imagenet import sample as sample_geo_imagenet
from tfds_builders.geo_imagenet import geo_imagenet_dataset_builder as gib
from tfds_builders.geo_imagenet import geotags_format as fmt

BUILDER_DIR = pathlib.Path(gib.__file__).parent
REPO_ROOT = BUILDER_DIR.parents[1]
GHOST_WNID = "n09999999"  # in geotags.csv, absent from the manual dir


def expected_split(image_id, val_fraction):
    """The documented rule written out again: first 8 bytes of SHA-256, big-endian, vs val_fraction * 2**64."""
    value = int(hashlib.sha256(image_id.encode()).hexdigest()[:16], 16)
    return "val" if value / 2.0**64 < val_fraction else "train"


def read_geotags_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return {row["image_id"]: row for row in csv.DictReader(f)}


def build(manual_dir, data_dir, config="s64"):
    builder = gib.Builder(config=config, data_dir=str(data_dir))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
    return builder


def examples(builder, split):
    """Every example of a built split, in stored order (the default ArrayRecord files read by index)."""
    source = builder.as_data_source(split)
    return [source[i] for i in range(len(source))]


# ---------------------------------------------------------------------------------------------------------------
# Pure parts.


def test_split_of_follows_the_documented_hash_and_ratio():
    ids = [f"n{1000000 + i % 7:08d}_{i}" for i in range(5000)]
    for fraction in (0.1, 0.2):
        splits = [fmt.split_of(i, fraction) for i in ids]
        assert splits == [expected_split(i, fraction) for i in ids]
        assert abs(splits.count("val") / len(ids) - fraction) < 0.02
    # A bigger val fraction only moves images from train to val, never back.
    assert all(fmt.split_of(i, 0.2) == "val" for i in ids if fmt.split_of(i, 0.1) == "val")


@pytest.mark.parametrize("width, height, side, want", [
    (400, 300, 256, (341, 256)), (300, 400, 64, (64, 85)), (50, 40, 64, (80, 64)), (10, 1000, 1, (1, 100)),
    (256, 256, 256, (256, 256))])
def test_resized_size(width, height, side, want):
    assert gib.resized_size(width, height, side) == want


def _encoded(mode, size, fmt):
    buffer = io.BytesIO()
    Image.new(mode, size, color=(10, 200, 30, 0)[: len(mode)] if len(mode) > 1 else 120).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("mode, fmt", [("RGB", "JPEG"), ("CMYK", "JPEG"), ("L", "JPEG"), ("RGBA", "PNG"),
                                       ("P", "PNG")])
def test_encode_resized_gives_rgb_jpeg_with_the_shorter_side(mode, fmt):
    out = Image.open(io.BytesIO(gib.encode_resized(_encoded(mode, (120, 90), fmt), 30)))
    assert (out.format, out.mode, out.size) == ("JPEG", "RGB", (40, 30))


def test_encode_resized_keeps_colour():
    out = np.asarray(Image.open(io.BytesIO(gib.encode_resized(_encoded("RGB", (64, 48), "PNG"), 24))))
    np.testing.assert_allclose(out.reshape(-1, 3).mean(0), [10, 200, 30], atol=3)


@pytest.mark.parametrize("damage", [lambda d: d[: len(d) // 2], lambda d: b"not an image", lambda d: b""])
def test_encode_resized_raises_a_decode_error_on_damaged_files(damage):
    with pytest.raises(gib._IMAGE_ERRORS):
        gib.encode_resized(damage(_encoded("RGB", (200, 150), "JPEG")), 32)


def test_ordered_parallel_keeps_order_and_a_bounded_window():
    pulled, outstanding = [0], []

    def items():
        for i in range(50):
            pulled[0] += 1
            yield i

    results = []
    pairs = gib._ordered_parallel(lambda x: x * x, items(), threads=3, window=4)
    for consumed, (item, future) in enumerate(pairs):
        outstanding.append(pulled[0] - consumed)
        results.append((item, future.result()))
    assert results == [(i, i * i) for i in range(50)]
    assert max(outstanding) <= 4


# ---------------------------------------------------------------------------------------------------------------
# The sample generator.


def _tree_bytes(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_sample_generator_is_deterministic_and_layouts_hold_the_same_images(tmp_path):
    kwargs = dict(num_classes=3, images_per_class=4)
    summary = sample_geo_imagenet.generate(tmp_path / "a", seed=5, layout="dirs", **kwargs)
    sample_geo_imagenet.generate(tmp_path / "b", seed=5, layout="dirs", **kwargs)
    sample_geo_imagenet.generate(tmp_path / "c", seed=6, layout="dirs", **kwargs)
    sample_geo_imagenet.generate(tmp_path / "t", seed=5, layout="tars", **kwargs)
    assert _tree_bytes(tmp_path / "a") == _tree_bytes(tmp_path / "b")
    assert _tree_bytes(tmp_path / "a") != _tree_bytes(tmp_path / "c")
    assert summary["images"] == 12 and summary["wnids"] == sorted(summary["wnids"])
    tags = read_geotags_csv(tmp_path / "a" / "geotags.csv")
    with open(tmp_path / "a" / "geotags.csv.missing", newline="") as f:
        missing = [row["image_id"] for row in csv.DictReader(f)]
    assert len(tags) == summary["geotagged"] and len(tags) + len(missing) == 12
    assert set(tags).isdisjoint(missing)
    for wnid in summary["wnids"]:
        folder = {p.name: p.read_bytes() for p in (tmp_path / "a" / wnid).iterdir()}
        with tarfile.open(tmp_path / "t" / f"{wnid}.tar") as tar:
            packed = {m.name: tar.extractfile(m).read() for m in tar}
        assert folder == packed
        assert sorted(folder) == sorted(f"{i}.JPEG" for i in [*tags, *missing] if i.startswith(wnid + "_"))
    assert (tmp_path / "a" / "words.txt").read_text().startswith("n01440764\ttench")


def test_sample_images_and_coordinates_carry_class_structure(tmp_path):
    """A nearest-centroid rule on mean colour, and one on coordinates, both recover every class."""
    sample_geo_imagenet.generate(tmp_path, seed=1, num_classes=5, images_per_class=6, geotagged_fraction=1.0)
    colours, places, labels = [], [], []
    for image_id, row in read_geotags_csv(tmp_path / "geotags.csv").items():
        pixels = np.asarray(Image.open(tmp_path / row["wnid"] / f"{image_id}.JPEG"), dtype=np.float64)
        colours.append(pixels.reshape(-1, 3).mean(0))
        places.append([float(row["lat"]), float(row["lon"])])
        labels.append(row["wnid"])
    labels = np.array(labels)
    for features in (np.array(colours), np.array(places)):
        classes = sorted(set(labels))
        centroids = np.stack([features[labels == c].mean(0) for c in classes])
        nearest = np.argmin(((features[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
        assert list(np.array(classes)[nearest]) == list(labels)


def test_sample_gives_both_splits_of_every_builder_config_whatever_the_arguments(tmp_path):
    fractions = sorted({config.val_fraction for config in gib.Builder.BUILDER_CONFIGS})
    assert min(sample_geo_imagenet.VAL_FRACTIONS) <= fractions[0] <= fractions[-1] <= max(
        sample_geo_imagenet.VAL_FRACTIONS)
    for seed, classes, per_class, tagged in itertools.product((0, 1, 2), (1, 2, 3), (1, 2, 3, 5), (0.0, 0.5, 1.0)):
        if classes * per_class < 2:
            continue
        out = tmp_path / f"{seed}_{classes}_{per_class}_{tagged}"
        summary = sample_geo_imagenet.generate(out, seed=seed, num_classes=classes, images_per_class=per_class,
                                               geotagged_fraction=tagged, layout="dirs")
        ids = read_geotags_csv(out / "geotags.csv")
        for fraction in fractions:
            splits = {expected_split(image_id, fraction) for image_id in ids}
            assert splits == {"train", "val"}, (seed, classes, per_class, tagged, fraction)
        assert all((out / row["wnid"] / f"{image_id}.JPEG").is_file() for image_id, row in ids.items())
        assert summary["images"] == sum(1 for _ in out.glob("n*/*.JPEG")) == classes * per_class
        if tagged == 1.0:
            assert len(ids) == classes * per_class


def test_image_numbers_give_each_split_an_id_and_renumber_only_when_they_must():
    low, high = min(sample_geo_imagenet.VAL_FRACTIONS), max(sample_geo_imagenet.VAL_FRACTIONS)
    renumbered = collections.Counter()
    for i in range(300):
        wnids = [f"n{10000000 + 2 * i:08d}", f"n{10000001 + 2 * i:08d}"]  # many trees, unlike SAMPLE_CLASSES
        for tree_wnids, per_class in ((wnids[:1], 2), (wnids, 1), (wnids, 3)):
            numbers = sample_geo_imagenet.image_numbers(tree_wnids, per_class)
            ids = [f"{wnid}_{n}" for wnid in tree_wnids for n in numbers[wnid]]
            plain = [f"{wnid}_{n}" for wnid in tree_wnids for n in range(1, per_class + 1)]
            assert any(expected_split(i, low) == "val" for i in ids)
            assert any(expected_split(i, high) == "train" for i in ids)
            assert all(len(set(numbers[wnid])) == per_class for wnid in tree_wnids)
            changed = [new for new, old in zip(ids, plain) if new != old]
            if any(expected_split(i, low) == "val" for i in plain) and any(
                    expected_split(i, high) == "train" for i in plain):
                assert not changed
            else:
                assert 1 <= len(changed) <= 2
            renumbered.update("val" if expected_split(i, low) == "val" else "train" for i in changed)
    assert renumbered["val"] and renumbered["train"]  # both fallbacks were exercised


def test_sample_refuses_a_tree_too_small_for_two_splits_in_one_line(tmp_path, capsys):
    with pytest.raises(ValueError, match="at least 2 images"):
        sample_geo_imagenet.generate(tmp_path / "one", num_classes=1, images_per_class=1)
    for args in (["--classes", "1", "--images_per_class", "1"], ["--classes", "11"]):
        with pytest.raises(SystemExit) as exit_info:
            sample_geo_imagenet.main([str(tmp_path / "cli"), *args])
        assert exit_info.value.code == 2
        error = capsys.readouterr().err
        assert "Traceback" not in error and error.splitlines()[-1].startswith("python -m")


@pytest.mark.parametrize("config", ["s64", "s256"])
def test_smallest_sample_builds_both_splits(tmp_path, config):
    sample_geo_imagenet.generate(tmp_path / "manual", num_classes=1, images_per_class=2, geotagged_fraction=0.0)
    builder = build(tmp_path / "manual", tmp_path / "data", config=config)
    assert builder.info.splits["train"].num_examples == builder.info.splits["val"].num_examples == 1


# ---------------------------------------------------------------------------------------------------------------
# The builder on a damaged tree: dirs and tars, a corrupt JPEG, a missing file, a cut tar, a missing synset.


@pytest.fixture(scope="module")
def damaged_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("geo_imagenet") / "manual"
    summary = sample_geo_imagenet.generate(root, seed=3, num_classes=4, images_per_class=8, layout="mixed")
    tags = read_geotags_csv(root / "geotags.csv")
    by_wnid = collections.defaultdict(list)
    for image_id, row in tags.items():
        by_wnid[row["wnid"]].append(image_id)
    folder_wnid, tar_wnid = summary["wnids"][0], summary["wnids"][3]  # "mixed": classes 0, 2 folders; 1, 3 tars
    assert (root / folder_wnid).is_dir() and (root / f"{tar_wnid}.tar").is_file()
    damaged = {}

    corrupt, missing = by_wnid[folder_wnid][:2]
    path = root / folder_wnid / f"{corrupt}.JPEG"
    path.write_bytes(path.read_bytes()[:300])
    damaged[corrupt] = "unreadable_image"
    (root / folder_wnid / f"{missing}.JPEG").unlink()
    damaged[missing] = "missing_file"

    # Cut the tar in the middle of the data of its last geotagged member.
    tar_path = root / f"{tar_wnid}.tar"
    with tarfile.open(tar_path) as tar:
        members = [m for m in tar if m.name[: -len(".JPEG")] in tags]
    last = members[-1]
    tar_path.write_bytes(tar_path.read_bytes()[: last.offset_data + last.size // 2])
    damaged[last.name[: -len(".JPEG")]] = "corrupt_tar"

    ghost_rows = [f"{GHOST_WNID}_{n},{GHOST_WNID},1.5,2.5,16,Chile\n" for n in (1, 2, 3)]
    with open(root / "geotags.csv", "a", encoding="utf-8") as f:
        f.writelines(ghost_rows)
    for n in (1, 2, 3):
        damaged[f"{GHOST_WNID}_{n}"] = "missing_synset"
    return root, summary, read_geotags_csv(root / "geotags.csv"), damaged


@pytest.fixture(scope="module")
def built(damaged_tree, tmp_path_factory):
    root = damaged_tree[0]
    handler, absl_logger = _Records(), logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.addHandler(handler)
    absl_logger.setLevel(logging.INFO)
    try:
        builder = build(root, tmp_path_factory.mktemp("data"))
    finally:
        absl_logger.removeHandler(handler)
        absl_logger.setLevel(level)
    return builder, {split: examples(builder, split) for split in ("train", "val")}, handler.messages


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_builder_writes_every_intact_geotagged_image_once_in_its_hash_split(damaged_tree, built):
    _, _, tags, damaged = damaged_tree
    builder, by_split, _ = built
    fraction = builder.builder_config.val_fraction
    for split, rows in by_split.items():
        ids = [ex["image_id"].decode() for ex in rows]
        assert len(ids) == len(set(ids))
        assert set(ids) == {i for i in tags if i not in damaged and expected_split(i, fraction) == split}
        assert builder.info.splits[split].num_examples == len(ids)
    assert by_split["val"] and by_split["train"]


def test_builder_labels_coordinates_and_images(damaged_tree, built):
    root, summary, tags, _ = damaged_tree
    builder, by_split, _ = built
    names = builder.info.features["label"].names
    assert names == summary["wnids"]  # sorted, the ghost synset left out
    words = dict(line.split("\t") for line in (root / "words.txt").read_text().splitlines())
    assert builder.info.metadata["class_names"] == [words[w] for w in names]
    for ex in by_split["train"] + by_split["val"]:
        row = tags[ex["image_id"].decode()]
        assert names[ex["label"]] == row["wnid"]
        want = np.array([float(row["lat"]), float(row["lon"])], np.float32)
        np.testing.assert_array_equal(ex["coordinates"], want)
        assert ex["coordinates"].dtype == np.float32
        assert min(ex["image"].shape[:2]) == 64 and ex["image"].shape[2] == 3


def test_builder_names_each_skipped_file_and_counts_reasons_per_split(damaged_tree, built):
    root, _, _, damaged = damaged_tree
    builder, by_split, messages = built
    fraction = builder.builder_config.val_fraction
    for image_id, reason in damaged.items():
        if reason in ("unreadable_image", "missing_file"):
            assert any(f"{image_id}.JPEG ({reason})" in m for m in messages), image_id
    assert any(f"{GHOST_WNID} (missing_synset)" in m for m in messages)
    for split, rows in by_split.items():
        want = collections.Counter(r for i, r in damaged.items() if expected_split(i, fraction) == split)
        summaries = [re.fullmatch(rf"geo_imagenet {split}: (\d+) examples; skipped: (.*)", m) for m in messages]
        [match] = [m for m in summaries if m]
        assert int(match.group(1)) == len(rows)
        got = dict(item.split("=") for item in match.group(2).split(", ")) if match.group(2) != "none" else {}
        assert {k: int(v) for k, v in got.items()} == dict(want)


# ---------------------------------------------------------------------------------------------------------------
# Errors.


def test_missing_geotags_csv_is_a_clear_error(tmp_path):
    sample_geo_imagenet.generate(tmp_path / "manual", num_classes=1, images_per_class=2)
    (tmp_path / "manual" / "geotags.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"geotags.csv not found(.|\n)*Flickr API key"):
        build(tmp_path / "manual", tmp_path / "data")


def test_empty_manual_dir_is_a_clear_error(tmp_path):
    (tmp_path / "manual").mkdir()
    with pytest.raises(AssertionError, match=r"does not exist or is empty(.|\n)*tfds_builders.geo_imagenet.geotag"):
        build(tmp_path / "manual", tmp_path / "data")


def test_empty_split_is_an_error(tmp_path):
    sample_geo_imagenet.generate(tmp_path / "manual", num_classes=1, images_per_class=4, geotagged_fraction=1.0)
    geotags = tmp_path / "manual" / "geotags.csv"
    header, *rows = geotags.read_text().splitlines(keepends=True)
    geotags.write_text(header + "".join(r for r in rows if expected_split(r.split(",")[0], 0.2) == "train"))
    with pytest.raises(ValueError, match="split 'val' is empty"):
        build(tmp_path / "manual", tmp_path / "data")


def test_builder_reads_geotags_and_words_saved_with_a_bom_and_blank_lines(tmp_path):
    """What an editor leaves in a hand-edited manual dir: a UTF-8 BOM, CRLF and blank lines, trailing ones too."""
    summary = sample_geo_imagenet.generate(tmp_path / "manual", seed=4, num_classes=2, images_per_class=6,
                                           geotagged_fraction=1.0)
    tags = read_geotags_csv(tmp_path / "manual" / "geotags.csv")
    for name in ("geotags.csv", "words.txt"):
        path = tmp_path / "manual" / name
        lines = path.read_text(encoding="utf-8").splitlines()
        path.write_text("\ufeff" + "\r\n".join(lines[:2] + [""] + lines[2:]) + "\r\n\r\n  \n", encoding="utf-8",
                        newline="")
    builder = build(tmp_path / "manual", tmp_path / "data")
    built_ids = {ex["image_id"].decode() for split in ("train", "val") for ex in examples(builder, split)}
    assert built_ids == set(tags) and len(tags) == 12
    words = dict(sample_geo_imagenet.SAMPLE_CLASSES)
    assert builder.info.metadata["class_names"] == [words[wnid] for wnid in summary["wnids"]]


def test_bad_geotags_row_names_file_and_line(tmp_path):
    sample_geo_imagenet.generate(tmp_path / "manual", num_classes=1, images_per_class=2, geotagged_fraction=1.0)
    with open(tmp_path / "manual" / "geotags.csv", "a") as f:
        f.write("n01440764_7,n01440764,95.0,10.0,16,Nowhere\n")
    with pytest.raises(ValueError, match=r"geotags.csv:4: coordinates out of range"):
        build(tmp_path / "manual", tmp_path / "data")


# ---------------------------------------------------------------------------------------------------------------
# The real command line.


def test_tfds_build_cli_on_a_tiny_tree_without_words(tmp_path):
    summary = sample_geo_imagenet.generate(tmp_path / "manual", seed=2, num_classes=2, images_per_class=6,
                                           layout="tars", with_words=False)
    tags = read_geotags_csv(tmp_path / "manual" / "geotags.csv")
    tfds_cli = pathlib.Path(sys.executable).parent / "tfds"
    result = subprocess.run(
        [str(tfds_cli), "build", str(BUILDER_DIR), f"--manual_dir={tmp_path / 'manual'}", "--config=s64",
         f"--data_dir={tmp_path / 'data'}"], capture_output=True, text=True, timeout=300,
        # The builder imports tfds_builders.*: from this checkout, not whichever one the venv has installed.
        env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    assert result.returncode == 0, result.stderr[-3000:]
    builder = tfds.builder_from_directory(str(tmp_path / "data" / "geo_imagenet" / "s64" / "1.0.0"))
    assert builder.info.features["label"].names == summary["wnids"]
    assert builder.info.metadata["class_names"] == summary["wnids"]  # no words.txt: the wnids stand in
    built_ids = {ex["image_id"].decode() for split in ("train", "val") for ex in examples(builder, split)}
    assert built_ids == set(tags)
