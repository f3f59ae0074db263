"""Facts about the fMoW-rgb release format, shared by the builder and the sample generator.

One place for the class list: the builder's `ClassLabel`, the sample generator and every consumer
(through the built dataset's `info.features['label'].names`) agree because they all read it here.

The rest of the module is the pure parsing of one image's JSON record: timestamp, footprint centroid,
labelled box, crop window, metadata. No I/O here: the builder reads the files and hands the parsed
dicts to these functions, so every rule can be unit-tested on literals.
"""

import dataclasses
import datetime
import math
import re
from collections.abc import Mapping, Sequence

import numpy as np

# The 62 training classes, alphabetical (the release's 63rd, `false_detection`, is not a class).
CLASS_NAMES = (
    "airport", "airport_hangar", "airport_terminal", "amusement_park", "aquaculture",
    "archaeological_site", "barn", "border_checkpoint", "burial_site", "car_dealership",
    "construction_site", "crop_field", "dam", "debris_or_rubble", "educational_institution",
    "electric_substation", "factory_or_powerplant", "fire_station", "flooded_road", "fountain",
    "gas_station", "golf_course", "ground_transportation_station", "helipad", "hospital",
    "impoverished_settlement", "interchange", "lake_or_pond", "lighthouse", "military_facility",
    "multi-unit_residential", "nuclear_powerplant", "office_building", "oil_or_gas_facility", "park",
    "parking_lot_or_garage", "place_of_worship", "police_station", "port", "prison", "race_track",
    "railway_bridge", "recreational_facility", "road_bridge", "runway", "shipyard", "shopping_mall",
    "single-unit_residential", "smokestack", "solar_farm", "space_facility", "stadium", "storage_tank",
    "surface_mine", "swimming_pool", "toll_booth", "tower", "tunnel_opening", "waste_disposal",
    "water_treatment_facility", "wind_farm", "zoo",
)
assert len(CLASS_NAMES) == 62 and list(CLASS_NAMES) == sorted(CLASS_NAMES)

# JSON keys without which an image is skipped (everything else is optional or ignored).
REQUIRED_KEYS = ("timestamp", "raw_location", "bounding_boxes")
# Numeric metadata stored per image (NaN when absent).
FLOAT_METADATA = ("gsd", "cloud_cover", "off_nadir_angle_dbl", "sun_elevation_dbl")

_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
_WKT_POLYGON = re.compile(r"^\s*POLYGON\s*(?:ZM|Z|M)?\s*\((.*)\)\s*$", re.IGNORECASE | re.DOTALL)
_WKT_RING = re.compile(r"\(([^()]*)\)")
# Larger box values are corrupt records, not pixels (and would overflow the crop arithmetic).
_MAX_PIXEL_COORDINATE = 1e7
# Below this area (deg^2, about 1 m^2 at the equator) a footprint is treated as degenerate.
_MIN_AREA_DEG2 = 1e-10


class RecordError(ValueError):
    """An image JSON that cannot be used; `reason` is the key under which the builder counts the skip."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    """What the builder keeps from one image's JSON."""
    timestamp: int                           # Unix seconds, UTC.
    lat_lon: tuple[float, float]             # Area centroid of the image footprint, degrees.
    box: tuple[float, float, float, float]   # Labelled bounding box (x, y, width, height), pixels.
    metadata: dict                           # FLOAT_METADATA keys -> float, "country_code" -> str.


def parse_timestamp(text: str) -> int:
    """ISO 8601 text ("2012-04-02T10:32:22Z"; fractions and offsets allowed) -> Unix seconds UTC, floored.

    A time without an offset is taken as UTC, which is what the release's "Z" times mean. Integer arithmetic
    rather than `datetime.timestamp()`, so whole-second times map exactly, without float rounding.
    """
    if not isinstance(text, str):
        raise ValueError(f"timestamp must be an ISO 8601 string, got {text!r}")
    moment = datetime.datetime.fromisoformat(text.strip())
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return (moment - _EPOCH) // datetime.timedelta(seconds=1)


def parse_wkt_polygon(wkt: str) -> list[np.ndarray]:
    """WKT "POLYGON ((lon lat, ...), (hole ...))" -> rings as float64 [N, 2] (lon, lat) arrays, exterior first.

    Only POLYGON is accepted (every fMoW footprint is one); Z/M ordinates are dropped.
    """
    match = _WKT_POLYGON.match(wkt) if isinstance(wkt, str) else None
    if match is None:
        raise ValueError(f"expected a WKT POLYGON, got {str(wkt)[:80]!r}")
    rings = []
    for ring_text in _WKT_RING.findall(match.group(1)):
        vertices = [vertex.split() for vertex in ring_text.split(",")]
        if len(vertices) < 3 or any(len(v) < 2 for v in vertices):
            raise ValueError(f"a WKT ring needs at least 3 'lon lat' vertices, got {ring_text[:80]!r}")
        rings.append(np.array([[float(v[0]), float(v[1])] for v in vertices], dtype=np.float64))
    if not rings:
        raise ValueError(f"WKT POLYGON without a ring: {wkt[:80]!r}")
    return rings


def _wrap_lon(lon):
    """Longitude(s) into [-180, 180)."""
    return (np.asarray(lon) + 180.0) % 360.0 - 180.0


def _ring_area_and_moment(ring: np.ndarray) -> tuple[float, np.ndarray]:
    """Shoelace formula: signed area of a ring (closed or not) and its first moment (area * centroid)."""
    x, y = ring[:, 0], ring[:, 1]
    x_next, y_next = np.roll(x, -1), np.roll(y, -1)
    cross = x * y_next - x_next * y
    moment = np.array([((x + x_next) * cross).sum(), ((y + y_next) * cross).sum()]) / 6.0
    return cross.sum() / 2.0, moment


def polygon_centroid(rings: Sequence[np.ndarray]) -> tuple[float, float]:
    """Area centroid (lat, lon) in degrees of a lon/lat polygon given as rings (exterior first, then holes).

    Planar in degrees, exact enough for footprints of a few km. Longitudes are unwrapped around the first
    vertex, so a footprint straddling the antimeridian (179.99 .. -179.99) stays one small polygon instead
    of one spanning the globe; the result is wrapped back into [-180, 180). Working relative to the first
    vertex also keeps the shoelace products small. Ring orientation does not matter (holes are subtracted
    by absolute area). A degenerate, zero-area footprint falls back to the mean of its distinct vertices.
    """
    origin = rings[0][0]
    local = []
    for ring in rings:
        rel = ring - origin
        rel[:, 0] = _wrap_lon(rel[:, 0])
        local.append(rel)
    ext_area, ext_moment = _ring_area_and_moment(local[0])
    area, moment = abs(ext_area), np.sign(ext_area) * ext_moment
    for hole in local[1:]:
        hole_area, hole_moment = _ring_area_and_moment(hole)
        area -= abs(hole_area)
        moment = moment - np.sign(hole_area) * hole_moment
    if area > _MIN_AREA_DEG2:
        lon, lat = moment / area
    else:
        exterior = local[0][:-1] if np.array_equal(local[0][0], local[0][-1]) else local[0]
        lon, lat = exterior.mean(axis=0)
    return float(lat + origin[1]), float(_wrap_lon(lon + origin[0]))


def footprint_centroid(wkt: str) -> tuple[float, float]:
    """(lat, lon) area centroid of a `raw_location` WKT footprint."""
    return polygon_centroid(parse_wkt_polygon(wkt))


def is_on_the_globe(rings: Sequence[np.ndarray]) -> bool:
    """Whether every (lon, lat) vertex is finite with |lat| <= 90 and |lon| <= 180 (WGS84 degrees).

    One image placed off the globe would make its whole location's mean coordinates NaN or meaningless.
    """
    return all(np.all(np.isfinite(ring)) and np.all(np.abs(ring[:, 1]) <= 90.0)
               and np.all(np.abs(ring[:, 0]) <= 180.0) for ring in rings)


def mean_lat_lon(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Mean of (lat, lon) points taken on the unit sphere, so that neighbours on either side of the
    antimeridian average to about ±180 rather than 0."""
    lat, lon = np.radians(np.asarray(points, dtype=np.float64).reshape(-1, 2)).T
    xyz = np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], axis=-1).mean(axis=0)
    norm = np.linalg.norm(xyz)
    if norm < 1e-9:
        raise ValueError(f"the points cancel out on the sphere, they have no mean direction: {points!r:.200}")
    x, y, z = xyz / norm
    return float(np.degrees(np.arcsin(np.clip(z, -1.0, 1.0)))), float(np.degrees(np.arctan2(y, x)))


def choose_box(boxes: Sequence, category: str) -> tuple[float, float, float, float]:
    """The labelled box (x, y, width, height): the first entry whose "category" is the location folder's
    category, else the first entry. Several boxes appear when one object was annotated more than once."""
    if not isinstance(boxes, Sequence) or isinstance(boxes, str) or not boxes:
        raise ValueError(f"bounding_boxes must be a non-empty list, got {boxes!r:.80}")
    entries = [b for b in boxes if isinstance(b, Mapping)]
    chosen = next((b for b in entries if b.get("category") == category), entries[0] if entries else {})
    values = chosen.get("box")
    if not isinstance(values, Sequence) or isinstance(values, str) or len(values) != 4:
        raise ValueError(f"a bounding box needs 'box': [x, y, width, height], got {chosen!r:.80}")
    x, y, width, height = (float(v) for v in values)
    if not all(math.isfinite(v) and abs(v) < _MAX_PIXEL_COORDINATE for v in (x, y, width, height)):
        raise ValueError(f"bounding box values are not finite pixel coordinates: {values!r}")
    return x, y, width, height


def _float_metadata(record: Mapping, key: str) -> float:
    """A numeric field; for `*_dbl` keys, else the mean of its `_min/_max_dbl` or `_start/_end_dbl` variants;
    NaN when none is there or parses. Metadata is descriptive only, so an odd value must not cost the image."""
    candidates = [[key]]
    if key.endswith("_dbl"):
        stem = key[: -len("_dbl")]
        candidates += [[f"{stem}_min_dbl", f"{stem}_max_dbl"], [f"{stem}_start_dbl", f"{stem}_end_dbl"]]
    for keys in candidates:
        try:
            return float(np.mean([float(record[k]) for k in keys]))
        except (KeyError, TypeError, ValueError):
            continue
    return float("nan")


def parse_image_record(record: object, category: str) -> ImageRecord:
    """Validates one image's parsed JSON and extracts what the builder stores. Extra keys are ignored.

    Raises:
      RecordError: reason "missing_field" when timestamp, raw_location or bounding_boxes is absent or empty;
        "invalid_location" when the footprint has a non-finite or out-of-range vertex; "invalid_field" when a
        field does not parse, or the JSON is not an object.
    """
    if not isinstance(record, Mapping):
        raise RecordError("invalid_field", f"expected a JSON object, got {type(record).__name__}")
    missing = [key for key in REQUIRED_KEYS if record.get(key) in (None, "", [])]
    if missing:
        raise RecordError("missing_field", f"missing or empty: {', '.join(missing)}")
    try:
        timestamp = parse_timestamp(record["timestamp"])
        rings = parse_wkt_polygon(record["raw_location"])
        box = choose_box(record["bounding_boxes"], category)
    except (ValueError, TypeError) as error:
        raise RecordError("invalid_field", str(error)) from error
    if not is_on_the_globe(rings):
        raise RecordError("invalid_location", "raw_location has a vertex that is not finite or lies outside "
                          f"|lat| <= 90, |lon| <= 180: {record['raw_location'][:120]!r}")
    lat_lon = polygon_centroid(rings)
    metadata = {key: _float_metadata(record, key) for key in FLOAT_METADATA}
    metadata["country_code"] = str(record.get("country_code") or "")
    return ImageRecord(timestamp=timestamp, lat_lon=lat_lon, box=box, metadata=metadata)
