"""Reads an fMoW-rgb release from disk: finds its splits and locations, and turns one location folder into
one TFDS example (images cropped around the labelled box, sorted by time).

All file access goes through `etils.epath`, so the release may live on any filesystem TFDS supports (local,
GCS, ...). A bad image or JSON never stops the read: it is reported as a `Skip` naming the file and the
reason, and the caller counts and logs it. The parsing rules themselves live in `fmow_format`.
"""

import dataclasses
import io
import json
from collections.abc import Sequence

from absl import logging
from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from . import fmow_format

S3_URI = "s3://spacenet-dataset/Hosted-Datasets/fmow/fmow-rgb/"
DOWNLOAD_INSTRUCTIONS = f"""\
Download the fMoW-rgb release (JPEG images with per-image JSON, about 200 GB) from the public S3 bucket,
no AWS account needed:

    aws s3 cp --no-sign-request --recursive {S3_URI} PATH

and pass PATH (the folder that holds train/ and val/) as --manual_dir. Expected layout:

    PATH/train/<category>/<category>_<loc>/<category>_<loc>_<t>_rgb.jpg   (+ the same name with .json)
    PATH/val/<category>/<category>_<loc>/...                             (same layout)
    PATH/test/<category>/<category>_<loc>/...                            (optional: only when labelled)

<category> is one of the 62 fMoW classes (airport, airport_hangar, ..., zoo). The unlabelled test/ and
seq/ folders of the original release are ignored, and so are the optional `_msrgb` companions.
"""

# JPEG quality of the images re-encoded after a resize: high enough that it adds little to the release's own.
JPEG_QUALITY = 95
# What PIL raises on truncated, corrupt or absurdly large files.
_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class LayoutError(ValueError):
    """The manual dir is not an fMoW-rgb release root."""


@dataclasses.dataclass(frozen=True)
class Skip:
    """One image left out: which file, why, and the underlying message. `reason` is one of unreadable_json,
    missing_field, invalid_field, invalid_location (see `fmow_format.parse_image_record`), unreadable_image,
    box_outside_image, image_without_json, json_without_image."""
    reason: str
    path: str
    detail: str


@dataclasses.dataclass(frozen=True)
class Location:
    """One location folder to read."""
    location_id: str    # "<split>/<category>/<category>_<loc>": unique, stable, and not a local path.
    category: str
    path: epath.Path


@dataclasses.dataclass(frozen=True)
class LocationResult:
    """The example for one location (None when no image was usable) and the images left out."""
    location_id: str
    example: dict | None
    num_images: int
    skipped: tuple[Skip, ...]


def _category_dirs(split_dir: epath.Path) -> list[epath.Path]:
    """The split's sub-folders named after one of the 62 classes, sorted (others, e.g. false_detection, are
    not training classes)."""
    if not split_dir.is_dir():
        return []
    return sorted(p for p in split_dir.iterdir() if p.name in fmow_format.CLASS_NAMES and p.is_dir())


def find_splits(root: epath.Path) -> dict[str, epath.Path]:
    """{"train": root/train, "val": root/val, "test": root/test}, val and test only when they have category
    folders (the original release's test/ is unlabelled and has none).

    Raises:
      LayoutError: root/train has no category folder; the message shows what was expected and found.
    """
    if not _category_dirs(root / "train"):
        found = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir()) if root.is_dir() else []
        shown = ", ".join(found[:10]) + (", ..." if len(found) > 10 else "") if found else "nothing"
        raise LayoutError(
            f"{root} is not an fMoW-rgb release root: expected {root}/train/<category>/ folders named after "
            f"the fMoW classes (e.g. {root}/train/airport/airport_0/airport_0_0_rgb.jpg); found {shown}.\n\n"
            f"{DOWNLOAD_INSTRUCTIONS}")
    return {split: root / split for split in ("train", "val", "test") if _category_dirs(root / split)}


def list_locations(split: str, split_dir: epath.Path) -> list[Location]:
    """Every location folder of a split, sorted. Only paths are listed here (one per location, not per
    image); the images are read later, location by location."""
    ignored = sorted(p.name for p in split_dir.iterdir() if p.name not in fmow_format.CLASS_NAMES)
    if ignored:
        logging.info("fmow: ignoring %s in %s: not one of the 62 class folders", ", ".join(ignored), split_dir)
    return [Location(f"{split}/{category_dir.name}/{location_dir.name}", category_dir.name, location_dir)
            for category_dir in _category_dirs(split_dir)
            for location_dir in sorted(category_dir.iterdir()) if location_dir.is_dir()]


def _pair_files(location_dir: epath.Path) -> tuple[list[tuple[str, epath.Path, epath.Path]], list[Skip]]:
    """(stem, jpg, json) for every `*_rgb.jpg` with its JSON, and a Skip for every file without its pair.
    The `_msrgb` companions and any other file are ignored."""
    images, records = {}, {}
    for path in location_dir.iterdir():
        for ext, table in ((".jpg", images), (".json", records)):
            if path.name.endswith("_rgb" + ext):
                table[path.name[: -len(ext)]] = path
    pairs, skips = [], []
    for stem in sorted(images.keys() | records.keys()):
        if stem not in records:
            skips.append(Skip("image_without_json", str(images[stem]), "no JSON beside the image"))
        elif stem not in images:
            skips.append(Skip("json_without_image", str(records[stem]), "no image beside the JSON"))
        else:
            pairs.append((stem, images[stem], records[stem]))
    return pairs, skips


def fit_to_jpeg(data: bytes, max_shorter_side: int) -> tuple[bytes, tuple[int, int]]:
    """The whole image as a JPEG whose shorter side is at most `max_shorter_side`, and its original (width,
    height). The image is decoded in full (a truncated or corrupt file raises here, not at training time).

    A larger image is resized as torchvision's `Resize(max_shorter_side)` does on a PIL image (shorter side to
    the target, longer side int(target * long / short), bilinear with PIL's antialiasing) and re-encoded; large
    JPEGs are decoded at 1/2..1/8 scale first (JPEG DCT scaling, `Image.draft`) when that keeps enough pixels,
    most of the build's time otherwise. A smaller RGB JPEG is stored as it is, byte for byte: nothing is lost
    to re-encoding, and the training crop's resize upsamples it as Resize(448) would have (up to interpolation).
    """
    with Image.open(io.BytesIO(data)) as image:
        size = image.size
        short, long = min(size), max(size)
        if short > max_shorter_side:
            target_long = int(max_shorter_side * long / short)
            target = (max_shorter_side, target_long) if size[0] <= size[1] else (target_long, max_shorter_side)
            image.draft("RGB", target)
            rgb = image if image.mode == "RGB" else image.convert("RGB")
            out = rgb.resize(target, Image.Resampling.BILINEAR)
        elif image.format == "JPEG" and image.mode == "RGB":
            image.load()
            return data, size
        else:
            out = image.convert("RGB")
    buffer = io.BytesIO()
    out.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue(), size


def normalized_box(box: Sequence[float], width: int, height: int) -> tuple[float, float, float, float] | None:
    """The labelled box (x, y, w, h) in pixels as (ymin, xmin, ymax, xmax) fractions of the image, clipped to
    it, as `tfds.features.BBox` stores boxes; None when no part of the box lies inside the image."""
    x, y, w, h = box
    xmin, xmax = max(x, 0.0) / width, min(x + w, width) / width
    ymin, ymax = max(y, 0.0) / height, min(y + h, height) / height
    if xmax <= xmin or ymax <= ymin:
        return None
    return ymin, xmin, ymax, xmax


def read_location(location: Location, *, max_shorter_side: int) -> LocationResult:
    """Reads one location folder into a TFDS example with the features of `fmow_dataset_builder`.

    Images are kept only with a usable JSON (see `fmow_format.parse_image_record`), a decodable JPEG and a
    labelled box that overlaps the image; they are sorted by timestamp (ties by file name). The location's
    coordinates are the spherical mean of its images' footprint centroids.
    """
    pairs, skips = _pair_files(location.path)
    kept = []
    for stem, image_path, json_path in pairs:
        try:
            record = json.loads(json_path.read_bytes())
        except (OSError, ValueError) as error:
            skips.append(Skip("unreadable_json", str(json_path), str(error)))
            continue
        try:
            parsed = fmow_format.parse_image_record(record, location.category)
        except fmow_format.RecordError as error:
            skips.append(Skip(error.reason, str(json_path), str(error)))
            continue
        try:
            jpeg, (width, height) = fit_to_jpeg(image_path.read_bytes(), max_shorter_side)
        except _IMAGE_ERRORS as error:
            skips.append(Skip("unreadable_image", str(image_path), f"{type(error).__name__}: {error}"))
            continue
        box = normalized_box(parsed.box, width, height)
        if box is None:
            skips.append(Skip("box_outside_image", str(json_path),
                              f"box {parsed.box} lies outside the {width}x{height} image"))
            continue
        kept.append((parsed.timestamp, stem, parsed, jpeg, box))
    if not kept:
        return LocationResult(location.location_id, None, 0, tuple(skips))
    kept.sort(key=lambda item: item[:2])
    example = {
        "location_id": location.location_id,
        "label": location.category,
        "coordinates": np.array(fmow_format.mean_lat_lon([p.lat_lon for _, _, p, _, _ in kept]), np.float32),
        "images": [jpeg for _, _, _, jpeg, _ in kept],
        "timestamps": np.array([timestamp for timestamp, _, _, _, _ in kept], np.int64),
        "metadata": [{**p.metadata, "image_stem": stem,
                      "box": tfds.features.BBox(*np.asarray(box, np.float32))} for _, stem, p, _, box in kept],
    }
    return LocationResult(location.location_id, example, len(kept), tuple(skips))
