r"""Pictures of a run, as PNGs in WORKDIR/plots/ and images in TensorBoard (WORKDIR/tensorboard/plots).

    python -m geo_contrast.plots --workdir=DIR

`write_all` draws whatever the workdir has the inputs for, so it can run after any stage:

* ``training_curves.png`` from metrics.jsonl: total loss, InfoNCE and geo cross-entropy; contrastive and geo
  accuracy; learning rate (the geo series only where the variant logs them);
* ``geo_clusters.png`` from geo_clusters.npz (geo variants): the training locations on lon/lat axes coloured
  by their cluster, the centroids marked, and the clusters' sizes in images as a side histogram;
* ``per_class_<metric>_<init>_<split>.png`` from results.json: every per-class metric of every linear
  evaluation (``per_class_f1``, ...), sorted, one horizontal bar per class so all 62 fMoW names stay readable.

The figures are built from plain arrays by pure functions (`*_figure`), apart from the file and dataset reading,
so they can be drawn from any source and tested on synthetic inputs. matplotlib is used through `Figure`
objects, never pyplot: no global backend or figure state, nothing opens a window on a headless machine.
"""

from __future__ import annotations

import argparse
import os

import jax
import numpy as np
import tensorflow as tf
from absl import logging
from matplotlib import colormaps
from matplotlib.figure import Figure

from geo_contrast import geo_clusters
from geo_contrast import input_pipeline
from geo_contrast import metric_writer
from geo_contrast import records
from geo_contrast import results
from geo_contrast import workdir as workdir_lib

CURVES_PNG = "training_curves.png"
CLUSTERS_PNG = "geo_clusters.png"
PER_CLASS_PREFIX = "per_class_"
_DPI = 100

# Panels of the training curves: (title, metrics.jsonl keys drawn in it). A key the run did not log is left out,
# and a panel with none of its keys is dropped (MoCo-v2 and +TP log no geo metrics).
_CURVE_PANELS = (
    ("loss", ("loss", "info_nce", "geo_ce")),
    ("accuracy", ("contrastive_accuracy", "geo_accuracy")),
    ("kNN top-1 (val)", ("knn_top1",)),
    ("learning rate", ("lr",)),
)
_METRIC_TITLES = {"f1": "F1", "accuracy": "accuracy", "top1": "top-1"}


# ---------------------------------------------------------------------------------------------------------------
# Inputs as arrays


def read_metrics(path: str) -> dict:
    """{metric: (steps, values)} from a metrics.jsonl, steps ascending.

    A resumed run re-logs the steps between its last checkpoint and the interruption, appending them again;
    a metric's last value at a step wins, as it is the one the checkpointed run continued from. Rows of one step
    merge: the kNN monitor writes its reading as a row of its own beside the step's training metrics. Lines that
    are not rows (metric_writer.parse_row) are skipped with a warning: a figure of the valid rows beats no figure.
    """
    rows, skipped = {}, 0
    with open(path, "rb") as f:
        for line in f:
            row = metric_writer.parse_row(line)
            if row is not None:
                rows.setdefault(int(row["step"]), {}).update(row)
            elif line.strip():
                skipped += 1
    if skipped:
        logging.warning("%s: skipped %d line(s) that are not metrics rows.", path, skipped)
    steps = np.array(sorted(rows), np.int64)
    names = sorted({name for row in rows.values() for name in row if name != "step"})
    series = {}
    for name in names:
        present = [s for s in steps if name in rows[s]]
        series[name] = (np.array(present, np.int64), np.array([rows[s][name] for s in present], np.float64))
    return series


def cluster_colours(num_clusters: int) -> np.ndarray:
    """[K, 4] RGBA: tab20's distinct qualitative colours up to 20 clusters; beyond, a cyclic colour map sampled
    evenly and shuffled with a fixed seed, so that clusters with consecutive ids, which are not neighbours on
    the map, get far-apart hues and a cluster's neighbours are unlikely to share one."""
    if num_clusters <= 20:
        return colormaps["tab20"](np.arange(num_clusters))
    hues = colormaps["hsv"](np.linspace(0.0, 1.0, num_clusters, endpoint=False))
    return hues[np.random.default_rng(0).permutation(num_clusters)]


# ---------------------------------------------------------------------------------------------------------------
# Figures (pure: arrays in, Figure out)


def training_curves_figure(series: dict) -> Figure:
    """One panel per group of `_CURVE_PANELS` present in `series` ({metric: (steps, values)}), sharing steps."""
    panels = [(title, [k for k in keys if k in series]) for title, keys in _CURVE_PANELS]
    panels = [(title, keys) for title, keys in panels if keys]
    if not panels:
        raise ValueError(f"training_curves_figure: none of the metrics {[k for _, ks in _CURVE_PANELS for k in ks]} "
                         f"in the series (got {sorted(series)}).")
    fig = Figure(figsize=(10, 3 * len(panels)), dpi=_DPI, layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (title, keys) in zip(axes, panels, strict=True):
        for key in keys:
            steps, values = series[key]
            ax.plot(steps, values, label=key, marker="." if len(steps) < 30 else None)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
    axes[-1].set_xlabel("step")
    return fig


def cluster_map_figure(latlon, centroids, num_images=None) -> Figure:
    """Locations on lon/lat axes coloured by geo cluster, centroids marked, cluster sizes beside.

    Args:
      latlon: [N, 2] (lat, lon) degrees of the training locations (or images).
      centroids: [K, 3] unit vectors, as geo_clusters.fit returns them.
      num_images: [N] images per row of `latlon` (None: one each); the sizes count images, as the clusters
        were fitted on the training images.
    """
    latlon = np.asarray(latlon, np.float64)
    ids = geo_clusters.assign(latlon, centroids)
    centres = geo_clusters.centroids_latlon(centroids)
    num_clusters = len(centres)
    weights = np.ones(len(latlon)) if num_images is None else np.asarray(num_images, np.float64)
    if weights.shape != (len(latlon),):
        raise ValueError(f"cluster_map_figure: num_images has shape {weights.shape}, latlon has {len(latlon)} rows.")
    sizes = np.bincount(ids, weights=weights, minlength=num_clusters)
    colours = cluster_colours(num_clusters)

    fig = Figure(figsize=(16, 6.5), dpi=_DPI, layout="constrained")
    grid = fig.add_gridspec(1, 2, width_ratios=(4, 1))
    world = fig.add_subplot(grid[0])
    world.scatter(latlon[:, 1], latlon[:, 0], c=colours[ids], s=4, linewidths=0, rasterized=True)
    world.scatter(centres[:, 1], centres[:, 0], c=colours, s=70, marker="X", edgecolors="black", linewidths=1.0,
                  zorder=3)
    world.set(xlim=(-180, 180), ylim=(-90, 90), xticks=np.arange(-180, 181, 30), yticks=np.arange(-90, 91, 30),
              xlabel="longitude (degrees)", ylabel="latitude (degrees)", aspect="equal")
    world.grid(alpha=0.3)
    world.set_title(f"{num_clusters} geo clusters (X: centroid) of {int(weights.sum())} training images at "
                    f"{len(latlon)} locations")

    order = np.argsort(-sizes, kind="stable")
    hist = fig.add_subplot(grid[1])
    hist.barh(np.arange(num_clusters), sizes[order], color=colours[order], height=0.9)
    hist.invert_yaxis()
    hist.set(xlabel="training images", ylabel="cluster (largest first)")
    if num_clusters <= 30:
        hist.set_yticks(np.arange(num_clusters), [str(k) for k in order], fontsize=7)
    hist.set_title(f"sizes {int(sizes.min())} to {int(sizes.max())} (median {np.median(sizes):g})")
    return fig


def per_class_figure(values: dict, title: str, metric: str) -> Figure:
    """{class name: value in [0, 1]} as horizontal bars sorted best-first, the mean dashed.

    One bar per class and a height that grows with the class count keep every name on its own line.
    """
    if not values:
        raise ValueError(f"per_class_figure: no classes to draw for {title!r}.")
    names = sorted(values, key=lambda n: (values[n], n))  # Ascending: barh draws bottom-up, best on top.
    scores = np.array([values[n] for n in names], np.float64)
    fig = Figure(figsize=(8, 1.4 + 0.22 * len(names)), dpi=_DPI, layout="constrained")
    ax = fig.add_subplot()
    positions = np.arange(len(names))
    ax.barh(positions, 100 * scores, color=colormaps["viridis"](scores), height=0.8)
    ax.set_yticks(positions, [n.replace("_", " ") for n in names], fontsize=8)
    ax.set_ylim(-0.6, len(names) - 0.4)
    for y, score in zip(positions, scores, strict=True):
        ax.text(100 * score + 0.5, y, f"{100 * score:.1f}", va="center", fontsize=7)
    mean = 100 * scores.mean()
    ax.axvline(mean, color="black", linestyle="--", linewidth=1, label=f"mean {mean:.1f}")
    ax.set(xlim=(0, 105), xlabel=f"{metric} (%)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(title)
    return fig


def sweep_figure(table: dict) -> Figure:
    """A sweep's table (sweep.aggregate): per evaluation, each row's val top-1 as a bar with its sd over seeds as
    an error bar and every seed as a dot; the random init's mean dashed."""
    sections = table["sections"]
    fig = Figure(figsize=(3 + 1.6 * len(table["rows"]), 4 * max(len(sections), 1)), dpi=_DPI, layout="constrained")
    axes = fig.subplots(max(len(sections), 1), 1, squeeze=False)[:, 0]
    for ax, section in zip(axes, sections):
        names, means, sds = [], [], []
        for x, row in enumerate(table["rows"]):
            cell = row["sections"][section]["val"]
            names.append(row["row"])
            means.append(np.nan if cell["top1"]["mean"] is None else cell["top1"]["mean"])
            sds.append(cell["top1"]["sd"] or 0.0)
            seeds = [v for v in cell["per_seed"].values() if v is not None]
            ax.scatter(np.full(len(seeds), x) + np.linspace(-0.15, 0.15, len(seeds)), seeds, s=12, color="black",
                       zorder=3)
            if row["row"] == "random init" and cell["top1"]["mean"] is not None:
                ax.axhline(cell["top1"]["mean"], color="grey", linestyle="--", linewidth=1)
        ax.bar(np.arange(len(names)), means, yerr=sds, capsize=6, color=colormaps["viridis"](0.55), alpha=0.8)
        ax.set_xticks(np.arange(len(names)), names)
        ax.set(ylabel="val top-1 (%)")
        ax.grid(axis="y", alpha=0.3)
        ax.set_title(f"{section}: mean ± sd over seeds {', '.join(map(str, table['seeds']))} (dots: seeds)")
    return fig


# ---------------------------------------------------------------------------------------------------------------
# Files


def save(fig: Figure, path: str) -> str:
    """Writes `fig` as a PNG, replacing `path` atomically; returns the path."""
    tmp = path + ".tmp.png"
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path


def write_per_class(plots_dir: str, all_results: dict) -> list:
    """One PNG per (evaluation stage, init, split, per-class metric) of a results.json's contents:
    per_class_f1_<init>_<split>.png for the linear probe, per_class_f1_finetune_<init>_<split>.png for
    fine-tuning."""
    written = []
    for stage in results.STAGES:
        what = "" if stage == "linear_eval" else "fine-tuned, "
        for key, entry in sorted(all_results.get(stage, {}).items()):
            name = workdir_lib.slug(key) if stage == "linear_eval" else f"finetune_{workdir_lib.slug(key)}"
            for split, report in sorted(entry["splits"].items()):
                for field in sorted(f for f in report if f.startswith(PER_CLASS_PREFIX)):
                    metric = field[len(PER_CLASS_PREFIX):]
                    label = _METRIC_TITLES.get(metric, metric.replace("_", " "))
                    title = (f"{key} ({what}{entry.get('variant') or 'no pretraining'}, {entry['backbone']}): "
                             f"per-class {label} on {split}, {len(report[field])} classes")
                    path = os.path.join(plots_dir, f"{field}_{name}_{split}.png")
                    written.append(save(per_class_figure(report[field], title, label), path))
    return written


def write_cluster_map(plots_dir: str, workdir: str, config) -> str | None:
    """The cluster map of the run's geo_clusters.npz over its training split, or None when there is nothing
    to draw (a variant without geo clusters) or no config says where the dataset is."""
    if not os.path.exists(workdir_lib.clusters_path(workdir)):
        return None
    if config is None:
        try:
            config = workdir_lib.read_run(workdir_lib.checkpoints_dir(workdir)).config
        except workdir_lib.WorkdirError as e:
            logging.info("No geo cluster map: no config given and no checkpoint to take it from (%s).", e)
            return None
    centroids, _ = workdir_lib.read_clusters(workdir)
    builder = records.load_builder(config.dataset.name, config.dataset.data_dir)
    index = records.read_location_index(builder, config.dataset.train_split)
    fig = cluster_map_figure(index.coordinates, centroids, index.num_images)
    return save(fig, os.path.join(plots_dir, CLUSTERS_PNG))


def log_to_tensorboard(workdir: str, paths, step: int) -> None:
    """Each PNG as a TensorBoard image named by its file name, in WORKDIR/tensorboard/plots at `step`."""
    writer = tf.summary.create_file_writer(workdir_lib.tensorboard_dir(workdir, workdir_lib.PLOTS))
    with writer.as_default(step=step):
        for path in paths:
            image = tf.io.decode_png(tf.io.read_file(path), channels=3)
            tf.summary.image(os.path.splitext(os.path.basename(path))[0], image[None])
    writer.close()


def write_all(workdir: str, config=None) -> list:
    """Every plot the workdir has inputs for, in WORKDIR/plots/, also logged to TensorBoard; returns the paths.

    `config` says where the training split is for the cluster map (the stages pass theirs); None takes it from
    the latest checkpoint's metadata. Process 0 alone writes, like the metric writer.
    """
    if jax.process_index() != 0:
        return []
    plots_dir = workdir_lib.plots_dir(workdir)
    os.makedirs(plots_dir, exist_ok=True)
    written = []
    step = 0
    metrics_path = workdir_lib.metrics_path(workdir)
    if os.path.exists(metrics_path):
        series = read_metrics(metrics_path)
        if series:
            written.append(save(training_curves_figure(series), os.path.join(plots_dir, CURVES_PNG)))
            step = int(max(steps[-1] for steps, _ in series.values()))
    written += write_per_class(plots_dir, results.load(workdir))
    cluster_map = write_cluster_map(plots_dir, workdir, config)
    if cluster_map is not None:
        written.append(cluster_map)
    if written:
        log_to_tensorboard(workdir, written, step)
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m geo_contrast.plots", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="The run's workdir; plots go to WORKDIR/plots/.")
    args = parser.parse_args(argv)
    input_pipeline.hide_accelerators_from_tf()
    written = write_all(args.workdir)
    print("\n".join(written) if written else f"Nothing to plot in {args.workdir}.")


if __name__ == "__main__":
    main()
