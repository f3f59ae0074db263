"""Where metrics go: `metrics.jsonl` (one object per logged step) and TensorBoard events, process 0 only."""

import json
import math
import os
import time

import jax
import tensorflow as tf
from absl import logging

from geo_contrast import workdir as workdir_lib


class MetricWriter:
    """Appends to `{prefix}metrics.jsonl`; with `resume_step`, first drops the rows of later steps (and moves
    lines that are not rows to `{prefix}metrics.jsonl.bad`).

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


def parse_row(line):
    """The metrics row on `line` (bytes or str): a JSON object of numbers with a finite numeric "step"; else None.

    The one definition of a row, for the writer and the readers (plots.py): a line that is not one (non-UTF-8
    bytes from a disk error, a JSON list or a row without a step from a hand edit or another tool) is skipped by
    them instead of stopping a resume or a plot.
    """
    try:
        row = json.loads(line.decode("utf-8") if isinstance(line, bytes) else line)
    except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors.
        return None
    if not isinstance(row, dict) or not all(_is_number(v) for v in row.values()):
        return None
    return row if _is_number(row.get("step")) and math.isfinite(row["step"]) else None


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _drop_rows_after(path, step):
    """Rewrites the metrics file `path` with only its rows of steps <= `step` (atomically; no file: no-op).

    Rows of later steps were logged by a killed run after its last checkpoint and are computed again; a last line
    without its newline was torn by the kill mid-write. Any other line that is not a row (`parse_row`) is appended,
    byte for byte, to `path`.bad with a warning: kept for inspection, out of the way of the resumed run.
    """
    if not os.path.exists(path):
        return
    with open(path, "rb") as f:
        *lines, torn = f.read().split(b"\n")
    kept, bad = [], []
    for line in lines:
        row = parse_row(line)
        if row is None and line.strip():
            bad.append(line)
        elif row is not None and row["step"] <= step:
            kept.append(line)
    if bad:
        with open(path + ".bad", "ab") as f:
            f.writelines(line + b"\n" for line in bad)
        logging.warning("%s: %d line(s) that are not metrics rows moved to %s.bad.", path, len(bad), path)
    if len(kept) == len(lines) and not torn:
        return
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.writelines(line + b"\n" for line in kept)
    os.replace(tmp, path)


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
