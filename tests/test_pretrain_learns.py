"""End to end on the bundled sample: pretraining leaves metrics, events, clusters and checkpoints, and learns.

Against a random initial queue MoCo's loss starts low and climbs while real keys arrive, so learning is judged
from the peak of the smoothed loss, not from step 0. The run is MoCo-v2+Geo (geo clusters, and views of one image
that InfoNCE learns to match within these 15 epochs); the temporal positives' harder task needs the sample's whole
schedule (the README's sweep).
"""

import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sample_pretraining_lowers_the_loss_from_its_peak(tmp_path):
    workdir = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "geo_contrast.main", "--config=configs/fmow.py:sample,variant=geo", f"--workdir={workdir}",
         "--config.stages=pretrain", "--config.optim.num_epochs=15", "--config.log_every_steps=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [row for row in map(json.loads, open(workdir / "metrics.jsonl")) if "loss" in row]  # kNN rows aside.
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)) and len(rows) >= 200
    loss = np.array([r["loss"] for r in rows])
    smoothed = np.convolve(loss, np.ones(16) / 16, mode="valid")
    assert loss[-32:].mean() < smoothed.max() - 0.15, (smoothed.max(), loss[-32:].mean())
    assert (workdir / "geo_clusters.npz").exists()
    assert any(name.isdigit() for name in os.listdir(workdir / "checkpoints"))
    assert any(files for _, _, files in os.walk(workdir / "tensorboard"))
