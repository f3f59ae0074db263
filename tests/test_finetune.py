"""Fine-tuning through the real command line on the tiny fMoW build, and evaluations from a weights file.

Fine-tuning runs from the random init (Table 1's "supervised, scratch", so no pretraining is needed): a ResNet-18
of width 4 at 16 px, global batch 8 over the 48 training images, so 6 steps an epoch and 18 in all, a checkpoint
every 2 steps. An uninterrupted run is the reference: a killed run and a SIGTERMed one, resumed by the same
command, must repeat its losses and its results. The runs share a persistent XLA compilation cache.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import save_file

from configs import fmow
from geo_contrast import backbones
from geo_contrast import checkpointing
from geo_contrast import linear_eval
from geo_contrast import torchvision_layout
from geo_contrast import train_setup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS_PER_EPOCH, EPOCHS = 6, 3
METRICS = "finetune_random_metrics.jsonl"


def _flags(data_dir, workdir):
    return ["-m", "geo_contrast.main", "--config=configs/fmow.py:sample", f"--workdir={workdir}",
            f"--config.dataset.data_dir={data_dir}", "--config.dataset.generate_sample=False",
            "--config.model.width=4", "--config.stages=finetune", "--config.finetune.init=random",
            "--config.compare_random=False", "--config.finetune.global_batch=8",
            f"--config.finetune.num_epochs={EPOCHS}", "--config.finetune.image_size=16",
            "--config.finetune.resize_size=16", "--config.checkpoint_every_steps=2", "--config.log_every_steps=1"]


def _rows(workdir):
    """(train rows {step: loss}, val rows {step: val_top1}) of the fine-tuning's metrics file."""
    path = os.path.join(workdir, METRICS)
    if not os.path.exists(path):
        return {}, {}
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.endswith("\n")]
    train = {r["step"]: r["loss"] for r in rows if "loss" in r}
    assert len(train) == len([r for r in rows if "loss" in r]), "a step was logged twice"
    return train, {r["step"]: r["val_top1"] for r in rows if "val_top1" in r}


def _entry(workdir):
    with open(os.path.join(workdir, "results.json")) as f:
        return json.load(f)["finetune"]["random"]


def _run(args, env, timeout=600):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def reference(tiny_fmow, env, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("finetune_reference")
    result = _run(_flags(tiny_fmow[0], workdir), env)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def test_selects_the_best_val_epoch_and_scores_test_once(reference):
    train, val = _rows(reference)
    assert sorted(train) == list(range(1, STEPS_PER_EPOCH * EPOCHS + 1))
    assert sorted(val) == [STEPS_PER_EPOCH * e for e in range(1, EPOCHS + 1)]  # One val score per epoch.
    entry = _entry(reference)
    scores = [val[STEPS_PER_EPOCH * e] for e in range(1, EPOCHS + 1)]
    assert entry["selected_epoch"] == 1 + int(np.argmax(scores))  # The earliest best epoch.
    assert entry["splits"]["val"]["top1"] == pytest.approx(max(scores))
    assert set(entry["splits"]) == {"val", "test"} and entry["init"] == "random" and entry["num_epochs"] == EPOCHS
    with open(os.path.join(reference, "results.md")) as f:
        assert "top-1 fine-tuned" in f.read()


def _latest_step(directory):
    """The newest checkpoint step, 0 for none; a listing that races the run's deletion of an old one is retried."""
    try:
        return max(checkpointing.reader(directory).all_steps(), default=0) if os.path.isdir(directory) else 0
    except FileNotFoundError:
        return 0


def _wait_for_checkpoint(workdir, process, step, timeout=300):
    directory = os.path.join(workdir, "finetune_random_checkpoints")
    deadline = time.monotonic() + timeout
    while _latest_step(directory) < step:
        assert process.poll() is None, f"the run ended (status {process.returncode}) before checkpoint {step}"
        assert time.monotonic() < deadline, f"timed out waiting for checkpoint {step}"
        time.sleep(0.05)


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_an_interrupted_run_resumes_to_the_uninterrupted_results(tiny_fmow, env, reference, tmp_path, how):
    """Killed (or preempted) in the middle of the second epoch, the same command resumes from the checkpoint and
    repeats the uninterrupted run's losses, epoch selection and results."""
    args = _flags(tiny_fmow[0], tmp_path)
    with open(tmp_path / "stdout", "w") as out:
        process = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=out,
                                   stderr=subprocess.DEVNULL)
    _wait_for_checkpoint(tmp_path, process, STEPS_PER_EPOCH + 2)
    process.send_signal(getattr(signal, how))
    status = process.wait(timeout=120)
    if how == "SIGTERM":
        assert status == 0 and "Stopped by SIGTERM at step" in (tmp_path / "stdout").read_text()
        results = tmp_path / "results.json"  # Stopped before its last epoch: no results yet.
        assert not results.exists() or "finetune" not in json.loads(results.read_text())
    else:
        assert status == -signal.SIGKILL
    result = _run(args, env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resumed fine-tuning random" in result.stderr
    (train, val), (expected_train, expected_val) = _rows(tmp_path), _rows(reference)
    assert sorted(train) == sorted(expected_train)
    np.testing.assert_array_equal([train[s] for s in sorted(train)], [expected_train[s] for s in sorted(train)])
    assert val == expected_val
    got, expected = _entry(tmp_path), _entry(reference)
    assert got["selected_epoch"] == expected["selected_epoch"]
    for split in ("val", "test"):
        for name in ("top1", "macro_f1", "location_top1"):
            assert got["splits"][split][name] == expected["splits"][split][name]


def test_a_resume_with_another_fine_tuning_config_is_one_error_line(tiny_fmow, env, reference, tmp_path):
    """A changed learning rate is refused before the first step; a changed number of epochs alone would resume."""
    workdir = tmp_path / "workdir"
    shutil.copytree(reference, workdir)
    changed = ["--config.finetune.base_lr=0.1", "--config.finetune.num_epochs=4"]
    result = _run([*_flags(tiny_fmow[0], workdir), *changed], env)
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: Cannot resume from {workdir}/finetune_random_checkpoints/{STEPS_PER_EPOCH * EPOCHS} with another "
        "config: finetune.base_lr=0.2 there, 0.1 now. To resume, pass the checkpoint's values "
        "(--config.finetune.base_lr=0.2); to start a new run with the new ones, use a new --workdir.")
    assert "Traceback" not in result.stderr


def _config(data_dir, **linear_eval):
    c = fmow.get_config("sample")
    c.dataset.data_dir = data_dir
    c.dataset.generate_sample = False
    c.model.width = 4
    c.linear_eval.update(dict(global_batch=16, num_epochs=2, image_size=16, resize_size=16), **linear_eval)
    return c


def test_an_evaluation_starts_from_a_torchvision_weights_file(tiny_fmow, tmp_path):
    """A weights file (as `python -m geo_contrast.convert` writes one) is an init: the backbone holds exactly its
    tensors, and the results entry records the file and its metadata under the file's path."""
    config = _config(tiny_fmow[0])
    other = config.copy_and_resolve_references()
    other.seed = 7  # Weights that differ from the config's own random init.
    state = train_setup.initial_state(other)
    tensors = torchvision_layout.to_torch(state.params["encoder"]["backbone"], state.batch_stats["backbone"],
                                          num_batches_tracked=0)
    path = str(tmp_path / "imported.safetensors")
    save_file(tensors, path, metadata={"source": "imported.pth", "source_format": "torchvision_state_dict"})

    config.linear_eval.init = path
    backbone = backbones.load(config, str(tmp_path), path)
    reloaded = torchvision_layout.to_torch(backbone.variables["params"], backbone.variables["batch_stats"],
                                           num_batches_tracked=0)
    assert reloaded.keys() == tensors.keys()
    for name, value in tensors.items():
        np.testing.assert_array_equal(reloaded[name], value)
    entry = linear_eval.evaluate(config, str(tmp_path))
    assert entry["init_file"] == {"path": path, "source": "imported.pth",
                                  "source_format": "torchvision_state_dict"}
    with open(tmp_path / "results.json") as f:
        assert list(json.load(f)["linear_eval"]) == [path]
