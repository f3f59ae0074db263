r"""A small synthetic fMoW-rgb tree with learnable structure, for tests, the TFDS builder's dummy data and demos.

    python -m tfds_builders.fmow.sample OUT_DIR [--seed 0] [--train_locations 300] [--val_locations 300] \
        [--test_locations 300] [--grain 0.01]

The tree has the fMoW release's exact layout and per-image JSON schema (github.com/fMoW/dataset):

    OUT_DIR/<split>/<category>/<category>_<loc>/<category>_<loc>_<t>_rgb.jpg   (+ the same stem .json)

so the builder is tested on what a real user has on disk, and so the whole pipeline (pretraining, geo clusters,
temporal positives, linear probe) can run end to end in minutes on a CPU. The pictures are built so that
self-supervised pretraining has something to find and shortcuts are closed. Each rule and why:

Locations
- Locations scatter (about 1.5 degrees) around a fixed table of real places (`_CENTRES`), location i of a
  split around centre i mod len(table). Geo-clusters (K-means on unit-sphere xyz) then recover real groups.
  The first table rows straddle the antimeridian (Fiji, Chukotka) or lie above 70 degrees (Svalbard, McMurdo,
  Utqiagvik): small trees already have the places where lat/lon arithmetic goes wrong.
- What is built depends on where, as in fMoW (crop fields in farmland, ports on coasts): each place has a
  favourite class, drawn for half of its locations; the other half draw uniformly. So the place predicts the
  class in part (which is why geo-aware pretraining helps, the paper's premise), and only the object decides it.
- 1..6 images per location. The file index `<t>` is a permutation of 0..n-1 that is never the time order
  (when n > 1), as in the release, so a consumer that forgets to sort by `timestamp` is caught.

Surroundings: a function of the place, changed by time
- Terrain colours, texture scale and texture contrast are smooth functions of the location's unit-sphere
  vector (random Fourier features of xyz, fixed once for the whole synthetic world, independent of the seed),
  plus snow towards the poles. Nearby locations look alike, far ones differ, and nothing jumps at lon = +-180.
- Each visit blends its place's style with that of a random place on the globe (weight 0.2-0.6), as land
  cover changes between visits, and draws its own noise field: revisits share a hint of the ground's colours
  and texture statistics, and no pixel pattern. This is the change temporal positives teach invariance to: no
  crop or colour jitter of one image turns its ground into another visit's, so two views of one image (MoCo-v2)
  can be matched by their ground, two visits (TP) only by what stays: the object.

Object: a function of the class only
- The i-th class draws the i-th shape of `_SHAPES` (cross, horizontal stripes, concentric squares,
  checkerboard, triangle, L, grid of dots, ring): class information is in shape, texture and layout.
- Every shape covers about the same share of its box (0.36-0.41), and both the shape colour and the pad
  colour under it are drawn per image, as an exchangeable pair from one palette shared by all classes. The
  mean colour of a box is then the same in expectation for every class: a colour statistic (or a random conv
  net's pooled colour response) cannot tell the classes apart; the shape can.
- The box side is 42-60% of the shorter image side (so the object dominates a crop of 1.5-2x the box side), and
  the box centre keeps 0.75 box sides of margin where the image allows, so such a crop mostly stays inside.

Time: nuisance, never class
- Per image: object position, size (42-60 % of the shorter side), aspect and rotation (+-12 degrees) are
  drawn afresh; image size varies; the object and pad colours are redrawn (were they fixed per location, a
  colour pair would identify a location and contrastive learning would stop at colour, never reaching shape).
  A location's visits share the shape and a hint of their ground: temporal positives are matched by the shape.
- Timestamps: distinct days between 2002 and 2017 at about 10:30 local solar time (converted to UTC with the
  longitude), only on days when the sun is at least 5 degrees up (no polar-night images).
- Illumination follows the sun: brightness from the solar elevation (reported in `sun_elevation_dbl`),
  random contrast, a seasonal tint (hemisphere aware) and snow on the ground in high-latitude winters.
- Clouds: soft semi-transparent blobs on half of the images; `cloud_cover` is the percentage they cover.

Metadata is plausible and self-consistent: `gsd` makes the object a fixed physical size per location (clipped
to 0.3-2 m), `raw_location` is the image footprint (lon lat order) whose projected box centre is the location,
`utm` is the standard zone and latitude band of the location, `country_code` is the centre's ISO alpha-3.

The pixels and metadata of a location depend only on (seed, split, location index), and box IDs count up
through the tree: the same seed writes the same bytes.
"""

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import sys
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from PIL import Image

from .fmow_format import CLASS_NAMES

_SAMPLE_CLASS_NAMES = frozenset(
    (
        "airport",
        "crop_field",
        "office_building",
        "parking_lot_or_garage",
        "place_of_worship",
        "shipyard",
        "solar_farm",
        "storage_tank",
    )
)
# Eight real fMoW classes, kept in CLASS_NAMES' (alphabetical) order.
SAMPLE_CLASSES = tuple(name for name in CLASS_NAMES if name in _SAMPLE_CLASS_NAMES)
assert len(SAMPLE_CLASSES) == len(_SAMPLE_CLASS_NAMES), "a sample class is not in CLASS_NAMES"

# Labelled test: selection on val, test once; val and test large enough that a selection on val is not noise.
_DEFAULT_LOCATIONS = {"train": 300, "val": 300, "test": 300}
_SPLITS = ("train", "val", "test")  # Allowed split names; `test` in the labelled layout, for builder tests.
_MAX_IMAGES_PER_LOCATION = 6
_JPEG_QUALITY = 80
# Sensor noise: faint by default; the benchmark's grain gives 256 px JPEGs the size of real fMoW crops (~30 KB).
DEFAULT_GRAIN = 0.01
DEFAULT_IMAGE_SIZES = (96, 160)
BENCHMARK_GRAIN = 0.08

# (lat, lon, ISO 3166 alpha-3) of real places. The first five are the hard cases for coordinate code.
_CENTRES = (
    (-17.7, 179.5, "FJI"),  # Fiji: straddles the antimeridian.
    (78.2, 15.6, "NOR"),  # Svalbard: high Arctic.
    (65.7, -179.6, "RUS"),  # Chukotka: antimeridian, Arctic circle.
    (-77.8, 166.7, "ATA"),  # McMurdo: high Antarctic.
    (71.3, -156.8, "USA"),  # Utqiagvik: high Arctic.
    (40.7, -74.0, "USA"),
    (-23.5, -46.6, "BRA"),
    (51.5, -0.1, "GBR"),
    (30.0, 31.2, "EGY"),
    (6.5, 3.4, "NGA"),
    (-1.3, 36.8, "KEN"),
    (28.6, 77.2, "IND"),
    (39.9, 116.4, "CHN"),
    (35.7, 139.7, "JPN"),
    (-33.9, 151.2, "AUS"),
    (-36.8, 174.8, "NZL"),
    (19.4, -99.1, "MEX"),
    (-34.6, -58.4, "ARG"),
    (55.8, 37.6, "RUS"),
    (64.1, -21.9, "ISL"),
    (1.35, 103.8, "SGP"),
    (-4.3, 15.3, "COD"),
    (24.7, 46.7, "SAU"),
    (21.3, -157.9, "USA"),
)
_SCATTER_DEG = 1.5
_MAX_ABS_LAT = 84.0  # Where UTM ends; fMoW has nothing closer to the poles.
_MAX_ABS_LON = 179.95  # Keeps every footprint (< 0.03 degrees wide) on one side of the antimeridian.

_FIRST_DAY = datetime.date(2002, 1, 1)
_LAST_DAY = datetime.date(2017, 12, 30)  # Leaves room for the UTC offset of 10:30 local time.
_FIRST_DAY_UNIX = int(datetime.datetime.combine(_FIRST_DAY, datetime.time(), datetime.timezone.utc).timestamp())
_MIN_SUN_ELEVATION = 5.0

# Terrain colours (RGB in [0, 1]): forest, grass, farmland, desert, rock, built-up, snow.
_TERRAIN_PALETTE = np.array(
    [
        [0.20, 0.33, 0.17],
        [0.42, 0.55, 0.28],
        [0.62, 0.57, 0.36],
        [0.82, 0.70, 0.48],
        [0.50, 0.47, 0.44],
        [0.56, 0.56, 0.60],
        [0.92, 0.94, 0.97],
    ]
)
_SNOW = 6
# Object and pad colours, shared by all classes: concrete, asphalt, white roof, red roof, blue roof, brick,
# sand, dark green, grey-blue, ochre.
_OBJECT_PALETTE = np.array(
    [
        [0.70, 0.70, 0.68],
        [0.22, 0.22, 0.24],
        [0.93, 0.93, 0.90],
        [0.66, 0.22, 0.18],
        [0.25, 0.40, 0.65],
        [0.55, 0.33, 0.25],
        [0.85, 0.78, 0.60],
        [0.15, 0.35, 0.20],
        [0.45, 0.52, 0.60],
        [0.78, 0.60, 0.20],
    ]
)
_MIN_LUMA_GAP = 0.25  # Shape and pad colours differ at least this much in luma, so the shape is visible.


# ----------------------------------------------------------------------------------------------------------
# The world: smooth functions of the location.


@dataclasses.dataclass(frozen=True)
class _World:
    """Random Fourier features of the unit-sphere vector and the maps from them to terrain properties."""

    frequencies: np.ndarray  # (K, 3)
    phases: np.ndarray  # (K,)
    colour_logits: np.ndarray  # (2, P, K): two terrain colours, each a softmax mixture of the palette.
    scale_weights: np.ndarray  # (K,)
    contrast_weights: np.ndarray  # (K,)


def _make_world(num_features=8, rng_seed=20211011):
    """The synthetic world, fixed for every seed so that a place always looks the same."""
    rng = np.random.default_rng(rng_seed)
    return _World(
        frequencies=rng.normal(0.0, 2.0, (num_features, 3)),
        phases=rng.uniform(0.0, 2 * np.pi, num_features),
        colour_logits=rng.normal(0.0, 1.6, (2, len(_TERRAIN_PALETTE), num_features)),
        scale_weights=rng.normal(0.0, 1.0, num_features),
        contrast_weights=rng.normal(0.0, 1.0, num_features),
    )


_WORLD = _make_world()


def _unit_vector(lat, lon):
    """Unit-sphere xyz of a place: continuous across the antimeridian, unlike (lat, lon)."""
    lat, lon = np.radians(lat), np.radians(lon)
    return np.array([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)])


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


@dataclasses.dataclass(frozen=True)
class _TerrainStyle:
    colours: np.ndarray  # (2, 3): the two ground colours mixed by the texture.
    cells: float  # Texture cells across the canvas: large = fine texture.
    contrast: float  # How strongly the two colours separate.


def _terrain_style(lat, lon, world=_WORLD):
    """Ground colours and texture of a place, smooth over the sphere; snow takes over beyond ~70 degrees."""
    xyz = _unit_vector(lat, lon)
    features = np.sin(world.frequencies @ xyz + world.phases)
    snow_logit = 12.0 * (xyz[2] ** 2 - 0.85)  # z^2 is smooth at the equator and grows towards both poles.
    colours = []
    for logits in world.colour_logits:
        logits = logits @ features
        logits[_SNOW] = snow_logit
        colours.append(_softmax(logits) @ _TERRAIN_PALETTE)
    return _TerrainStyle(
        colours=np.stack(colours),
        cells=3.0 + 9.0 * _sigmoid(2.0 * world.scale_weights @ features),
        contrast=0.4 + 0.6 * _sigmoid(2.0 * world.contrast_weights @ features),
    )


def _revisit_style(rng, place, world=_WORLD):
    """The ground of one visit: the place's style blended with that of a random place on the globe (weight
    0.2-0.6), as land cover changes between visits (a harvested field, a flood, a burn scar, new construction).
    Revisits then share only a hint of their place's colours and texture, a change no colour jitter or crop
    imitates."""
    lat, lon = np.degrees(np.arcsin(rng.uniform(-1.0, 1.0))), rng.uniform(-180.0, 180.0)
    other, weight = _terrain_style(lat, lon, world), rng.uniform(0.2, 0.6)
    return _TerrainStyle(
        colours=(1 - weight) * place.colours + weight * other.colours,
        cells=float(np.exp((1 - weight) * np.log(place.cells) + weight * np.log(other.cells))),
        contrast=float((1 - weight) * place.contrast + weight * other.contrast),
    )


# ----------------------------------------------------------------------------------------------------------
# Sun, season and map conventions.


def _solar_declination_deg(day_of_year):
    return -23.44 * np.cos(2 * np.pi * (day_of_year + 10) / 365.25)


def _solar_elevation_deg(lat, day_of_year, local_hour):
    """Sun elevation from the declination and hour angle (no equation of time: a degree does not matter)."""
    decl = np.radians(_solar_declination_deg(day_of_year))
    hour_angle = np.radians(15.0 * (local_hour - 12.0))
    lat = np.radians(lat)
    sin_el = np.sin(lat) * np.sin(decl) + np.cos(lat) * np.cos(decl) * np.cos(hour_angle)
    return np.degrees(np.arcsin(sin_el))


def _solar_azimuth_deg(lat, day_of_year, local_hour):
    """Sun azimuth (degrees clockwise from north) before noon, from the spherical triangle pole-zenith-sun."""
    decl = np.radians(_solar_declination_deg(day_of_year))
    el = np.radians(_solar_elevation_deg(lat, day_of_year, local_hour))
    lat = np.radians(lat)
    cos_az = (np.sin(decl) - np.sin(el) * np.sin(lat)) / (np.cos(el) * np.cos(lat))
    azimuth = np.degrees(np.arccos(np.clip(cos_az, -1.0, 1.0)))
    return np.where(local_hour <= 12.0, azimuth, 360.0 - azimuth)


def _summer_strength(lat, day_of_year):
    """+1 at the local summer solstice, -1 at the winter one, 0 at the equinoxes and on the equator."""
    return np.sign(lat) * _solar_declination_deg(day_of_year) / 23.44


def _utm_zone(lat, lon):
    """Standard UTM zone number + latitude band (no Norway/Svalbard exceptions); polar caps are UPS A/B/Y/Z."""
    if lat < -80:
        return "A" if lon < 0 else "B"
    if lat >= 84:
        return "Y" if lon < 0 else "Z"
    zone = min(int((lon + 180) // 6) + 1, 60)
    band = "CDEFGHJKLMNPQRSTUVWX"[min(int((lat + 80) // 8), 19)]
    return f"{zone}{band}"


def _metres_per_degree(lat):
    """(metres per degree of longitude, per degree of latitude) near `lat`."""
    return 111_320.0 * np.cos(np.radians(lat)), 110_540.0


def _footprint_wkt(lat, lon, width, height, gsd, centre_xy):
    """WKT polygon (lon lat, counter-clockwise) of a north-up image whose pixel `centre_xy` lies at (lat, lon)."""
    m_lon, m_lat = _metres_per_degree(lat)
    west = lon - centre_xy[0] * gsd / m_lon
    east = west + width * gsd / m_lon
    north = lat + centre_xy[1] * gsd / m_lat
    south = north - height * gsd / m_lat
    corners = [(west, south), (east, south), (east, north), (west, north), (west, south)]
    return "POLYGON ((" + ", ".join(f"{x:.6f} {y:.6f}" for x, y in corners) + "))"


def _wrap_lon(lon):
    return (lon + 180.0) % 360.0 - 180.0


# ----------------------------------------------------------------------------------------------------------
# Shapes: masks over box coordinates (u, v) in [-0.5, 0.5], u to the right, v down. Each fills 0.5..0.57 of
# its square, hence 0.36..0.41 of the box after the inset: the covered share says little about the class.

_BAR = 1 - np.sqrt(0.5)  # Bar width giving a cross or an L of area 0.5.


def _cross(u, v):
    return (np.abs(u) < _BAR / 2) | (np.abs(v) < _BAR / 2)


def _stripes(u, v):
    return np.mod((v + 0.5) * 4, 1.0) < 0.5


def _concentric_squares(u, v):
    m = np.maximum(np.abs(u), np.abs(v))
    return (m > 0.4) | ((m > 0.14) & (m < 0.27))


def _checkerboard(u, v):
    return (np.floor((u + 0.5) * 3) + np.floor((v + 0.5) * 3)) % 2 == 0


def _triangle(u, v):
    return np.abs(u) <= (v + 0.5) / 2


def _l_shape(u, v):
    return (u < -0.5 + _BAR) | (v > 0.5 - _BAR)


def _dots(u, v):
    cu = np.mod((u + 0.5) * 4, 1.0) - 0.5
    cv = np.mod((v + 0.5) * 4, 1.0) - 0.5
    return cu**2 + cv**2 < 0.399**2


def _ring(u, v):
    r2 = u**2 + v**2
    return (r2 > 0.30**2) & (r2 <= 0.25)


# Ordered so that SAMPLE_CLASSES get fitting pictures: airport/cross (runways), crop_field/stripes,
# office_building/concentric squares, parking_lot/checkerboard, place_of_worship/triangle, shipyard/L (dock),
# solar_farm/dots (panels), storage_tank/ring. None is the horizontal mirror of another (flip augmentation).
_SHAPES: tuple[Callable[[np.ndarray, np.ndarray], np.ndarray], ...] = (
    _cross,
    _stripes,
    _concentric_squares,
    _checkerboard,
    _triangle,
    _l_shape,
    _dots,
    _ring,
)

_SHAPE_INSET = 0.85  # The shape fits in 85% of the box, so a rotation of up to ~12 degrees stays inside it.
_SUPERSAMPLE = 2


def _shape_alpha(shape, width, height, rotation_deg):
    """Anti-aliased coverage (height, width) in [0, 1] of `shape` rotated by `rotation_deg` inside a box."""
    n = _SUPERSAMPLE
    v, u = np.meshgrid(
        (np.arange(height * n) + 0.5) / (height * n) - 0.5,
        (np.arange(width * n) + 0.5) / (width * n) - 0.5,
        indexing="ij",
    )
    c, s = np.cos(np.radians(rotation_deg)), np.sin(np.radians(rotation_deg))
    ur, vr = (c * u + s * v) / _SHAPE_INSET, (-s * u + c * v) / _SHAPE_INSET
    inside = (np.abs(ur) <= 0.5) & (np.abs(vr) <= 0.5) & shape(ur, vr)
    return inside.reshape(height, n, width, n).mean(axis=(1, 3))


# ----------------------------------------------------------------------------------------------------------
# Plans: every random choice, drawn up front; rendering and writing are then deterministic functions of them.


@dataclasses.dataclass(frozen=True)
class _ImagePlan:
    t: int
    timestamp: int  # Unix seconds, UTC.
    width: int
    height: int
    box: tuple[int, int, int, int]  # x, y, w, h
    rotation_deg: float
    colours: np.ndarray  # (2, 3): shape colour, pad colour.
    gsd: float
    sun_elevation_deg: float
    summer: float
    contrast: float
    cloud_target: float  # Fraction of the image to cover with clouds.
    sun_azimuth_deg: float
    off_nadir_deg: float
    target_azimuth_deg: float
    scan_direction: str
    noise_seed: int  # For the pixel noise (clouds, grain) of this image.


@dataclasses.dataclass(frozen=True)
class _LocationPlan:
    split: str
    category: str
    index: int  # The `<loc>` of `<category>_<loc>`, counted per split and category.
    lat: float
    lon: float
    country_code: str
    terrain_seed: int  # Seeds each of its images' ground texture (drawn per image from the place's style).
    images: tuple[_ImagePlan, ...]


def _luma(rgb):
    return rgb @ np.array([0.299, 0.587, 0.114])


def _colour_pairs():
    """All ordered (shape, pad) palette pairs that differ enough in luma; symmetric, hence exchangeable."""
    luma = _luma(_OBJECT_PALETTE)
    return np.array(
        [(a, b) for a in range(len(luma)) for b in range(len(luma)) if abs(luma[a] - luma[b]) >= _MIN_LUMA_GAP]
    )


_COLOUR_PAIRS = _colour_pairs()


def _scatter(rng, centre_lat, centre_lon):
    """A point within 2 x _SCATTER_DEG (on the ground, per axis) of a centre, where every footprint is valid."""
    d_north, d_east = np.clip(rng.normal(0.0, _SCATTER_DEG, 2), -2 * _SCATTER_DEG, 2 * _SCATTER_DEG)
    lat = float(np.clip(centre_lat + d_north, -_MAX_ABS_LAT, _MAX_ABS_LAT))
    lon = _wrap_lon(centre_lon + d_east / np.cos(np.radians(lat)))
    return lat, float(np.clip(lon, -_MAX_ABS_LON, _MAX_ABS_LON))


_DAYS = np.arange((_LAST_DAY - _FIRST_DAY).days + 1)  # Day numbers since _FIRST_DAY ...
_DATES = np.datetime64(_FIRST_DAY) + _DAYS
_DAY_OF_YEAR = (_DATES - _DATES.astype("datetime64[Y]")).astype(np.int64) + 1  # ... and their day of year.


def _sunlit_days(lat, local_hour):
    """Day numbers since _FIRST_DAY (and their day of year) when the sun stands high enough at `local_hour`."""
    ok = _solar_elevation_deg(lat, _DAY_OF_YEAR, local_hour) >= _MIN_SUN_ELEVATION
    return _DAYS[ok], _DAY_OF_YEAR[ok]


_LOCAL_HOUR = 10.5  # Sun-synchronous imaging satellites pass at about 10:30 local solar time.


def _plan_times(rng, lat, lon, n):
    """n distinct sunlit imaging times, in file-index order: never sorted by time when n > 1."""
    days, day_of_year = _sunlit_days(lat, _LOCAL_HOUR)
    pick = rng.choice(len(days), size=n, replace=False)
    if n > 1 and np.all(np.diff(days[pick]) > 0):
        pick[[0, 1]] = pick[[1, 0]]
    local_hour = _LOCAL_HOUR + np.clip(rng.normal(0.0, 0.3, n), -0.8, 0.8)
    timestamps = _FIRST_DAY_UNIX + days[pick] * 86_400 + np.round((local_hour - lon / 15.0) * 3600)
    return timestamps.astype(np.int64), day_of_year[pick], local_hour


def _plan_box(rng, width, height, side_fraction, aspect):
    """A box of `side_fraction` of the shorter side, centred with 0.75 box sides of margin where possible."""
    side = side_fraction * min(width, height)
    w = int(round(np.clip(side * np.sqrt(aspect), 8, width)))
    h = int(round(np.clip(side / np.sqrt(aspect), 8, height)))
    margin = 0.75 * max(w, h)
    cx = rng.uniform(margin, width - margin) if width > 2 * margin else width / 2
    cy = rng.uniform(margin, height - margin) if height > 2 * margin else height / 2
    x = int(np.clip(round(cx - w / 2), 0, width - w))
    y = int(np.clip(round(cy - h / 2), 0, height - h))
    return x, y, w, h


def _plan_location(seed, split, loc_index, category, category_index, size_range):
    """Every random choice for location `loc_index` of `split`, from its own stream (seed, split, index)."""
    rng = np.random.default_rng([seed, _SPLITS.index(split), loc_index])
    centre_lat, centre_lon, country = _CENTRES[loc_index % len(_CENTRES)]
    lat, lon = _scatter(rng, centre_lat, centre_lon)
    n = int(rng.integers(1, _MAX_IMAGES_PER_LOCATION + 1))
    timestamps, day_of_year, local_hour = _plan_times(rng, lat, lon, n)
    object_metres = rng.uniform(30.0, 70.0)
    images = []
    for t in range(n):
        width = int(rng.integers(size_range[0], size_range[1] + 1))
        height = int(np.clip(round(width * np.exp(rng.uniform(-0.15, 0.15))), *size_range))
        box = _plan_box(rng, width, height, rng.uniform(0.42, 0.6), np.exp(rng.uniform(-0.12, 0.12)))
        images.append(
            _ImagePlan(
                t=t,
                timestamp=int(timestamps[t]),
                width=width,
                height=height,
                box=box,
                rotation_deg=float(rng.uniform(-12.0, 12.0)),
                colours=_OBJECT_PALETTE[_COLOUR_PAIRS[rng.integers(len(_COLOUR_PAIRS))]],
                gsd=float(np.clip(object_metres / np.sqrt(box[2] * box[3]), 0.3, 2.0)),
                sun_elevation_deg=float(_solar_elevation_deg(lat, day_of_year[t], local_hour[t])),
                summer=float(_summer_strength(lat, day_of_year[t])),
                contrast=float(rng.uniform(0.8, 1.15)),
                cloud_target=0.0 if rng.random() < 0.5 else float(rng.uniform(0.03, 0.45)),
                sun_azimuth_deg=float(_solar_azimuth_deg(lat, day_of_year[t], local_hour[t])),
                off_nadir_deg=float(rng.uniform(0.0, 35.0)),
                target_azimuth_deg=float(rng.uniform(0.0, 360.0)),
                scan_direction="Forward" if rng.random() < 0.5 else "Reverse",
                noise_seed=int(rng.integers(2**31)),
            )
        )
    return _LocationPlan(
        split=split,
        category=category,
        index=category_index,
        lat=lat,
        lon=lon,
        country_code=country,
        terrain_seed=int(rng.integers(2**31)),
        images=tuple(images),
    )


# ----------------------------------------------------------------------------------------------------------
# Rendering: float RGB in [0, 1], vectorised.


def _smooth_noise(rng, cells, height, width):
    """Zero-mean, unit-variance noise varying over ~`cells` blobs across the larger side (bicubic upsampling)."""
    grid = max(2, int(round(cells)))
    low = rng.normal(0.0, 1.0, (grid + 1, grid + 1)).astype(np.float32)
    field = np.asarray(Image.fromarray(low).resize((width, height), Image.Resampling.BICUBIC))
    return (field - field.mean()) / (field.std() + 1e-6)


def _terrain_canvas(rng, style, size):
    """The ground around one location, (3, size, size): two colours mixed by coarse noise, with fine grain.

    Pixels are channel-first throughout rendering: numpy broadcasts a per-channel colour over a (3, H, W)
    array several times faster than over (H, W, 3).
    """
    coarse = _smooth_noise(rng, style.cells, size, size)
    fine = _smooth_noise(rng, 4 * style.cells, size, size)
    mix = _sigmoid(np.float32(3.0 * style.contrast) * coarse)
    colours = (style.colours + rng.normal(0.0, 0.03, style.colours.shape)).astype(np.float32)  # Own shade.
    ground = colours[0][:, None, None] + (colours[1] - colours[0])[:, None, None] * mix
    return ground * (1 + np.float32(0.12 * style.contrast) * fine)


def _channels(rgb):
    """A colour (3,) as float32 (3, 1, 1), to broadcast over channel-first pixels."""
    return np.asarray(rgb, np.float32)[:, None, None]


def _render(plan, canvas, lat, shape, grain):
    """One image (3, height, width) in [0, 1] (float32) and the fraction of it under clouds.

    `grain` is the standard deviation of the per-pixel sensor noise.

    `canvas` is this image's ground (`_terrain_canvas`), its centre put under the box centre.
    """
    rng = np.random.default_rng(plan.noise_seed)
    x, y, w, h = plan.box
    half = canvas.shape[1] // 2
    top, left = half - (y + h // 2), half - (x + w // 2)
    image = canvas[:, top : top + plan.height, left : left + plan.width]

    snow = np.clip(-plan.summer, 0, 1) * np.clip((abs(lat) - 45.0) / 25.0, 0, 1) * 0.6
    image = image * np.float32(1 - snow) + _channels(_TERRAIN_PALETTE[_SNOW] * snow)

    shape_colour, pad_colour = _channels(plan.colours[0]), _channels(plan.colours[1])
    alpha = (0.95 * _shape_alpha(shape, w, h, plan.rotation_deg)).astype(np.float32)
    pad = np.float32(0.1) * image[:, y : y + h, x : x + w] + np.float32(0.9) * pad_colour
    image[:, y : y + h, x : x + w] = pad + alpha * (shape_colour - pad)

    # Illumination as one affine map per channel: contrast around the ground's mean colour, sun gain, tint.
    gain = 0.6 + 0.5 * np.sqrt(np.sin(np.radians(max(plan.sun_elevation_deg, 0.0))))
    mean = canvas[:, ::8, ::8].mean(axis=(1, 2))
    offset = (1 - plan.contrast) * gain * mean + plan.summer * np.array([0.03, 0.04, -0.03])
    image = image * np.float32(plan.contrast * gain) + _channels(offset)

    cloud_fraction = 0.0
    if plan.cloud_target > 0:
        field = _smooth_noise(rng, 4, plan.height, plan.width)  # ~N(0, 1) per pixel.
        threshold = statistics.NormalDist().inv_cdf(1.0 - plan.cloud_target)
        cloud_fraction = float(np.mean(field > threshold))
        cloud = np.clip((field - threshold) * np.float32(0.75 / 0.5), 0, 0.75)
        image = image + cloud * (np.float32(0.95) - image)
    image += np.float32(grain) * rng.standard_normal(image.shape, dtype=np.float32)
    return np.clip(image, 0.0, 1.0), cloud_fraction


# ----------------------------------------------------------------------------------------------------------
# Records and files.


def _iso_utc(timestamp):
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _record(location, plan, stem, cloud_fraction, box_id):
    """The per-image JSON, keys in the release's order."""
    x, y, w, h = plan.box
    return {
        "img_filename": f"{stem}_rgb.jpg",
        "img_width": plan.width,
        "img_height": plan.height,
        "gsd": round(plan.gsd, 4),
        "cloud_cover": int(round(100 * cloud_fraction)),
        "timestamp": _iso_utc(plan.timestamp),
        "utm": _utm_zone(location.lat, location.lon),
        "country_code": location.country_code,
        "scan_direction": plan.scan_direction,
        "off_nadir_angle_dbl": round(plan.off_nadir_deg, 3),
        "target_azimuth_dbl": round(plan.target_azimuth_deg, 3),
        "sun_azimuth_dbl": round(plan.sun_azimuth_deg, 3),
        "sun_elevation_dbl": round(plan.sun_elevation_deg, 3),
        "pan_resolution_dbl": round(plan.gsd, 4),
        "multi_resolution_dbl": round(4 * plan.gsd, 4),
        "approximate_wavelengths": [661, 545, 477],
        "raw_location": _footprint_wkt(
            location.lat, location.lon, plan.width, plan.height, plan.gsd, (x + w / 2, y + h / 2)
        ),
        "bounding_boxes": [{"ID": box_id, "box": [x, y, w, h], "category": location.category, "visible": "True"}],
    }


def _draw_classes(rng, n_locations, n_classes, favourite_share=0.5):
    """Class ids of locations 0..n-1: location i (around `_CENTRES[i % len]`) takes its place's favourite class
    with probability `favourite_share`, else a uniform one. Favourites cycle over the classes, so every class is
    some places' favourite and the classes stay roughly balanced."""
    favourite = (np.arange(n_locations) % len(_CENTRES)) % n_classes
    uniform = rng.integers(0, n_classes, n_locations)
    return np.where(rng.random(n_locations) < favourite_share, favourite, uniform)


def _write_location(root, location, shape, canvases, first_box_id, grain):
    """Writes one location's images and JSONs; returns the number of images."""
    folder = os.path.join(root, location.split, location.category, f"{location.category}_{location.index}")
    os.makedirs(folder)
    for k, (plan, canvas) in enumerate(zip(location.images, canvases)):
        stem = f"{location.category}_{location.index}_{plan.t}"
        pixels, cloud_fraction = _render(plan, canvas, location.lat, shape, grain)
        Image.fromarray(np.round(pixels * 255).astype(np.uint8).transpose(1, 2, 0)).save(
            os.path.join(folder, f"{stem}_rgb.jpg"), quality=_JPEG_QUALITY
        )
        record = _record(location, plan, stem, cloud_fraction, first_box_id + k)
        with open(os.path.join(folder, f"{stem}_rgb.json"), "w") as f:
            json.dump(record, f)
            f.write("\n")
    return len(location.images)


def _check_args(out_dir, seed, locations_per_split, classes, image_size_range, grain):
    """Clear errors for bad arguments, before anything is written."""
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"sample: seed must be a non-negative int, got {seed!r}")
    if not 0 <= grain < 1:
        raise ValueError(f"sample: grain must be in [0, 1) (noise std of pixels in [0, 1]), got {grain!r}")
    for split, n in locations_per_split.items():
        if split not in _SPLITS:
            raise ValueError(f"sample: unknown split {split!r} in locations_per_split; known: {_SPLITS}")
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
            raise ValueError(f"sample: locations_per_split[{split!r}] must be a positive int, got {n!r}")
    unknown = [c for c in classes if c not in CLASS_NAMES]
    if unknown:
        raise ValueError(f"sample: classes {unknown} are not fMoW classes (tfds_builders.fmow.fmow_format)")
    if len(set(classes)) != len(classes) or not 1 <= len(classes) <= len(_SHAPES):
        raise ValueError(
            f"sample: classes must be 1..{len(_SHAPES)} distinct names (one shape each), got {list(classes)}"
        )
    if not (
        len(image_size_range) == 2
        and all(isinstance(s, (int, np.integer)) for s in image_size_range)
        and 32 <= image_size_range[0] <= image_size_range[1]
    ):
        raise ValueError(
            f"sample: image_size_range must be two ints with 32 <= low <= high, got {image_size_range}"
        )
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"sample: {out_dir} exists and is not empty; give a new or empty directory")


def generate(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    locations_per_split: Mapping[str, int] | None = None,
    classes: Sequence[str] | None = None,
    image_size_range: tuple[int, int] = DEFAULT_IMAGE_SIZES,
    grain: float = DEFAULT_GRAIN,
) -> dict:
    """Writes a synthetic fMoW-rgb tree at `out_dir` (see the module docstring for the rules).

    Args:
      out_dir: a new or empty directory.
      seed: everything written is a deterministic function of it.
      locations_per_split: {split: number of locations}, splits among train/val/test; default 300 each
        (val and test as large as train, so that selecting on val and scoring test are not noise).
      classes: fMoW class names, at most 8; the i-th is drawn as the i-th shape. Default SAMPLE_CLASSES.
      image_size_range: (low, high) of image widths and heights, in pixels.
      grain: standard deviation of the per-pixel sensor noise (pixels in [0, 1]). `BENCHMARK_GRAIN` makes the
        `rgb_256` build's JPEGs ~30 KB, as large as real fMoW crops, so input benchmarks decode realistic files.

    Returns:
      {split: {"locations": n, "images": m}} for each split written.
    """
    out_dir = os.fspath(out_dir)
    locations_per_split = dict(_DEFAULT_LOCATIONS if locations_per_split is None else locations_per_split)
    classes = tuple(SAMPLE_CLASSES if classes is None else classes)
    image_size_range = tuple(image_size_range)
    _check_args(out_dir, seed, locations_per_split, classes, image_size_range, grain)

    canvas_size = 2 * image_size_range[1]
    summary, box_id = {}, 1
    for split, n_locations in locations_per_split.items():
        split_rng = np.random.default_rng([seed, _SPLITS.index(split)])
        class_ids = _draw_classes(split_rng, n_locations, len(classes))
        per_class = [0] * len(classes)
        images = 0
        for i, class_id in enumerate(class_ids):
            location = _plan_location(seed, split, i, classes[class_id], per_class[class_id], image_size_range)
            per_class[class_id] += 1
            style = _terrain_style(location.lat, location.lon)
            canvases = []
            for plan in location.images:
                rng = np.random.default_rng([location.terrain_seed, plan.t])
                canvases.append(_terrain_canvas(rng, _revisit_style(rng, style), canvas_size))
            images += _write_location(out_dir, location, _SHAPES[class_id], canvases, box_id, grain)
            box_id += len(location.images)
        summary[split] = {"locations": int(n_locations), "images": images}
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m tfds_builders.fmow.sample",
        description="Write a small synthetic fMoW-rgb tree (train, val and test splits) with learnable structure.",
    )
    parser.add_argument("out_dir", help="new or empty directory to write the tree into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train_locations", type=int, default=_DEFAULT_LOCATIONS["train"])
    parser.add_argument("--val_locations", type=int, default=_DEFAULT_LOCATIONS["val"])
    parser.add_argument("--test_locations", type=int, default=_DEFAULT_LOCATIONS["test"],
                        help="0 writes no test split")
    parser.add_argument("--grain", type=float, default=DEFAULT_GRAIN,
                        help=f"sensor noise std; {BENCHMARK_GRAIN} for realistic JPEG sizes in input benchmarks")
    parser.add_argument("--image_sizes", type=int, nargs=2, default=DEFAULT_IMAGE_SIZES, metavar=("LOW", "HIGH"),
                        help="range of image widths and heights in pixels (larger for build and input benchmarks)")
    args = parser.parse_args(argv)
    try:
        summary = generate(
            args.out_dir,
            seed=args.seed,
            locations_per_split={split: n for split, n in (
                ("train", args.train_locations), ("val", args.val_locations), ("test", args.test_locations)) if n},
            grain=args.grain,
            image_size_range=tuple(args.image_sizes),
        )
    except (ValueError, FileExistsError) as e:
        parser.error(str(e))
    json.dump(summary, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
