"""configs/geo_imagenet.py: the temporal variants are refused, and its sample pretrains end to end."""

import json
import os
import subprocess
import sys

import pytest

from configs import geo_imagenet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("variant", ["tp", "geo_tp"])
def test_temporal_variants_are_refused_with_the_reason(variant):
    with pytest.raises(ValueError, match="single image per location"):
        geo_imagenet.get_config(f"variant={variant}")


def test_sample_pretrains_a_few_steps_with_the_geo_loss(tmp_path):
    workdir = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "geo_contrast.main", "--config=configs/geo_imagenet.py:sample", f"--workdir={workdir}",
         "--config.stages=pretrain", "--config.model.width=4", "--config.input.image_size=32",
         "--config.optim.num_epochs=1", "--config.log_every_steps=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [row for row in map(json.loads, open(workdir / "metrics.jsonl")) if "loss" in row]  # kNN rows aside.
    assert len(rows) >= 3 and [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    assert all("geo_ce" in r and "info_nce" in r for r in rows)
    assert (workdir / "geo_clusters.npz").exists() and any((workdir / "checkpoints").iterdir())
