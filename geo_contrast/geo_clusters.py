"""Geo-location pseudo-labels: spherical k-means over image coordinates (pure numpy, no I/O).

The paper clusters the training images' coordinates into 100 clusters and uses each image's cluster as a
class label; its clustering code was not released. K-means on raw (lat, lon) treats lon = 179.9 and -179.9
as 360 degrees apart and splits clusters at the antimeridian, and squeezes distances near the poles. Here
every coordinate becomes a unit vector on the sphere and clusters are found by cosine similarity (spherical
k-means): assignment = largest dot product with a unit centroid, update = the normalised mean direction.

Images of one location share coordinates, so k-means runs on the distinct locations weighted by their image
counts: the result of clustering every image (places closer than ~6 m merged), for a fraction of the work.
"""

from __future__ import annotations

import numpy as np

# Points scored against all centroids at once: a [_CHUNK, K] float64 block small enough to stay in cache.
_CHUNK = 16384
# Unit vectors equal to this many decimals (1e-6 of the Earth's radius, about 6 m) are one place. Rounding
# merges lon = 180 with lon = -180 and every longitude at a pole, and keeps distinct places far enough apart
# that their squared chord distance (k-means++ weights) is not lost to float64 rounding.
_SAME_PLACE_DECIMALS = 6


def _validate_latlon(latlon_deg) -> np.ndarray:
    """Checks an [N, 2] array of finite (lat, lon) degrees with lat in [-90, 90]; returns it as float64."""
    latlon = np.asarray(latlon_deg, dtype=np.float64)
    if latlon.ndim != 2 or latlon.shape[1] != 2 or latlon.shape[0] == 0:
        raise ValueError(f"latlon_deg must have shape [N, 2] (lat, lon in degrees) with N >= 1, "
                         f"got shape {latlon.shape}")
    bad = ~np.isfinite(latlon).all(axis=1)
    if bad.any():
        raise ValueError(f"latlon_deg has {bad.sum()} non-finite rows, first at index {np.flatnonzero(bad)[0]}")
    bad = np.abs(latlon[:, 0]) > 90
    if bad.any():
        i = np.flatnonzero(bad)[0]
        raise ValueError(f"latitude must lie in [-90, 90] degrees; {bad.sum()} rows do not, first at index {i} "
                         f"(lat={latlon[i, 0]}, lon={latlon[i, 1]}); are the columns (lat, lon)?")
    return latlon


def _validate_centroids(centroids) -> np.ndarray:
    """Checks [K, 3] finite non-zero centroids; returns them as float64 unit vectors."""
    c = np.asarray(centroids, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] != 3 or c.shape[0] == 0:
        raise ValueError(f"centroids must have shape [K, 3] (unit xyz vectors), got shape {c.shape}")
    norms = np.linalg.norm(c, axis=1, keepdims=True)
    if not np.isfinite(c).all() or (norms == 0).any():
        raise ValueError("centroids must be finite non-zero xyz vectors")
    return c / norms


def _to_xyz(latlon: np.ndarray) -> np.ndarray:
    """(lat, lon) degrees -> unit vectors [N, 3]: x towards (0, 0), y towards (0, 90E), z the north pole."""
    lat, lon = np.radians(latlon[:, 0]), np.radians(latlon[:, 1])
    return np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], axis=1)


def _nearest(xyz: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each unit vector: index of the most similar centroid (int32) and that cosine similarity."""
    ids = np.empty(len(xyz), dtype=np.int32)
    best = np.empty(len(xyz), dtype=np.float64)
    for start in range(0, len(xyz), _CHUNK):
        sims = xyz[start:start + _CHUNK] @ centroids.T
        ids[start:start + _CHUNK] = np.argmax(sims, axis=1)
        best[start:start + _CHUNK] = np.max(sims, axis=1)
    return ids, best


def _kmeans_pp(xyz: np.ndarray, weights: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding: each next centroid is a point drawn with probability ~ weight * squared chord
    distance (2 - 2 cos) to its nearest centroid so far. Points are distinct, so the k seeds are too."""
    first = rng.choice(len(xyz), p=weights / weights.sum())
    centroids = [xyz[first]]
    best_sim = xyz @ xyz[first]
    for _ in range(1, k):
        score = weights * np.maximum(2.0 - 2.0 * best_sim, 0.0)
        nxt = rng.choice(len(xyz), p=score / score.sum())
        centroids.append(xyz[nxt])
        best_sim = np.maximum(best_sim, xyz @ xyz[nxt])
    return np.stack(centroids)


def _update(xyz: np.ndarray, weights: np.ndarray, ids: np.ndarray, best_sim: np.ndarray,
            k: int) -> np.ndarray:
    """New centroids: normalised weighted mean direction of each cluster. A cluster left empty (or whose
    members cancel out) is re-seeded at the point farthest from its current centroid, each at a new one."""
    sums = np.stack([np.bincount(ids, weights=weights * xyz[:, j], minlength=k) for j in range(3)], axis=1)
    norms = np.linalg.norm(sums, axis=1)
    dead = np.flatnonzero(norms < 1e-12)
    farthest = np.argsort(best_sim, kind="stable")[:len(dead)]
    sums[dead] = xyz[farthest]
    norms[dead] = 1.0
    return sums / norms[:, None]


def fit(latlon_deg, num_clusters: int, seed: int, max_iter: int = 300) -> np.ndarray:
    """Spherical k-means of coordinates: returns unit-vector centroids [num_clusters, 3] (float64).

    Args:
      latlon_deg: [N, 2] (latitude, longitude) in degrees, one row per image (repeats weigh as often as they
        occur).
      num_clusters: K; the paper uses 100.
      seed: seeds the k-means++ initialisation; the same inputs and seed give the same centroids.
      max_iter: Lloyd iterations at most; iteration stops earlier once no assignment changes.

    Raises:
      ValueError: malformed coordinates, or fewer distinct locations than clusters.
    """
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, (int, np.integer)) or num_clusters < 1:
        raise ValueError(f"num_clusters must be a positive int, got {num_clusters!r}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter!r}")
    xyz = _to_xyz(_validate_latlon(latlon_deg))
    places, inverse, counts = np.unique(np.round(xyz, _SAME_PLACE_DECIMALS), axis=0, return_inverse=True,
                                        return_counts=True)
    if len(places) < num_clusters:
        raise ValueError(f"cannot make {num_clusters} clusters from {len(places)} distinct locations "
                         f"({len(xyz)} coordinates); lower num_clusters to at most {len(places)}")
    # Use an exact member of each group of equal places rather than its rounded key.
    xyz = xyz[np.unique(inverse.ravel(), return_index=True)[1]]
    weights = counts.astype(np.float64)

    centroids = _kmeans_pp(xyz, weights, num_clusters, np.random.default_rng(seed))
    ids, best_sim = _nearest(xyz, centroids)
    for _ in range(max_iter):
        centroids = _update(xyz, weights, ids, best_sim, num_clusters)
        new_ids, best_sim = _nearest(xyz, centroids)
        converged = np.array_equal(new_ids, ids)
        ids = new_ids
        if converged:
            break
    return centroids


def assign(latlon_deg, centroids) -> np.ndarray:
    """Cluster id (int32 [N]) of each (lat, lon) row: the centroid of largest cosine similarity, i.e. the
    nearest by great-circle distance."""
    return _nearest(_to_xyz(_validate_latlon(latlon_deg)), _validate_centroids(centroids))[0]


def centroids_latlon(centroids) -> np.ndarray:
    """Centroids [K, 3] -> their (latitude, longitude) in degrees [K, 2], longitude in (-180, 180]."""
    c = _validate_centroids(centroids)
    lat = np.degrees(np.arctan2(c[:, 2], np.hypot(c[:, 0], c[:, 1])))
    lon = np.degrees(np.arctan2(c[:, 1], c[:, 0]))
    return np.stack([lat, lon], axis=1)
