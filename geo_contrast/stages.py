"""Runs the stages a config names (`config.stages`, e.g. "pretrain,linear_eval") in order.

Before any of them: the whole config is validated once (config_lib.validate) and the workdir made, so a bad
value or an unusable directory is reported at once. A pretraining stopped by a signal (preemption) ends the run
there: its checkpoint is saved and the same command resumes it, so the later stages must not start on an
unfinished encoder. With `config.linear_eval.compare_random`, the probe of the random-init encoder (the floor)
follows the pretrained one, so results.md shows the margin. The run's plots (plots.py) are drawn at the end.

This is the only module that runs the trainer (pretrain.py); every other stage and tool reads what it left in
the workdir through workdir.py.
"""

import jax
from jax.experimental import multihost_utils

from geo_contrast import checkpointing
from geo_contrast import config_lib
from geo_contrast import linear_eval
from geo_contrast import plots
from geo_contrast import pretrain
from geo_contrast import records
from geo_contrast import sample_dataset
from geo_contrast import workdir as workdir_lib

# Problems a user can fix (a bad config value, a dataset that is not built, an unusable workdir or checkpoint, a
# failed checkpoint write, a diverged loss): main.py prints their message on one line and exits 1.
USER_ERRORS = (config_lib.ConfigError, records.DatasetNotFoundError, workdir_lib.WorkdirError,
               checkpointing.CheckpointError, pretrain.NonFiniteLossError)


def run(config, workdir):
    names = config_lib.stage_names(config)
    config_lib.validate(config, num_devices=jax.device_count(), num_local_devices=jax.local_device_count())
    workdir = workdir_lib.prepare(workdir)
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
