"""Spherical k-means of coordinates, checked with geometry computed here independently (haversine, numpy)."""

import numpy as np
import pytest

from geo_contrast import geo_clusters


def _haversine_deg(a, b):
    """Great-circle angle in degrees between every row of a [N, 2] and of b [M, 2] (lat, lon degrees)."""
    lat1, lon1 = np.radians(a[:, None, 0]), np.radians(a[:, None, 1])
    lat2, lon2 = np.radians(b[None, :, 0]), np.radians(b[None, :, 1])
    h = np.sin((lat2 - lat1) / 2) ** 2 + np.cos(lat1) * np.cos(lat2) * np.sin((lon2 - lon1) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(np.clip(h, 0, 1))))


def _cluster_around(rng, lat, lon, n, spread_deg):
    """n points within about spread_deg of (lat, lon): Gaussian steps in local east/north degrees."""
    north = rng.normal(scale=spread_deg, size=n)
    east = rng.normal(scale=spread_deg, size=n)
    lats = lat + north
    lons = lon + east / np.cos(np.radians(lat))
    lons = (lons + 180.0) % 360.0 - 180.0  # wrap into [-180, 180) as real data would be
    return np.stack([lats, lons], axis=1)


def _purity(found_ids, true_ids):
    """1.0 iff found clusters and true clusters are the same partition up to renaming."""
    pairs = set(zip(found_ids.tolist(), true_ids.tolist()))
    return float(len(pairs) == len(set(found_ids.tolist())) == len(set(true_ids.tolist())))


CENTRES = np.array([[48.8, 2.3], [-33.9, 151.2], [40.7, -74.0], [-1.3, 36.8], [35.7, 139.7], [64.1, -21.9]])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recovers_planted_clusters(seed):
    rng = np.random.default_rng(100 + seed)
    points = np.concatenate([_cluster_around(rng, lat, lon, 150, 1.0) for lat, lon in CENTRES])
    true_ids = np.repeat(np.arange(len(CENTRES)), 150)
    centroids = geo_clusters.fit(points, len(CENTRES), seed=seed)
    assert centroids.shape == (len(CENTRES), 3)
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, rtol=1e-12)
    angles = _haversine_deg(geo_clusters.centroids_latlon(centroids), CENTRES)
    assert np.all(angles.min(axis=1) < 0.5)  # each found centroid sits on a true centre ...
    assert len(set(angles.argmin(axis=1))) == len(CENTRES)  # ... a different one each
    assert _purity(geo_clusters.assign(points, centroids), true_ids) == 1.0


def test_cluster_across_antimeridian_stays_whole():
    rng = np.random.default_rng(7)
    fiji = _cluster_around(rng, -17.0, 180.0, 200, 1.5)
    others = [_cluster_around(rng, lat, lon, 200, 1.5) for lat, lon in [(-17.0, 120.0), (-17.0, -120.0)]]
    points = np.concatenate([fiji, *others])
    # The test's premise: in raw degrees this cluster spans almost the whole longitude range.
    assert fiji[:, 1].min() < -175 and fiji[:, 1].max() > 175
    centroids = geo_clusters.fit(points, 3, seed=0)
    ids = geo_clusters.assign(points, centroids)
    assert len(set(ids[:200])) == 1
    assert _purity(ids, np.repeat(np.arange(3), 200)) == 1.0
    lat, lon = geo_clusters.centroids_latlon(centroids)[ids[0]]
    assert _haversine_deg(np.array([[lat, lon]]), np.array([[-17.0, 180.0]]))[0, 0] < 0.5


def test_deterministic_for_a_seed():
    points = np.random.default_rng(8).uniform([-60, -180], [60, 180], size=(500, 2))
    first = geo_clusters.fit(points, 10, seed=3)
    np.testing.assert_array_equal(first, geo_clusters.fit(points, 10, seed=3))
    # Unstructured data has many local optima, so the seed matters: another seed lands elsewhere.
    assert not np.allclose(first, geo_clusters.fit(points, 10, seed=4))


def test_fewer_distinct_locations_than_clusters():
    # Four rows of coordinates, three places: lon 180 and -180 are the same meridian.
    places = np.array([[10.0, 20.0], [-5.0, 180.0], [-5.0, -180.0], [45.0, -90.0]])
    points = np.repeat(places, 10, axis=0)
    with pytest.raises(ValueError, match=r"4 clusters from 3 distinct locations.*at most 3"):
        geo_clusters.fit(points, 4, seed=0)
    centroids = geo_clusters.fit(points, 3, seed=0)
    assert _purity(geo_clusters.assign(points, centroids), np.repeat([0, 1, 1, 2], 10)) == 1.0


def test_update_reseeds_empty_and_cancelled_clusters_at_farthest_points():
    """Lloyd iterations from k-means++ seeds rarely empty a cluster, so the private update step is driven
    directly: cluster 0 holds two antipodal points (their mean direction is undefined), 2 and 3 are empty."""
    xyz = np.array([[1.0, 0, 0], [-1.0, 0, 0], [0, 1.0, 0], [0, np.cos(0.2), np.sin(0.2)]])
    ids = np.array([0, 0, 1, 1])
    best_sim = np.array([0.1, 0.2, 0.9, 0.95])  # similarity of each point to its current centroid
    centroids = geo_clusters._update(xyz, np.ones(4), ids, best_sim, 4)
    mean_direction = (xyz[2] + xyz[3]) / np.linalg.norm(xyz[2] + xyz[3])
    np.testing.assert_allclose(centroids[1], mean_direction, atol=1e-12)
    # The three dead clusters take the three least similar points, one each.
    np.testing.assert_allclose(centroids[[0, 2, 3]], xyz[[0, 1, 2]], atol=1e-12)


def test_more_clusters_than_natural_groups_leaves_none_empty():
    """Two tight groups, five clusters: every cluster must still own a point (empty ones are re-seeded)."""
    rng = np.random.default_rng(9)
    points = np.concatenate([_cluster_around(rng, 0.0, 0.0, 50, 0.5), _cluster_around(rng, 50.0, 90.0, 50, 0.5)])
    for seed in range(3):
        centroids = geo_clusters.fit(points, 5, seed=seed)
        assert len(set(geo_clusters.assign(points, centroids).tolist())) == 5


def test_assign_is_nearest_by_great_circle_distance():
    rng = np.random.default_rng(10)
    points = np.stack([np.degrees(np.arcsin(rng.uniform(-1, 1, 2000))), rng.uniform(-180, 180, 2000)], axis=1)
    centres = np.stack([np.degrees(np.arcsin(rng.uniform(-1, 1, 30))), rng.uniform(-180, 180, 30)], axis=1)
    lat, lon = np.radians(centres[:, 0]), np.radians(centres[:, 1])
    centroids = np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], axis=1)
    ids = geo_clusters.assign(points, centroids)
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(ids, _haversine_deg(points, centres).argmin(axis=1))
    # centroids_latlon inverts the same convention.
    back = geo_clusters.centroids_latlon(centroids)
    np.testing.assert_allclose(back[:, 0], centres[:, 0], atol=1e-9)
    np.testing.assert_allclose(_haversine_deg(back, centres).diagonal(), 0.0, atol=1e-6)


@pytest.mark.parametrize("bad,message", [
    (np.zeros((5, 3)), r"shape \[N, 2\]"),
    (np.zeros((0, 2)), r"shape \[N, 2\]"),
    (np.array([[0.0, 0.0], [np.nan, 1.0]]), "non-finite rows, first at index 1"),
    (np.array([[0.0, 0.0], [95.0, 10.0]]), r"latitude must lie in \[-90, 90\].*index 1"),
])
def test_rejects_bad_coordinates(bad, message):
    with pytest.raises(ValueError, match=message):
        geo_clusters.fit(bad, 1, seed=0)
    with pytest.raises(ValueError, match=message):
        geo_clusters.assign(bad, np.eye(3))


def test_rejects_bad_arguments():
    points = np.array([[0.0, 0.0], [10.0, 10.0]])
    with pytest.raises(ValueError, match="num_clusters must be a positive int"):
        geo_clusters.fit(points, 0, seed=0)
    with pytest.raises(ValueError, match=r"centroids must have shape \[K, 3\]"):
        geo_clusters.assign(points, np.zeros((4, 2)))
    with pytest.raises(ValueError, match="non-zero"):
        geo_clusters.assign(points, np.zeros((4, 3)))
