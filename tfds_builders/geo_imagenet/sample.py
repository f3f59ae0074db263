"""A tiny made-up GeoImageNet manual dir in the real layout, for tests, the builder's dummy_data and demos.

    python -m tfds_builders.geo_imagenet.sample OUT_DIR [--seed 0] [--classes 4] [--images_per_class 8]
                                               [--layout dirs|tars|mixed] [--no_words]

Writes what `tfds build tfds_builders/geo_imagenet --manual_dir=OUT_DIR` reads:
  OUT_DIR/<wnid>/<wnid>_<n>.JPEG   the ImageNet-21k (fall11) layout, or OUT_DIR/<wnid>.tar holding the same files
                                   as ImageNet ships them per synset ("mixed": every other class as a tar);
  OUT_DIR/geotags.csv              a random subset of the images, as the geotagger writes it
                                   (and geotags.csv.missing for the rest, as the geotagger leaves it);
  OUT_DIR/words.txt                ImageNet's wnid -> names list (unless --no_words).
Each class has its own colour and stripe orientation and frequency, and its own home region on the globe, so a
classifier or a geo-clustering has real structure to find. The same arguments give byte-identical files.

Both splits of every builder config always get a geotagged image, so a tree needs at least 2 images. The builder
splits on a hash of the image id, and a few ids may all hash to train: image ids are <wnid>_1 ..
<wnid>_<images_per_class>, except that when none of them is in val for the smallest val fraction of the configs
(VAL_FRACTIONS), the tree's last image takes the smallest number past its class's others whose id is (likewise
for train and the largest fraction, with the first image but the one in val). When the draws at
--geotagged_fraction leave a split without a geotagged image, the tree's first image in it is geotagged as well.
"""

import argparse
import colorsys
import io
import json
import pathlib
import tarfile

import numpy as np
from PIL import Image

from . import geotags_format as fmt

# Real wnids and names (the Imagenette classes), so words.txt looks like ImageNet's.
SAMPLE_CLASSES = (
    ("n01440764", "tench, Tinca tinca"),
    ("n02102040", "English springer, English springer spaniel"),
    ("n02979186", "cassette player"),
    ("n03000684", "chain saw, chainsaw"),
    ("n03028079", "church, church building"),
    ("n03394916", "French horn, horn"),
    ("n03417042", "garbage truck, dustcart"),
    ("n03425413", "gas pump, gasoline pump, petrol pump, island dispenser"),
    ("n03445777", "golf ball"),
    ("n03888257", "parachute, chute"),
)
# Country names as Flickr writes them, one with a comma to exercise CSV quoting.
_COUNTRIES = ("France", "Korea, Republic of", "Brazil", "Kenya", "Japan", "Canada", "India", "Australia")
LAYOUTS = ("dirs", "tars", "mixed")
# The smallest and largest val_fraction of the builder configs (s256, s64; a test holds them to the configs): an
# id in val for the smallest is in val for every config, one in train for the largest is in train for every one.
VAL_FRACTIONS = (0.1, 0.2)


def class_image(class_index: int, num_classes: int, height: int, width: int,
                rng: np.random.Generator) -> np.ndarray:
    """An HxWx3 uint8 image: the class's hue under stripes at the class's angle and frequency, plus noise."""
    red, green, blue = colorsys.hsv_to_rgb(class_index / num_classes, 0.7, 0.9)
    base = 255.0 * np.array([red, green, blue])
    angle = np.pi * class_index / num_classes
    cycles = 2 + class_index % 4
    y, x = np.mgrid[0:height, 0:width]
    along = (x * np.cos(angle) + y * np.sin(angle)) / max(height, width)
    stripes = np.sin(2 * np.pi * cycles * along + rng.uniform(0, 2 * np.pi))
    image = base * (0.65 + 0.35 * stripes[..., None]) + rng.normal(0.0, 10.0, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def jpeg_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _home(class_index: int, num_classes: int, rng: np.random.Generator) -> tuple[float, float]:
    """A class's home (lat, lon): longitudes spread round the globe, latitudes over the inhabited band."""
    return rng.uniform(-40.0, 60.0), -170.0 + 340.0 * (class_index + 0.5) / num_classes


def _near(home: tuple[float, float], rng: np.random.Generator) -> tuple[float, float]:
    lat = float(np.clip(home[0] + rng.normal(0.0, 3.0), -90.0, 90.0))
    lon = float((home[1] + rng.normal(0.0, 3.0) + 180.0) % 360.0 - 180.0)
    return round(lat, 6), round(lon, 6)  # Flickr gives 6 decimals


def _write_tar(path: pathlib.Path, members: dict[str, bytes]) -> None:
    """A plain tar with fixed metadata, so the same seed gives the same bytes."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))


def _in_split(image_id: str, split: str) -> bool:
    """Whether the builder puts `image_id` in `split` under every config (see VAL_FRACTIONS)."""
    return fmt.split_of(image_id, min(VAL_FRACTIONS) if split == "val" else max(VAL_FRACTIONS)) == split


def image_numbers(wnids: list[str], images_per_class: int) -> dict[str, list[int]]:
    """Each class's image numbers, 1..images_per_class unless then no id of the tree is in one split.

    If none is in val, the tree's last image takes the smallest number past its class's others whose id is; then,
    if none is in train, so does the first image that is not the tree's first in val. Needs at least 2 images.
    """
    numbers = {wnid: list(range(1, images_per_class + 1)) for wnid in wnids}
    slots = [(wnid, i) for wnid in wnids for i in range(images_per_class)]  # tree order

    def image_id(slot: tuple[str, int]) -> str:
        return f"{slot[0]}_{numbers[slot[0]][slot[1]]}"

    def renumber(slot: tuple[str, int], split: str) -> None:
        wnid, i = slot
        numbers[wnid][i] = max(numbers[wnid]) + 1
        while not _in_split(image_id(slot), split):
            numbers[wnid][i] += 1

    if not any(_in_split(image_id(slot), "val") for slot in slots):
        renumber(slots[-1], "val")
    if not any(_in_split(image_id(slot), "train") for slot in slots):
        first_val = next(slot for slot in slots if _in_split(image_id(slot), "val"))
        renumber(next(slot for slot in slots if slot != first_val), "train")
    return numbers


def _geotag(image_id: str, wnid: str, index: int, home: tuple[float, float],
            rng: np.random.Generator) -> fmt.GeoTag:
    lat, lon = _near(home, rng)
    return fmt.GeoTag(image_id, wnid, lat, lon, int(rng.integers(1, 17)), _COUNTRIES[index % len(_COUNTRIES)])


def generate(
    out_dir: str | pathlib.Path,
    *,
    seed: int = 0,
    num_classes: int = 4,
    images_per_class: int = 8,
    geotagged_fraction: float = 0.75,
    layout: str = "dirs",
    image_size_range: tuple[int, int] = (40, 72),
    with_words: bool = True,
) -> dict:
    """Writes the manual dir; returns {"wnids", "images", "geotagged", "layout"} (wnids sorted).

    geotagged_fraction: each image's chance to be geotagged. If the draws leave a split without a geotagged image,
    the tree's first image in it is geotagged too, from draws made after all the others: a tree whose draws give
    both splits one is byte for byte what it was before this rule.
    """
    if not 1 <= num_classes <= len(SAMPLE_CLASSES):
        raise ValueError(f"num_classes must be 1..{len(SAMPLE_CLASSES)}, got {num_classes}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if images_per_class < 1 or not 0.0 <= geotagged_fraction <= 1.0:
        raise ValueError(f"need images_per_class >= 1 and 0 <= geotagged_fraction <= 1, got "
                         f"{images_per_class}, {geotagged_fraction}")
    if num_classes * images_per_class < 2:
        raise ValueError("need at least 2 images (classes * images_per_class), one for each split")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    classes = SAMPLE_CLASSES[:num_classes]
    numbers = image_numbers([wnid for wnid, _ in classes], images_per_class)
    rows: dict[str, fmt.GeoTag | fmt.Missing] = {}  # image id -> its row, in tree order
    homes = {}
    for index, (wnid, _) in enumerate(classes):
        homes[wnid] = _home(index, num_classes, rng)
        files = {}
        for n in numbers[wnid]:
            image_id = f"{wnid}_{n}"
            height, width = rng.integers(image_size_range[0], image_size_range[1] + 1, size=2)
            files[f"{image_id}.JPEG"] = jpeg_bytes(class_image(index, num_classes, int(height), int(width), rng))
            if rng.uniform() < geotagged_fraction:
                rows[image_id] = _geotag(image_id, wnid, index, homes[wnid], rng)
            else:
                rows[image_id] = fmt.Missing(image_id, wnid, int(rng.integers(1, 3)))
        if layout == "tars" or (layout == "mixed" and index % 2 == 1):
            _write_tar(out / f"{wnid}.tar", files)
        else:
            (out / wnid).mkdir(exist_ok=True)
            for name, data in files.items():
                (out / wnid / name).write_bytes(data)
    wnid_index = {wnid: index for index, (wnid, _) in enumerate(classes)}
    for split in ("val", "train"):
        if not any(isinstance(row, fmt.GeoTag) and _in_split(image_id, split) for image_id, row in rows.items()):
            image_id = next(image_id for image_id in rows if _in_split(image_id, split))  # image_numbers made one
            wnid = rows[image_id].wnid
            rows[image_id] = _geotag(image_id, wnid, wnid_index[wnid], homes[wnid], rng)
    geotags = [row for row in rows.values() if isinstance(row, fmt.GeoTag)]
    missing = [row for row in rows.values() if isinstance(row, fmt.Missing)]
    (out / fmt.GEOTAGS_FILENAME).write_text(
        fmt.csv_line(fmt.GEOTAG_COLUMNS) + "".join(map(fmt.geotag_line, geotags)), encoding="utf-8")
    (out / (fmt.GEOTAGS_FILENAME + fmt.MISSING_SUFFIX)).write_text(
        fmt.csv_line(fmt.MISSING_COLUMNS) + "".join(map(fmt.missing_line, missing)), encoding="utf-8")
    if with_words:
        words = "".join(f"{wnid}\t{name}\n" for wnid, name in classes)
        (out / fmt.WORDS_FILENAME).write_text(words, encoding="utf-8")
    return {"wnids": sorted(wnid for wnid, _ in classes), "images": num_classes * images_per_class,
            "geotagged": len(geotags), "layout": layout}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tfds_builders.geo_imagenet.sample", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--images_per_class", type=int, default=8)
    parser.add_argument("--geotagged_fraction", type=float, default=0.75)
    parser.add_argument("--layout", choices=LAYOUTS, default="dirs")
    parser.add_argument("--no_words", action="store_true", help="leave out words.txt (class names are then wnids)")
    args = parser.parse_args(argv)
    try:
        summary = generate(args.out_dir, seed=args.seed, num_classes=args.classes,
                           images_per_class=args.images_per_class, geotagged_fraction=args.geotagged_fraction,
                           layout=args.layout, with_words=not args.no_words)
    except ValueError as e:
        parser.error(str(e))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
