"""Runs the stages a config names (`config.stages`, e.g. "pretrain,linear_eval,finetune") in order.

Before any of them: the whole config is validated once (config_lib.validate) and the workdir made, so a bad
value or an unusable directory is reported at once. A training stage stopped by a signal (preemption) ends the
run there: its checkpoint is saved and the same command resumes it, so the later stages must not start on an
unfinished model. With `config.compare_random`, each evaluation stage also evaluates the random-init encoder (the
probe's floor; fine-tuning from it is Table 1's "supervised, scratch"), so results.md shows every margin over it.
The run's plots (plots.py) are drawn at the end.

This is the only module that runs the trainers (pretrain.py, finetune.py); every other stage and tool reads
what they left in the workdir through workdir.py.
"""

import jax
from jax.experimental import multihost_utils

from geo_contrast import checkpointing
from geo_contrast import config_lib
from geo_contrast import finetune
from geo_contrast import linear_eval
from geo_contrast import plots
from geo_contrast import pretrain
from geo_contrast import records
from geo_contrast import sample_dataset
from geo_contrast import train_loop
from geo_contrast import workdir as workdir_lib

# Problems a user can fix (a bad config value, a dataset that is not built, an unusable workdir or checkpoint, a
# failed checkpoint write, a diverged loss): main.py prints their message on one line and exits 1.
USER_ERRORS = (config_lib.ConfigError, records.DatasetNotFoundError, workdir_lib.WorkdirError,
               checkpointing.CheckpointError, train_loop.NonFiniteLossError)


def run(config, workdir):
    names = config_lib.stage_names(config)
    config_lib.validate(config, num_devices=jax.device_count(), num_local_devices=jax.local_device_count())
    workdir = workdir_lib.prepare(workdir)
    _prepare_sample(config, workdir)
    if "pretrain" in names and pretrain.pretrain(config, workdir).stopped_by is not None:
        return
    if "linear_eval" in names:
        for init in _inits(config, config.linear_eval.init):
            linear_eval.evaluate(_with_init(config, "linear_eval", init), workdir)
    if "finetune" in names:
        for init in _inits(config, config.finetune.init):
            if finetune.finetune(_with_init(config, "finetune", init), workdir).stopped_by is not None:
                return
    plots.write_all(workdir, config)


def _inits(config, init):
    """The inits an evaluation stage runs: its own, then the random floor when compare_random asks for it."""
    return [init, "random"] if config.compare_random and init != "random" else [init]


def _with_init(config, stage, init):
    if config[stage].init == init:
        return config
    other = config.copy_and_resolve_references()
    other[stage].init = init
    return other


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
