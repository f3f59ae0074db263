"""A run's workdir: where each stage writes, and how every stage and tool reads what a run recorded there.

The one owner of the layout, so the trainer, the evaluation stages, export and the plots agree on it without
importing each other (and, for export and the converter, without importing TensorFlow):

    WORKDIR/checkpoints/<step>/       orbax checkpoints: the whole state, and the run's metadata (its config)
    WORKDIR/geo_clusters.npz          the k-means centroids of the geo variants (fitted once, reused)
    WORKDIR/metrics.jsonl             pretraining's per-step metrics; <stage>_<init>_metrics.jsonl for the others
    WORKDIR/tensorboard/<name>/       TensorBoard events
    WORKDIR/results.json, results.md  the evaluations' results (results.py writes them)
    WORKDIR/plots/                    the run's figures (plots.py)
    WORKDIR/data/, WORKDIR/sample_*/  a sample config's generated and built dataset

Errors a user can cause here (an unusable directory, a workdir without checkpoints, a checkpoint that no
geo_contrast run wrote, one that is damaged) are `WorkdirError`s whose message says what to do.

Orbax (and with it JAX) is imported only by the functions that read checkpoints, so the layout, and with it
results.load, imports without JAX: the report command gathers results.json files on any machine in a second.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
from typing import Any

import ml_collections
import numpy as np

CHECKPOINTS = "checkpoints"
CLUSTERS = "geo_clusters.npz"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
PLOTS = "plots"
SAMPLE_DATA = "data"


class WorkdirError(OSError):
    """A workdir or checkpoint the user pointed at cannot be used; the message names it and the way out."""


def prepare(workdir):
    """The absolute workdir, created if needed; a WorkdirError naming it when it cannot be made or written."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    try:
        os.makedirs(workdir, exist_ok=True)
        tempfile.TemporaryFile(dir=workdir).close()
    except OSError as e:
        raise WorkdirError(f"Cannot use --workdir={workdir}: {e.strerror or e}. Choose a writable directory "
                           "(with several hosts, one they all see).") from e
    return workdir


def slug(key):
    """A file-name-safe form of a results key ("pretrained", "random", a checkpoint path or a weights file)."""
    return re.sub(r"[^0-9A-Za-z]+", "_", key).strip("_")


def stage_prefix(stage, key):
    """The prefix of an evaluation stage's files for one init: `linear_eval_random_`, `finetune_pretrained_`."""
    return f"{stage}_{slug(key)}_"


def checkpoints_dir(workdir):
    return os.path.join(workdir, CHECKPOINTS)


def clusters_path(workdir):
    return os.path.join(workdir, CLUSTERS)


def metrics_path(workdir, prefix=""):
    """`{prefix}metrics.jsonl`: prefix "" for pretraining, e.g. "linear_eval_random_" for a probe."""
    return os.path.join(workdir, f"{prefix}{METRICS}")


def tensorboard_dir(workdir, name):
    return os.path.join(workdir, TENSORBOARD, name)


def results_paths(workdir):
    """(results.json, results.md) of the workdir."""
    return os.path.join(workdir, RESULTS_JSON), os.path.join(workdir, RESULTS_MD)


def plots_dir(workdir):
    return os.path.join(workdir, PLOTS)


def sample_manual_dir(workdir, dataset):
    return os.path.join(workdir, f"sample_{dataset}")


def write_clusters(workdir, centroids, centroids_latlon):
    """Writes the geo clusters atomically (a reader never sees half a file)."""
    path = clusters_path(workdir)
    tmp = path + ".tmp.npz"
    np.savez(tmp, centroids=centroids, centroids_latlon=centroids_latlon)
    os.replace(tmp, path)


def read_clusters(workdir):
    """(centroids [K, 3] unit vectors, centroids as (lat, lon) degrees) of a geo run; WorkdirError without them."""
    path = clusters_path(workdir)
    if not os.path.exists(path):
        raise WorkdirError(f"{path} is missing: the geo variants write their clusters there when pretraining "
                           "starts. Pretrain first (or restore the file).")
    with np.load(path) as f:
        return f["centroids"], f["centroids_latlon"]


@dataclasses.dataclass(frozen=True)
class RecordedRun:
    """A pretraining checkpoint: its step, the metadata the run saved beside it, and (if read) its state."""

    directory: str
    step: int
    meta: dict  # variant, config, total_steps, steps_per_epoch, train_images.
    state: Any  # The TrainState's fields as nested dicts of numpy arrays, or None (metadata only).

    @property
    def config(self):
        """The pretraining config the run recorded (the architecture a checkpoint must be rebuilt with)."""
        return ml_collections.ConfigDict(self.meta["config"])

    @property
    def path(self):
        return os.path.join(self.directory, str(self.step))


def latest_step(directory):
    """The newest finished checkpoint step in `directory`, or None (a missing directory has none)."""
    from geo_contrast import checkpointing  # JAX: see the module docstring.

    if not os.path.isdir(directory):
        return None
    return checkpointing.reader(directory).latest_step()


def find_checkpoint(path):
    """(checkpoints directory, step) of `path`: a step directory (`.../checkpoints/640`), a checkpoints directory
    (its latest step) or a workdir (its checkpoints/' latest step); WorkdirError when none is there."""
    from geo_contrast import checkpointing  # JAX: see the module docstring.

    path = os.path.abspath(os.path.expanduser(path)).rstrip(os.sep)
    if not os.path.isdir(path):
        raise WorkdirError(f"{path} is not a directory: expected a workdir, its checkpoints/ or one checkpoint "
                           "step directory.")
    parent, name = os.path.split(path)
    if name.isdigit() and int(name) in checkpointing.reader(parent).all_steps():
        return parent, int(name)
    for directory in (path, checkpoints_dir(path)):
        step = latest_step(directory)
        if step is not None:
            return directory, step
    raise WorkdirError(f"{path} holds no finished pretraining checkpoint (neither a checkpoint step directory, "
                       "nor a directory of them, nor a workdir with checkpoints/). Run the pretrain stage first.")


def read_run(directory, step=None, *, with_state=False, like=None):
    """The checkpoint `step` (default: the latest) of the checkpoints `directory`, with its metadata.

    The state is not read (`with_state=False`: metadata only, cheap), read without a template (any variant and
    architecture reads without rebuilding the model), or read into the shapes of the pytree `like` (the model's
    own TrainState, so the result has its structure and dtypes).
    """
    import orbax.checkpoint as ocp  # JAX: see the module docstring.

    from geo_contrast import checkpointing

    steps = checkpointing.reader(directory).all_steps() if os.path.isdir(directory) else []
    if not steps:
        raise WorkdirError(f"{directory} holds no finished pretraining checkpoint. Run the pretrain stage first "
                           "(config.stages=pretrain,...), or point at another run's workdir.")
    step = max(steps) if step is None else step
    if step not in steps:
        raise WorkdirError(f"{directory} has no checkpoint of step {step}; it has steps {sorted(steps)}.")
    reader = checkpointing.reader(directory)
    checkpointing.quiet_closed_loop_reports()
    try:
        if like is not None:
            state, meta = checkpointing.restore(reader, step, like)
        else:
            items = {"meta": ocp.args.JsonRestore()}
            if with_state:
                items["state"] = ocp.args.StandardRestore()
            restored = reader.restore(step, args=ocp.args.Composite(**items))
            state, meta = restored.get("state"), restored["meta"]
    except checkpointing.UNREADABLE as e:
        raise WorkdirError(f"Checkpoint {directory}/{step} cannot be read ({checkpointing.gist(e)}): it is "
                           "damaged. Point at another step; resuming its training falls back to the newest one "
                           "that restores.") from e
    if "config" not in (meta or {}):
        raise WorkdirError(f"Checkpoint {directory}/{step} has no pretraining config in its metadata: it was not "
                           "written by geo_contrast's pretraining.")
    return RecordedRun(directory, step, meta, state)
