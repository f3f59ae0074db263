"""The files a GeoImageNet manual dir holds besides the images, in one place.

`geotags.csv` is written by the geotagger (`tfds_builders.geo_imagenet.geotag`) and by the sample generator and
read by the builder; `words.txt` is ImageNet's own wnid -> name list. Keeping the columns, the ImageNet image-id
grammar and the validation here means the writers and the reader cannot drift apart: `check_geotag` is the one
definition of a valid row, applied by the reader to every row, by `geotag_line` to every row written and (through
`check_location`) by the Flickr client to every answer. Standard library only, so the geotagger does not pull in
TensorFlow.
"""

import csv
import dataclasses
import hashlib
import io
import re
from typing import Iterable, Iterator

GEOTAGS_FILENAME = "geotags.csv"
WORDS_FILENAME = "words.txt"
# Photos Flickr answered "no geotag" for (codes 1 and 2) live beside the geotags, so a restart skips them.
MISSING_SUFFIX = ".missing"

GEOTAG_COLUMNS = ("image_id", "wnid", "lat", "lon", "accuracy", "country")
MISSING_COLUMNS = ("image_id", "wnid", "code")
# Flickr's getLocation error codes that mean "this photo has no usable geotag" (not a transient failure).
NO_GEOTAG_CODES = {1: "photo not found", 2: "photo has no location information"}
_CODE_OF_TEXT = {str(code): code for code in NO_GEOTAG_CODES}

# Longer than any country name Flickr gives (the longest are about 50 characters), short enough to bound a row.
MAX_COUNTRY_CHARS = 200

# ImageNet image ids are `<wnid>_<n>`, a wnid being `n` + 8 digits (WordNet noun offset).
_IMAGE_ID_RE = re.compile(r"(n\d{8})_(\d+)")
_WNID_RE = re.compile(r"n\d{8}")


def wnid_of(image_id: str) -> str:
    """The synset of an ImageNet image id (`n02084071_1234` -> `n02084071`); ValueError if it is not one."""
    match = _IMAGE_ID_RE.fullmatch(image_id)
    if match is None:
        raise ValueError(f"{image_id!r} is not an ImageNet image id (<wnid>_<n>, e.g. n02084071_1234)")
    return match.group(1)


def is_wnid(name: str) -> bool:
    return _WNID_RE.fullmatch(name) is not None


def split_of(image_id: str, val_fraction: float) -> str:
    """'val' when the first 8 bytes of sha256(image_id), read big-endian, fall below val_fraction * 2**64.

    A hash of the id (not Python's salted hash(), not file order) gives the same split on every machine, for every
    subset of the data, and keeps an image in its split when more geotags arrive later. Here, beside the id
    grammar, so the sample generator can give both splits an image without importing TensorFlow.
    """
    digest = hashlib.sha256(image_id.encode("utf-8")).digest()
    return "val" if int.from_bytes(digest[:8], "big") < val_fraction * 2**64 else "train"


@dataclasses.dataclass(frozen=True, slots=True)
class GeoTag:
    """One geotagged image: Flickr's location of the photo behind an ImageNet image id."""

    image_id: str
    wnid: str
    lat: float
    lon: float
    accuracy: int  # Flickr's 1 (world) .. 16 (street)
    country: str  # may be empty: Flickr names no country for photos at sea or on borders


@dataclasses.dataclass(frozen=True, slots=True)
class Missing:
    """An image whose Flickr photo has no geotag: `code` is a NO_GEOTAG_CODES key."""

    image_id: str
    wnid: str
    code: int


def csv_line(fields: Iterable[object]) -> str:
    """One CSV record ending in a newline, quoted by the csv module (countries such as "Korea, Republic of")."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(fields)
    return buffer.getvalue()


def check_location(lat: float, lon: float, accuracy: int, country: str) -> None:
    """Raises ValueError naming the first value a geotags.csv row may not hold.

    Checks types as well as ranges because the Flickr client passes values straight from a JSON answer. Errors
    show only the type of a value that is not of the expected one: the repr of deeply nested JSON could recurse.
    """
    if not (isinstance(lat, float) and isinstance(lon, float)):
        raise ValueError(f"lat/lon must be floats, got {type(lat).__name__}, {type(lon).__name__}")
    if not (-90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0):
        raise ValueError(f"coordinates out of range: lat={lat}, lon={lon}")
    if not isinstance(accuracy, int) or isinstance(accuracy, bool) or not 0 <= accuracy <= 16:
        shown = accuracy if isinstance(accuracy, int) else type(accuracy).__name__
        raise ValueError(f"Flickr accuracy must be 0..16, got {shown}")
    if not isinstance(country, str):
        raise ValueError(f"country must be text, got {type(country).__name__}")
    # isprintable() is False for line breaks, tabs, control and format characters and lone surrogates: what would
    # tear a row, hide in a log or fail to encode as UTF-8.
    if len(country) > MAX_COUNTRY_CHARS or not country.isprintable():
        raise ValueError(f"country must be printable text of at most {MAX_COUNTRY_CHARS} characters, got "
                         f"{country!r:.80}")


def check_geotag(tag: GeoTag) -> None:
    """Raises ValueError saying what makes `tag` unfit for geotags.csv: the one definition of a valid row."""
    _check_id(tag.image_id, tag.wnid)
    check_location(tag.lat, tag.lon, tag.accuracy, tag.country)


def geotag_line(tag: GeoTag) -> str:
    """One line, always (check_geotag keeps line breaks out of the country): the geotagger finds torn rows by their
    missing newline. Raises ValueError for a row the reader would refuse.

    repr() of a float round-trips exactly, so the builder reads back the very value that was written (float()
    first: numpy's floats are floats whose repr is not a number).
    """
    check_geotag(tag)
    return csv_line((tag.image_id, tag.wnid, repr(float(tag.lat)), repr(float(tag.lon)), tag.accuracy,
                     tag.country))


def check_missing(missing: Missing) -> None:
    """Raises ValueError saying what makes `missing` unfit for geotags.csv.missing: the one definition of a row."""
    _check_id(missing.image_id, missing.wnid)
    # The type too: True == 1 and 1.0 == 1, but the reader refuses "True" and "1.0".
    if type(missing.code) is not int or missing.code not in NO_GEOTAG_CODES:
        raise ValueError(f"code must be one of {sorted(NO_GEOTAG_CODES)}, got {missing.code!r:.40}")


def missing_line(missing: Missing) -> str:
    """Raises ValueError for a row the reader would refuse."""
    check_missing(missing)
    return csv_line((missing.image_id, missing.wnid, missing.code))


def _check_id(image_id: str, wnid: str) -> None:
    id_wnid = wnid_of(image_id)
    if id_wnid != wnid:
        raise ValueError(f"wnid {wnid!r} does not match image id {image_id!r}")


def parse_geotag(row: list[str], where: str) -> GeoTag:
    """A validated GeoTag from one CSV record; `where` ("file:line") prefixes every error."""
    if len(row) != len(GEOTAG_COLUMNS):
        raise ValueError(f"{where}: expected the {len(GEOTAG_COLUMNS)} fields {GEOTAG_COLUMNS}, got {row!r}")
    image_id, wnid, lat_s, lon_s, accuracy_s, country = row
    try:
        lat, lon, accuracy = float(lat_s), float(lon_s), int(accuracy_s)
    except ValueError:
        raise ValueError(
            f"{where}: lat/lon/accuracy must be numbers, got {lat_s!r}, {lon_s!r}, {accuracy_s!r}") from None
    tag = GeoTag(image_id, wnid, lat, lon, accuracy, country)
    try:
        check_geotag(tag)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return tag


def parse_missing(row: list[str], where: str) -> Missing:
    if len(row) != len(MISSING_COLUMNS):
        raise ValueError(f"{where}: expected the {len(MISSING_COLUMNS)} fields {MISSING_COLUMNS}, got {row!r}")
    image_id, wnid, code_s = row
    missing = Missing(image_id, wnid, _CODE_OF_TEXT.get(code_s, code_s))
    try:
        check_missing(missing)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return missing


def _without_bom(lines: Iterable[str]) -> Iterator[str]:
    """`lines` without the UTF-8 byte-order mark some editors (Notepad, Excel) put before the first one."""
    lines = iter(lines)
    first = next(lines, None)
    if first is not None:
        yield first.removeprefix("\ufeff")
        yield from lines


def _records(lines: Iterable[str], columns: tuple[str, ...], source: str) -> Iterator[tuple[str, list[str]]]:
    """(where, row) for each record after checking the header; each image id may appear once.

    Blank lines, wherever they are, are no records (an editor's save often adds one at the end), but still count
    in `where`'s line numbers.
    """
    reader = csv.reader(_without_bom(lines))
    records = (row for row in reader if len(row) > 1 or "".join(row).strip())
    header = next(records, None)
    if header is None or tuple(header) != columns:
        raise ValueError(f"{source}: header must be {','.join(columns)}, got {header!r}")
    seen = set()
    for row in records:
        where = f"{source}:{reader.line_num}"
        if row[0] in seen:
            raise ValueError(f"{where}: image id {row[0]!r} appears twice")
        seen.add(row[0])
        yield where, row


def read_geotags(lines: Iterable[str], source: str) -> Iterator[GeoTag]:
    """GeoTags from the text lines of a geotags.csv, streamed; `source` names the file in errors."""
    for where, row in _records(lines, GEOTAG_COLUMNS, source):
        yield parse_geotag(row, where)


def read_missing(lines: Iterable[str], source: str) -> Iterator[Missing]:
    for where, row in _records(lines, MISSING_COLUMNS, source):
        yield parse_missing(row, where)


def parse_words(lines: Iterable[str], source: str) -> dict[str, str]:
    """ImageNet's words.txt (`<wnid>\\t<comma-separated synonyms>` per line) as {wnid: names}."""
    names = {}
    for number, line in enumerate(_without_bom(lines), start=1):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        wnid, tab, name = line.partition("\t")
        if not tab or not is_wnid(wnid):
            raise ValueError(f"{source}:{number}: expected '<wnid>\\t<names>', got {line!r}")
        names[wnid] = name.strip()
    return names
