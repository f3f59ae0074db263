"""Runs the stages a config names (`config.stages`, e.g. "pretrain,linear_eval") in order."""

import os

from geo_contrast import pretrain
from geo_contrast import sample_dataset

STAGES = ("pretrain", "linear_eval")


def run(config, workdir):
    names = [s.strip() for s in config.stages.split(",") if s.strip()]
    unknown = [s for s in names if s not in STAGES]
    if unknown or not names:
        raise ValueError(f"config.stages={config.stages!r}: unknown stage(s) {unknown}; use a comma-separated "
                         f"subset of {list(STAGES)}.")
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    sample_dataset.prepare_if_sample(config, workdir)
    if "pretrain" in names:
        pretrain.pretrain(config, workdir)
    if "linear_eval" in names:
        from geo_contrast import linear_eval  # Imported on demand: its module lands with the evaluation stage.
        linear_eval.evaluate(config, workdir)
