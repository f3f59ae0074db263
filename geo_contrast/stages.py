"""Runs the stages a config names (`config.stages`, e.g. "pretrain,linear_eval") in order.

Before any of them: the config is validated and the workdir made, so a bad value or an unusable directory is
reported at once. A pretraining stopped by a signal (preemption) ends the run there: its checkpoint is saved
and the same command resumes it, so the later stages must not start on an unfinished encoder.
With `config.linear_eval.compare_random`, the probe of the random-init encoder (the floor) follows the
pretrained one, so results.md shows the margin. The run's plots (plots.py) are drawn at the end.
"""

import os
import tempfile

import jax
from jax.experimental import multihost_utils

from geo_contrast import config_lib
from geo_contrast import linear_eval
from geo_contrast import plots
from geo_contrast import pretrain
from tfds_builders.fmow import sample as sample_dataset

STAGES = ("pretrain", "linear_eval")


class WorkdirError(OSError):
    pass


def run(config, workdir):
    names = [s.strip() for s in config.stages.split(",") if s.strip()]
    unknown = [s for s in names if s not in STAGES]
    if unknown or not names:
        raise config_lib.ConfigError(f"config.stages={config.stages!r}: unknown stage(s) {unknown}; use a "
                                     f"comma-separated subset of {list(STAGES)}.")
    if "pretrain" in names:
        config_lib.validate_pretrain(config, jax.device_count())
    if "linear_eval" in names:
        linear_eval.validate(config.linear_eval, jax.local_device_count())
    workdir = prepare_workdir(workdir)
    _prepare_sample(config, workdir)
    if "pretrain" in names:
        outcome = pretrain.pretrain(config, workdir)
        if outcome.stopped_by is not None:
            return
    if "linear_eval" in names:
        linear_eval.evaluate(config, workdir)
        if config.linear_eval.compare_random and config.linear_eval.init != "random":
            floor = config.copy_and_resolve_references()
            floor.linear_eval.init = "random"
            linear_eval.evaluate(floor, workdir)
    plots.write_all(workdir, config)


def _prepare_sample(config, workdir):
    """Builds a sample config's dataset once: process 0 builds it while the others wait, then find it built (and
    point their config at it)."""
    first = jax.process_index() == 0
    if first:
        sample_dataset.prepare_if_sample(config, workdir)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("sample dataset prepared")
    if not first:
        sample_dataset.prepare_if_sample(config, workdir)


def prepare_workdir(workdir):
    """The absolute workdir, created if needed; a WorkdirError naming it when it cannot be made or written."""
    workdir = os.path.abspath(workdir)
    try:
        os.makedirs(workdir, exist_ok=True)
        tempfile.TemporaryFile(dir=workdir).close()
    except OSError as e:
        raise WorkdirError(f"Cannot use --workdir={workdir}: {e.strerror or e}. Choose a writable directory "
                           "(with several hosts, one they all see).") from e
    return workdir
