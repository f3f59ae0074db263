"""GeoImageNet: the ImageNet-21k images whose Flickr photos carry a geotag (Ayush et al., ICCV 2021).

    tfds build tfds_builders/geo_imagenet --manual_dir=DIR [--config=s64]

One example per geotagged image that is present and decodable: the image scaled to the config's shorter side,
its synset as label, Flickr's [lat, lon] and the ImageNet image id. Images stream through a bounded window of
decode/resize threads, so memory holds the geotag table but never more than a window of images.
"""

import collections
import concurrent.futures
import dataclasses
import functools
import io
import multiprocessing
import struct
import tarfile
from typing import Callable, Iterable, Iterator

from absl import logging
from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from tfds_builders.geo_imagenet import geotags_format as fmt

_IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")  # ImageNet writes .JPEG; a few of its "JPEGs" are PNGs
# High enough that re-encoding adds little on top of ImageNet's own JPEG compression (as the fMoW builder does).
_JPEG_QUALITY = 95
_DECODE_THREADS = max(4, multiprocessing.cpu_count())  # PIL releases the GIL while decoding and resizing
_WINDOW = 4 * _DECODE_THREADS  # images read or being decoded at once
# What reading a file, or PIL decoding one that is not a readable image, raises (UnidentifiedImageError and
# truncation are OSErrors).
_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)

_MANUAL_DOWNLOAD_INSTRUCTIONS = """\
The manual dir holds ImageNet-21k images and the geotags made for them:
  <manual_dir>/<wnid>/<wnid>_<n>.JPEG  extracted synsets, and/or
  <manual_dir>/<wnid>.tar              per-synset tars as ImageNet ships them (a folder wins over a tar)
  <manual_dir>/geotags.csv             image_id,wnid,lat,lon,accuracy,country, from the geotagger
  <manual_dir>/words.txt               optional: ImageNet's "<wnid>\\t<names>" list, for human-readable names
1. Register at https://image-net.org, accept its terms of access and download the ImageNet-21k release
   (fall11_whole.tar: one <wnid>.tar per synset) and its URL list fall11_urls.txt. Unpack the outer tar into
   the manual dir; the per-synset tars may stay packed.
2. Get a Flickr API key (https://www.flickr.com/services/apps/create/) and geotag the Flickr photos:
     python -m tfds_builders.geo_imagenet.geotag --urls fall11_urls.txt --api-key KEY \\
         --out <manual_dir>/geotags.csv
   It stays under Flickr's 3,600 calls/hour and can be stopped and rerun at any time; rerun it until it exits 0.
"""


@dataclasses.dataclass(eq=False)
class GeoImageNetConfig(tfds.core.BuilderConfig):
    """shorter_side: stored images are scaled (up or down) so their shorter side is this many pixels.

    val_fraction: share of image ids that `geotags_format.split_of` sends to "val".
    """

    shorter_side: int = 256
    val_fraction: float = 0.1

    def __post_init__(self):
        if self.shorter_side < 1 or not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"config {self.name}: need shorter_side >= 1 and 0 < val_fraction < 1, got "
                             f"{self.shorter_side}, {self.val_fraction}")


def resized_size(width: int, height: int, shorter_side: int) -> tuple[int, int]:
    """(width, height) scaled so that min(width, height) == shorter_side, keeping the aspect ratio."""
    scale = shorter_side / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def encode_resized(data: bytes, shorter_side: int) -> bytes:
    """An RGB JPEG of the encoded image `data` scaled to `shorter_side`; one of _IMAGE_ERRORS if unreadable."""
    with Image.open(io.BytesIO(data)) as image:
        size = resized_size(*image.size, shorter_side)
        image.draft("RGB", size)  # JPEGs decode at 1/2, 1/4 or 1/8 scale where that still covers `size`: faster
        rgb = image.convert("RGB")  # CMYK, grayscale and palette images too; a truncated file raises here
    buffer = io.BytesIO()
    rgb.resize(size, Image.Resampling.BICUBIC).save(buffer, format="JPEG", quality=_JPEG_QUALITY)
    return buffer.getvalue()


@dataclasses.dataclass(frozen=True)
class _Item:
    """One image to load: `data` holds a tar member's bytes; None means read the file `name` in the worker."""

    tag: fmt.GeoTag
    name: str  # how warnings name the file: its path, or "<tar path>:<member>"
    data: bytes | None


def _load(item: _Item, shorter_side: int) -> bytes:
    data = item.data if item.data is not None else epath.Path(item.name).read_bytes()
    return encode_resized(data, shorter_side)


class _SkipLog:
    """Counts the images a split leaves out, per reason, with one warning naming each file (or synset)."""

    def __init__(self, split: str):
        self.split = split
        self.counts = collections.Counter()

    def skip(self, reason: str, name: str, detail: str, images: int = 1) -> None:
        self.counts[reason] += images
        logging.warning("geo_imagenet %s: skipped %s (%s): %s", self.split, name, reason, detail)

    def summary(self) -> str:
        return ", ".join(f"{reason}={n}" for reason, n in sorted(self.counts.items())) or "none"


def _ordered_parallel(fn: Callable, items: Iterable, threads: int, window: int) -> Iterator[tuple]:
    """(item, future of fn(item)) in input order, with at most `window` futures in flight at any time."""
    with concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="geo_imagenet") as pool:
        in_flight = collections.deque()
        for item in items:
            in_flight.append((item, pool.submit(fn, item)))
            if len(in_flight) >= window:
                yield in_flight.popleft()
        while in_flight:
            yield in_flight.popleft()


def _folder_items(folder: epath.Path, tags: list[fmt.GeoTag], skips: _SkipLog) -> Iterator[_Item]:
    files = {}
    for path in folder.iterdir():
        stem, dot, extension = path.name.rpartition(".")
        if dot and "." + extension.lower() in _IMAGE_EXTENSIONS:
            files[stem] = path
    for tag in tags:
        if tag.image_id in files:
            yield _Item(tag, str(files[tag.image_id]), None)
        else:
            skips.skip("missing_file", str(folder / f"{tag.image_id}.JPEG"),
                       "in geotags.csv but not in its synset folder")


def _tar_items(tar_path: epath.Path, tags: list[fmt.GeoTag], skips: _SkipLog) -> Iterator[_Item]:
    """The tagged members of one synset tar, read in tar order; mode "r:" seeks past the members not wanted."""
    wanted = {tag.image_id: tag for tag in tags}
    try:
        with tar_path.open("rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                stem = member.name.rpartition("/")[2].rpartition(".")[0]
                if member.isfile() and stem in wanted:
                    data = tar.extractfile(member).read()  # before the pop: a cut member still counts as unread
                    yield _Item(wanted.pop(stem), f"{tar_path}:{member.name}", data)
    except (tarfile.TarError, OSError) as e:
        if wanted:
            skips.skip("corrupt_tar", str(tar_path),
                       f"{type(e).__name__}: {e}; {len(wanted)} tagged images unread", images=len(wanted))
        return
    for image_id in sorted(wanted):
        skips.skip("missing_file", f"{tar_path}:{image_id}.JPEG", "in geotags.csv but not in its synset tar")


def find_synsets(root: epath.Path) -> dict[str, epath.Path]:
    """wnid -> its folder or tar in the manual dir (the folder when both exist: it is the unpacked tar)."""
    folders, tars = {}, {}
    for path in root.iterdir():
        if fmt.is_wnid(path.name) and path.is_dir():
            folders[path.name] = path
        elif path.name.endswith(".tar") and fmt.is_wnid(path.name[:-4]):
            tars[path.name[:-4]] = path
    return {**tars, **folders}


def _read_text_lines(path: epath.Path) -> Iterator[str]:
    with path.open("r", encoding="utf-8") as f:
        yield from f


class Builder(tfds.core.GeneratorBasedBuilder):
    """GeoImageNet from a manual dir of ImageNet-21k images and geotags.csv."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_DOWNLOAD_INSTRUCTIONS
    BUILDER_CONFIGS = [
        GeoImageNetConfig(name="s256", shorter_side=256, val_fraction=0.1,
                          description="Shorter side 256 px (then random-resized-cropped to 224 for training)."),
        GeoImageNetConfig(name="s64", shorter_side=64, val_fraction=0.2,
                          description="Shorter side 64 px, for samples and tests; 20% val so tiny trees get one."),
    ]

    def __init__(self, *, file_format=None, **kwargs):
        """ArrayRecord for a new build unless `file_format` (or `tfds build --file_format`) asks for another; a
        prepared dataset keeps the format it was built in (so a reader can say how to rebuild it)."""
        super().__init__(file_format=file_format, **kwargs)
        if file_format is None and not self.is_prepared():
            self.info.set_file_format("array_record", override=True)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                # Names are the wnids present in the manual dir, sorted; set in _split_generators.
                "label": tfds.features.ClassLabel(),
                "coordinates": tfds.features.Tensor(shape=(2,), dtype=np.float32),  # [lat, lon] degrees
                "image_id": tfds.features.Text(),
            }),
            supervised_keys=("image", "label"),
            homepage="https://geography-aware-ssl.github.io/",
            # "class_names": human-readable names aligned with the label ids (from words.txt, else the wnid).
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        root = dl_manager.manual_dir
        geotags_path = root / fmt.GEOTAGS_FILENAME
        if not geotags_path.exists():
            raise FileNotFoundError(f"{geotags_path} not found.\n{_MANUAL_DOWNLOAD_INSTRUCTIONS}")
        sources = find_synsets(root)
        groups = {"train": collections.defaultdict(list), "val": collections.defaultdict(list)}
        for tag in fmt.read_geotags(_read_text_lines(geotags_path), str(geotags_path)):
            groups[fmt.split_of(tag.image_id, self.builder_config.val_fraction)][tag.wnid].append(tag)
        wnids = sorted({wnid for by_wnid in groups.values() for wnid in by_wnid} & set(sources))
        if not wnids:
            raise ValueError(f"{root}: none of the synsets in {geotags_path.name} is in the manual dir "
                             f"(as <wnid>/ or <wnid>.tar).\n{_MANUAL_DOWNLOAD_INSTRUCTIONS}")
        self.info.features["label"].names = wnids
        words_path = root / fmt.WORDS_FILENAME
        words = fmt.parse_words(_read_text_lines(words_path), str(words_path)) if words_path.exists() else {}
        self.info.metadata["class_names"] = [words.get(wnid, wnid) for wnid in wnids]
        return {split: self._generate_examples(split, by_wnid, sources) for split, by_wnid in groups.items()}

    def _generate_examples(self, split: str, by_wnid: dict[str, list[fmt.GeoTag]],
                           sources: dict[str, epath.Path]):
        skips = _SkipLog(split)

        def items() -> Iterator[_Item]:
            for wnid in sorted(by_wnid):
                tags = by_wnid[wnid]
                source = sources.get(wnid)
                if source is None:
                    skips.skip("missing_synset", wnid, f"neither {wnid}/ nor {wnid}.tar is in the manual dir",
                               images=len(tags))
                elif source.name.endswith(".tar"):
                    yield from _tar_items(source, tags, skips)
                else:
                    yield from _folder_items(source, tags, skips)

        written = 0
        load = functools.partial(_load, shorter_side=self.builder_config.shorter_side)
        for item, future in _ordered_parallel(load, items(), _DECODE_THREADS, _WINDOW):
            try:
                image = future.result()
            except _IMAGE_ERRORS as e:
                skips.skip("unreadable_image", item.name, f"{type(e).__name__}: {e}")
                continue
            written += 1
            yield item.tag.image_id, {
                "image": image,
                "label": item.tag.wnid,
                "coordinates": np.array([item.tag.lat, item.tag.lon], dtype=np.float32),
                "image_id": item.tag.image_id,
            }
        logging.info("geo_imagenet %s: %d examples; skipped: %s", split, written, skips.summary())
        if not written:
            raise ValueError(f"geo_imagenet: split {split!r} is empty (skipped: {skips.summary()}); "
                             "check the manual dir against geotags.csv")
