"""The benchmark runs and prints its machine-readable JSON line (timings are never asserted)."""

import json
import os
import subprocess
import sys

from configs import fmow
from geo_contrast import benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.model.width=4", "--config.input.image_size=16", "--config.input.global_batch=8",
        "--config.moco.queue_size=64", "--steps=2", "--warmup=1"]


def _run(*args):
    out = subprocess.run([sys.executable, "-m", "geo_contrast.benchmark", "--config=configs/fmow.py:sample", *args],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_step_benchmark_prints_pairs_per_second_and_model_flops():
    result = _run("--what=step", *TINY)
    assert result["what"] == "step" and result["pairs_per_s"] > 0 and result["compile_s"] > 0
    assert result["model"] == "resnet18_w4" and result["image_size"] == 16 and result["batch"] == 8
    assert result["gflop_per_pair"] > 0 and result["device_kind"] == "cpu" and result["mfu"] is None


def test_step_benchmark_feeds_from_the_host_without_donation():
    config = fmow.get_config("sample")
    config.model.width, config.input.image_size, config.input.global_batch, config.moco.queue_size = 4, 16, 8, 64
    result = benchmark.bench_step(config, steps=2, warmup=1, feed="host", donate=False)
    assert result["pairs_per_s"] > 0 and result["feed"] == "host" and not result["donate"]
    assert result["prefetch"] == config.input.prefetch_batches


def test_input_benchmark_reads_a_built_dataset(tiny_fmow, tmp_path):
    result = _run("--what=input", f"--workdir={tmp_path}", f"--config.dataset.data_dir={tiny_fmow[0]}", *TINY)
    assert result["what"] == "input" and result["pairs_per_s"] > 0 and result["batch"] == 8
    assert result["mean_jpeg_kb"] > 0
