"""Plots: the files are written, are real PNGs of the intended size, and skip what the run has no data for.

Inputs are small hand-made files (metrics.jsonl, results.json, cluster centroids); the cluster map through
write_all reads the session's tiny built fMoW. Pixel contents are not checked.
"""

import json
import os

import numpy as np
import pytest
from PIL import Image

from configs import fmow
from geo_contrast import geo_clusters
from geo_contrast import plots
from geo_contrast import results
from geo_contrast import workdir as workdir_lib

DPI = 100  # Figures are drawn at 100 dpi: pixel sizes are figure inches x 100.


def png_size(path):
    """(width, height) of a PNG, after checking it is a real, non-trivial one."""
    assert os.path.getsize(path) > 10_000, f"{path} is suspiciously small"
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def write_metrics(workdir, geo, steps=range(10, 110, 10)):
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        for step in steps:
            row = {"step": step, "loss": 9 - step / 50, "info_nce": 7 - step / 60, "contrastive_accuracy": step / 200,
                   "lr": 0.03 * (1 - step / 200)}
            if geo:
                row.update(geo_ce=2 - step / 100, geo_accuracy=step / 300)
            f.write(json.dumps(row) + "\n")


def report(names, seed):
    values = np.random.default_rng(seed).uniform(0, 1, len(names))
    return {"top1": 0.5, "top5": 0.8, "macro_f1": 0.4, "location_top1": 0.6, "location_macro_f1": 0.5,
            "per_class_f1": dict(zip(names, values.tolist(), strict=True))}


def test_read_metrics_keeps_the_last_row_of_a_re_logged_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 10, "loss": 5.0, "lr": 0.1}, {"step": 20, "loss": 4.0, "lr": 0.1},
            {"step": 20, "loss": 3.5, "lr": 0.1, "geo_ce": 1.0},  # Resumed from step 10: step 20 logged again.
            {"step": 30, "loss": 3.0, "lr": 0.05}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    series = plots.read_metrics(str(path))
    np.testing.assert_array_equal(series["loss"][0], [10, 20, 30])
    np.testing.assert_array_equal(series["loss"][1], [5.0, 3.5, 3.0])
    np.testing.assert_array_equal(series["geo_ce"][0], [20])


def test_read_metrics_skips_lines_that_are_not_rows(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1, "loss": 2}\n{"loss": 1}\n\xff\xfe\n[1, 2]\n{"step": 2, "loss": 1}\n')
    series = plots.read_metrics(str(path))
    assert {name: (list(steps), list(values)) for name, (steps, values) in series.items()} == {
        "loss": ([1, 2], [2.0, 1.0])}
    assert "metrics.jsonl: skipped 3 line(s) that are not metrics rows." in caplog.text


def test_write_all_draws_curves_and_per_class_accuracy(tmp_path):
    workdir = str(tmp_path)
    write_metrics(workdir, geo=True)
    names = [f"class_{i:02d}_name" for i in range(62)]
    entry = {"variant": "geo_tp", "backbone": "ResNet-50", "selected_epoch": 3, "num_epochs": 5,
             "splits": {"val": report(names, 0), "test": report(names[:5], 1)}}
    results.update(workdir, "pretrained", entry)
    written = plots.write_all(workdir)

    plots_dir = os.path.join(workdir, "plots")
    assert sorted(os.path.basename(p) for p in written) == [
        "per_class_f1_pretrained_test.png", "per_class_f1_pretrained_val.png", "training_curves.png"]
    assert png_size(os.path.join(plots_dir, "training_curves.png")) == (10 * DPI, 3 * 3 * DPI)  # Three panels.
    width62, height62 = png_size(os.path.join(plots_dir, "per_class_f1_pretrained_val.png"))
    width5, height5 = png_size(os.path.join(plots_dir, "per_class_f1_pretrained_test.png"))
    assert width62 == width5 == 8 * DPI
    assert height62 - height5 == pytest.approx(57 * 0.22 * DPI, abs=1)  # One row per class.
    assert not os.path.exists(os.path.join(plots_dir, "geo_clusters.png"))  # No clusters in this workdir.
    events = os.listdir(os.path.join(workdir, "tensorboard", "plots"))
    assert events and all(os.path.getsize(os.path.join(workdir, "tensorboard", "plots", e)) > 10_000
                          for e in events)


def test_curves_of_a_variant_without_geo_metrics(tmp_path):
    write_metrics(str(tmp_path), geo=False)
    assert [os.path.basename(p) for p in plots.write_all(str(tmp_path))] == ["training_curves.png"]
    fig = plots.training_curves_figure(plots.read_metrics(str(tmp_path / "metrics.jsonl")))
    legends = [[t.get_text() for t in ax.get_legend().get_texts()] for ax in fig.axes]
    assert legends == [["loss", "info_nce"], ["contrastive_accuracy"], ["lr"]]
    assert len(plots.training_curves_figure({"lr": (np.arange(3), np.ones(3))}).axes) == 1
    with pytest.raises(ValueError, match="none of the metrics"):
        plots.training_curves_figure({"other": (np.arange(3), np.ones(3))})


def test_cluster_map_from_coordinates(tmp_path):
    rng = np.random.default_rng(0)
    latlon = np.stack([rng.uniform(-60, 70, 400), rng.uniform(-180, 180, 400)], axis=1)
    centroids = geo_clusters.fit(latlon, 12, seed=0)
    path = plots.save(plots.cluster_map_figure(latlon, centroids, rng.integers(1, 5, 400)),
                      str(tmp_path / "map.png"))
    assert png_size(path) == (16 * DPI, int(6.5 * DPI))
    with pytest.raises(ValueError, match="num_images has shape"):
        plots.cluster_map_figure(latlon, centroids, np.ones(3))


def test_write_all_draws_the_clusters_of_the_built_training_split(tiny_fmow, tmp_path):
    data_dir, _ = tiny_fmow
    config = fmow.get_config("sample")
    config.dataset.data_dir = data_dir
    centroids = geo_clusters.fit(np.array([[0.0, 0.0], [40.0, 100.0], [-30.0, -60.0]]), 3, seed=0)
    np.savez(workdir_lib.clusters_path(str(tmp_path)), centroids=centroids,
             centroids_latlon=geo_clusters.centroids_latlon(centroids))
    written = plots.write_all(str(tmp_path), config)
    assert [os.path.basename(p) for p in written] == ["geo_clusters.png"]
    assert png_size(written[0]) == (16 * DPI, int(6.5 * DPI))
    # Without a config and without a checkpoint to read one from, the map is skipped, not an error.
    os.remove(written[0])
    assert plots.write_all(str(tmp_path)) == []
