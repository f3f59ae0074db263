"""Multi-host pretraining on one machine: 2 processes x 2 CPU devices (jax.distributed over 127.0.0.1, gloo
collectives) against 1 process x 4 devices, same seed and config, through the real command line.

The global batches do not depend on the process count (input_pipeline.HostSlice), so the two runs must log the
same losses at every step and write the same checkpoints; only process 0 may write metrics. A SIGTERM to one
process of the pair must stop both after the same step, with one checkpoint and exit status 0.

Tolerances: the cross-process sums (gloo) add the devices' gradients in another order than the in-process ones,
so the states differ by float rounding (~1e-7 relative after one step), and the tiny ResNet amplifies that
rounding step by step: its BatchNorm normalises 4 images per device at 1x1 spatial size in the last stage. At
32 px and 4 images per device the logged losses of the first epoch (3 steps) agree within 2e-4 and the states
after 2 steps within 3e-4 of each leaf's scale, but ~100x more each step (a few % after step 3, in the optimizer's
momentum of BN biases); at 16 px or 2 images per device the runs decorrelate within a few steps, whatever the code
does. So losses are compared over the first epoch and states after 1 step (summation order only) and 2 steps.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from geo_contrast import checkpointing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPARED = 3  # Steps compared: one epoch of 48 images at global batch 16.
TOTAL = 12  # Four epochs: room for the SIGTERM to land mid-run.


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(data_dir, workdir, devices, log, *extra):
    flags = ["--config=configs/fmow.py:sample", f"--workdir={workdir}", f"--config.dataset.data_dir={data_dir}",
             "--config.dataset.generate_sample=False", "--config.model.width=4", "--config.input.image_size=32",
             "--config.input.global_batch=16", "--config.moco.queue_size=32", "--config.moco.bn_groups=1",
             "--config.optim.num_epochs=4", "--config.checkpoint_every_steps=1", "--config.keep_checkpoints=20",
             "--config.log_every_steps=1", "--config.stages=pretrain", *extra]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "geo_contrast.main", *flags], cwd=ROOT, env=env, stdout=f,
                                stderr=subprocess.STDOUT)


def _rows(workdir):
    """The training rows of metrics.jsonl (the kNN monitor's aside), asserting one row per step (a single
    writer) from step 1 on."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [row for line in f if line.endswith("\n") and "loss" in (row := json.loads(line))]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    return rows


def _checkpoints(workdir):
    """{step: state as nested dicts of numpy arrays} of every checkpoint in the workdir."""
    reader = checkpointing.reader(os.path.join(workdir, "checkpoints"))
    return {step: reader.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
            for step in reader.all_steps()}


def _assert_close(a, b, rtol):
    """Every float leaf of b within rtol of a, relative to the leaf's largest magnitude (floor 1e-2: leaves that
    start at zero); integer leaves (step, queue pointer, RNG key) exactly equal."""
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(a)[0]]
    for path, x, y in zip(paths, jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        if np.issubdtype(x.dtype, np.integer):
            np.testing.assert_array_equal(y, x, err_msg=path)
        else:
            scale = np.abs(x).max() + 1e-2
            assert np.abs(y - x).max() <= rtol * scale, (path, np.abs(y - x).max() / scale)


def test_two_processes_of_two_devices_train_like_one_process_of_four(tiny_fmow, tmp_path):
    data_dir = tiny_fmow[0]
    address = f"127.0.0.1:{_free_port()}"
    single_dir, pair_dir = tmp_path / "single", tmp_path / "pair"
    logs = [tmp_path / name for name in ("single.log", "process0.log", "process1.log")]
    processes = [_start(data_dir, single_dir, 4, logs[0])] + [
        _start(data_dir, pair_dir, 2, logs[1 + i], f"--coordinator_address={address}", "--num_processes=2",
               f"--process_id={i}") for i in range(2)]
    try:
        deadline = time.monotonic() + 480
        while len(_rows(pair_dir)) < COMPARED:  # The pair has logged the compared steps: stop process 1 only.
            assert all(p.poll() is None for p in processes[1:]), logs[1].read_text()[-4000:]
            assert time.monotonic() < deadline, "timed out waiting for the pair's first epoch"
            time.sleep(0.05)
        processes[2].send_signal(signal.SIGTERM)
        for process in processes:
            process.wait(timeout=480)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    outputs = [log.read_text() for log in logs]
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-4000:]
    assert "on 4 devices of 2 processes" in outputs[1] and "on 4 devices of 1 processes" in outputs[0]
    assert "step 1/" in outputs[1] and "step 1/" not in outputs[2]  # Process 0 alone reports progress.

    # Both processes stopped after the same step, which is the pair's last checkpoint and metrics row.
    stops = [re.search(r"Stopped by (.+) at step (\d+);", output) for output in outputs[1:]]
    assert stops[0] and stops[1], outputs[1][-2000:] + outputs[2][-2000:]
    assert stops[0].group(1) == "a signal to another process" and stops[1].group(1) == "SIGTERM"
    stopped = int(stops[0].group(2))
    assert int(stops[1].group(2)) == stopped and COMPARED < stopped < TOTAL
    pair_checkpoints, single_checkpoints = _checkpoints(pair_dir), _checkpoints(single_dir)
    assert max(pair_checkpoints) == stopped == len(_rows(pair_dir))
    assert sorted(single_checkpoints) == list(range(1, TOTAL + 1))

    single, pair = _rows(single_dir)[:COMPARED], _rows(pair_dir)[:COMPARED]
    for name in ("loss", "info_nce", "geo_ce", "contrastive_accuracy", "geo_accuracy", "lr"):
        np.testing.assert_allclose([r[name] for r in pair], [r[name] for r in single], rtol=2e-4, atol=1e-6,
                                   err_msg=name)
    # One step: the same computation up to summation order. Two: rounding amplified, but the same training.
    _assert_close(single_checkpoints[1], pair_checkpoints[1], rtol=1e-6)
    _assert_close(single_checkpoints[2], pair_checkpoints[2], rtol=1e-3)
    assert int(pair_checkpoints[COMPARED]["queue_ptr"]) == COMPARED * 16 % 32
