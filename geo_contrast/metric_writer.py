"""Where metrics go: `metrics.jsonl` (one object per logged step) and TensorBoard events, process 0 only."""

import json
import os
import time

import jax
import tensorflow as tf

from geo_contrast import workdir as workdir_lib


class MetricWriter:
    """Appends to `{prefix}metrics.jsonl`; with `resume_step`, first drops the rows of later steps.

    A run killed after its last checkpoint has logged steps that the resumed run computes again; dropping them
    at start-up keeps one row per step, the one of the run that continued.
    """

    def __init__(self, workdir, *, prefix="", resume_step=None):
        self._enabled = jax.process_index() == 0
        self._prefix = prefix
        if self._enabled:
            os.makedirs(workdir, exist_ok=True)
            path = workdir_lib.metrics_path(workdir, prefix)
            if resume_step is not None:
                _drop_rows_after(path, resume_step)
            self._jsonl = open(path, "a", buffering=1)
            self._tb = tf.summary.create_file_writer(
                workdir_lib.tensorboard_dir(workdir, prefix.strip("_") or "train"))

    def write(self, step, metrics):
        if not self._enabled:
            return
        row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        with self._tb.as_default(step=int(step)):
            for name, value in metrics.items():
                tf.summary.scalar(name, float(value))

    def close(self):
        if self._enabled:
            self._jsonl.close()
            self._tb.close()


def _drop_rows_after(path, step):
    """Rewrites the JSON-lines file `path` without its rows of steps > `step`, and without a last line torn by a
    kill mid-write (atomically; no file: no-op)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = [line for line in lines if line.endswith("\n") and _row_step(line) <= step]
    if len(kept) == len(lines):
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def _row_step(line):
    """The row's step; a line torn by a kill counts as later than every step, so it is dropped."""
    try:
        return json.loads(line)["step"]
    except json.JSONDecodeError:
        return float("inf")


class Progress:
    """A progress line: step, loss, pairs/s over the last interval, and the ETA."""

    def __init__(self, total_steps, pairs_per_step, start_step):
        self._total = total_steps
        self._pairs = pairs_per_step
        self._last = (start_step, time.monotonic())

    def line(self, step, loss):
        last_step, last_time = self._last
        now = time.monotonic()
        rate = (step - last_step) / max(now - last_time, 1e-9)
        self._last = (step, now)
        eta = (self._total - step) / rate if rate > 0 else float("inf")
        return f"step {step}/{self._total}  loss {loss:.4f}  {rate * self._pairs:.1f} pairs/s  ETA {_hms(eta)}"


def _hms(seconds):
    if seconds == float("inf"):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"
