"""Faults, through the real command line: a kill during a checkpoint save, SIGTERM, a second SIGTERM, an unusable
workdir, failing checkpoint storage, a damaged checkpoint, a resume with another config, bad metrics rows.

Every run is `python -m geo_contrast.main` on the tiny fMoW build (48 training images) with a ResNet-18 of width 4
at 16 px, global batch 8: 6 steps per epoch, 30 steps in all, a checkpoint every 2 steps. The runs share a
persistent XLA compilation cache, so only the first one compiles.
"""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import tensorstore as ts
from orbax.checkpoint._src.serialization import type_handlers

from geo_contrast import checkpointing
from geo_contrast import metric_writer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_STEPS = 30


def _flags(data_dir, workdir):
    return ["--config=configs/fmow.py:sample", f"--workdir={workdir}", f"--config.dataset.data_dir={data_dir}",
            "--config.dataset.generate_sample=False", "--config.model.width=4", "--config.input.image_size=16",
            "--config.input.global_batch=8", "--config.moco.queue_size=32", "--config.optim.num_epochs=5",
            "--config.checkpoint_every_steps=2", "--config.log_every_steps=1", "--config.stages=pretrain"]


def _start(args, env, log_dir):
    """Starts a run with stdout/stderr in files (read while it runs); returns (process, stdout, stderr paths)."""
    out, err = os.path.join(log_dir, "stdout"), os.path.join(log_dir, "stderr")
    with open(out, "w") as o, open(err, "w") as e:
        process = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=o, stderr=e)
    return process, out, err


def _run(args, env, log_dir, timeout=300):
    process, out, err = _start(args, env, log_dir)
    process.wait(timeout=timeout)
    return process.returncode, _read(out), _read(err)


def _read(path):
    with open(path) as f:
        return f.read()


def _rows(workdir):
    """{step: loss} of metrics.jsonl's training rows (the kNN monitor's rows aside), asserting that no step
    appears twice."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [row for line in f if line.endswith("\n") and "loss" in (row := json.loads(line))]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"duplicated steps in metrics.jsonl: {steps}"
    return {r["step"]: r["loss"] for r in rows}


def _wait_for(predicate, process, what, timeout=240):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, f"the run ended (status {process.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _last_step(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    return max(_rows(workdir), default=0) if os.path.exists(path) else 0


def _checkpoint_steps(workdir):
    return set(checkpointing.reader(os.path.join(workdir, "checkpoints")).all_steps())


@pytest.fixture(scope="module")
def reference_workdir(tiny_fmow, env, tmp_path_factory):
    """The workdir of a run that is never interrupted; its stdout and stderr are files in it."""
    workdir = tmp_path_factory.mktemp("reference")
    status, _, err = _run(["-m", "geo_contrast.main", *_flags(tiny_fmow[0], workdir)], env, workdir)
    assert status == 0, err[-3000:]
    return workdir


@pytest.fixture(scope="module")
def reference(reference_workdir):
    """{step: loss} of a run that is never interrupted."""
    rows = _rows(reference_workdir)
    assert sorted(rows) == list(range(1, TOTAL_STEPS + 1))
    return rows


def test_the_knn_monitor_reads_the_end_of_the_run_into_the_metrics_and_the_console(reference_workdir):
    """The sample's monitor reads every 160 steps and at the end: this 30-step run reads once, at step 30."""
    with open(os.path.join(reference_workdir, "metrics.jsonl")) as f:
        readings = [row for row in map(json.loads, f) if "knn_top1" in row]
    assert [row["step"] for row in readings] == [TOTAL_STEPS] and 0 <= readings[0]["knn_top1"] <= 1
    out = (reference_workdir / "stdout").read_text()
    assert f"step {TOTAL_STEPS}/{TOTAL_STEPS}  kNN top-1 {100 * readings[0]['knn_top1']:.2f} (val, k=20)" in out


# Our modules: the only ones whose INFO records the console shows.
_OURS = {name for package in ("geo_contrast", "tfds_builders")
         for _, _, names in os.walk(os.path.join(ROOT, package)) for name in names if name.endswith(".py")}


def test_the_console_shows_our_lines_and_real_warnings_only(reference_workdir):
    """No deprecation warning, no library's INFO records (TFDS loading its dataset info, orbax's internals, JAX's
    probe for a TPU), no warning of an Assert that XLA drops: the run's own lines stand out."""
    err = (reference_workdir / "stderr").read_text()
    assert "deprecat" not in err.lower(), err
    assert "Ignoring Assert operator" not in err and "read only" not in err, err
    info = re.findall(r"^I\d{4} [\d:.]+ +\d+ (\S+\.py):\d+\]", err, flags=re.M)  # Python's INFO records.
    assert "pretrain.py" in info and set(info) <= _OURS, err


# Runs the real command, but SIGKILLs the process from inside orbax's background write of step 4's checkpoint:
# the temporary directory exists and is half written.
_KILLED_IN_SAVE = textwrap.dedent("""
    import os, signal
    from absl import app
    from orbax.checkpoint._src.serialization import type_handlers
    from geo_contrast import checkpointing, main

    real_save = checkpointing.save

    def save(mngr, step, state, meta):
        if step == 4:
            checkpointing.wait(mngr)  # Step 2's background write finishes first: only step 4's is cut short.

            async def die(self, value, tspec, context):
                os.kill(os.getpid(), signal.SIGKILL)
            type_handlers.NumpyHandler._open_and_write = die
        real_save(mngr, step, state, meta)

    checkpointing.save = save
    app.run(main.main)
""")


def test_a_run_killed_during_a_save_resumes_from_the_last_finished_checkpoint(tiny_fmow, env, reference,
                                                                              tmp_path):
    flags = _flags(tiny_fmow[0], tmp_path)
    status, _, err = _run(["-c", _KILLED_IN_SAVE, *flags], env, tmp_path)
    assert status == -signal.SIGKILL, err[-3000:]
    directory = tmp_path / "checkpoints"
    assert any(name.startswith("4.orbax-checkpoint-tmp") for name in os.listdir(directory)), os.listdir(directory)
    assert _checkpoint_steps(tmp_path) == {2}
    killed = _rows(tmp_path)
    assert max(killed) >= 4  # It logged past the checkpoint it then lost.

    status, out, err = _run(["-m", "geo_contrast.main", *flags], env, tmp_path)
    assert status == 0, err[-3000:]
    assert "Resumed from" in err and "at step 2." in err
    resumed = _rows(tmp_path)
    assert sorted(resumed) == list(range(1, TOTAL_STEPS + 1))  # Steps 3.. of the killed run were replaced.
    # Every step's loss equals the uninterrupted run's: same state, same queue, same batches after the resume.
    np.testing.assert_array_equal([resumed[s] for s in sorted(resumed)], [reference[s] for s in sorted(resumed)])
    assert _checkpoint_steps(tmp_path) >= {TOTAL_STEPS}


def test_sigterm_checkpoints_the_next_step_and_exits_0_and_a_second_sigterm_exits_at_once(
        tiny_fmow, env, reference, tmp_path):
    args = ["-m", "geo_contrast.main", *_flags(tiny_fmow[0], tmp_path)]

    # One SIGTERM, mid-run: a checkpoint after at most two more steps, then exit status 0.
    process, out, err = _start(args, env, tmp_path)
    _wait_for(lambda: _last_step(tmp_path) >= 3, process, "step 3")
    signalled_after = _last_step(tmp_path)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 0, _read(err)[-3000:]
    stopped = max(_checkpoint_steps(tmp_path))
    assert signalled_after < stopped < TOTAL_STEPS
    assert f"Stopped by SIGTERM at step {stopped};" in _read(out)
    assert max(_rows(tmp_path)) == stopped

    # The same command resumes there and repeats the uninterrupted run's losses; two SIGTERMs end it at once,
    # killed by the signal, without the stop checkpoint.
    process, out, err = _start(args, env, tmp_path)
    _wait_for(lambda: _last_step(tmp_path) >= stopped + 2, process, f"step {stopped + 2}")
    process.send_signal(signal.SIGTERM)
    _wait_for(lambda: "SIGTERM received" in _read(err), process, "the first SIGTERM to be handled")
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == -signal.SIGTERM, _read(err)[-3000:]
    assert "Stopped by" not in _read(out)
    rows = _rows(tmp_path)
    assert sorted(rows) == list(range(1, max(rows) + 1)) and max(rows) >= stopped + 2
    np.testing.assert_array_equal([rows[s] for s in sorted(rows)], [reference[s] for s in sorted(rows)])


def test_an_unusable_workdir_is_a_one_line_error_at_start_up(tiny_fmow, env, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    status, _, err = _run(["-m", "geo_contrast.main", *_flags(tiny_fmow[0], blocker / "workdir")], env, tmp_path)
    assert status == 1
    assert f"error: Cannot use --workdir={blocker / 'workdir'}: Not a directory." in err
    assert "Traceback" not in err


def _failing_write(kind, tmp_path):
    """A replacement for orbax's numpy array write that fails the way a full or unwritable disk does."""
    blocker = tmp_path / "blocker"
    blocker.write_text("")

    async def full_disk(self, value, tspec, context):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    async def tensorstore_failure(self, value, tspec, context):  # A real tensorstore error: a file as directory.
        spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(blocker / "array")}}
        ts.open(spec, create=True, dtype=ts.float32, shape=[1]).result()

    return {"full_disk": (full_disk, "No space left on device"),
            "tensorstore": (tensorstore_failure, "Not a directory")}[kind]


@pytest.mark.parametrize("kind", ["full_disk", "tensorstore"])
def test_a_failing_save_is_a_checkpoint_error_and_keeps_the_previous_checkpoint(kind, tmp_path, monkeypatch):
    state = {"w": np.arange(6, dtype=np.float32), "step": np.array(1, np.int32)}
    mngr = checkpointing.manager(tmp_path / "checkpoints", keep=3)
    checkpointing.save(mngr, 1, state, {"note": "good"})
    checkpointing.wait(mngr)

    write, reason = _failing_write(kind, tmp_path)
    monkeypatch.setattr(type_handlers.NumpyHandler, "_open_and_write", write)
    checkpointing.save(mngr, 2, state, {"note": "doomed"})
    message = re.escape(f"{tmp_path / 'checkpoints'} failed: {reason}")
    with pytest.raises(checkpointing.CheckpointError, match=message):
        checkpointing.wait(mngr)

    monkeypatch.undo()
    assert checkpointing.reader(tmp_path / "checkpoints").latest_step() == 1
    restored, meta = checkpointing.restore(checkpointing.reader(tmp_path / "checkpoints"), 1, state)
    np.testing.assert_array_equal(restored["w"], state["w"])
    assert meta == {"note": "good"}


def test_a_checkpoint_directory_that_cannot_be_created_is_refused_with_its_path(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    message = re.escape(f"Cannot write checkpoints to {blocker}/checkpoints")
    with pytest.raises(checkpointing.CheckpointError, match=message):
        checkpointing.manager(blocker / "checkpoints", keep=1)


def test_a_bug_in_the_save_is_not_disguised_as_a_storage_error(tmp_path, monkeypatch):
    async def bug(self, value, tspec, context):
        raise ValueError("shape mismatch")

    mngr = checkpointing.manager(tmp_path, keep=1)
    monkeypatch.setattr(type_handlers.NumpyHandler, "_open_and_write", bug)
    checkpointing.save(mngr, 1, {"w": np.zeros(2, np.float32)}, {})
    with pytest.raises(ValueError, match="shape mismatch"):
        checkpointing.wait(mngr)


def _damage(step_dir):
    """Truncates the largest data file of a checkpoint's state to half its size, as a failing disk might."""
    data = [os.path.join(root, name) for root, _, names in os.walk(os.path.join(step_dir, "state"))
            for name in names]
    largest = max(data, key=os.path.getsize)
    os.truncate(largest, os.path.getsize(largest) // 2)


def _copy(workdir, tmp_path):
    copy = tmp_path / "workdir"
    shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("stdout", "stderr"))
    return copy


def test_a_damaged_latest_checkpoint_is_set_aside_and_the_run_resumes_from_the_one_before(
        tiny_fmow, env, reference, reference_workdir, tmp_path):
    """The newest checkpoint (30) cannot be read: the run warns, keeps it as 30.damaged, resumes from 28 and
    repeats the uninterrupted run's losses. The resumed command also changes fields a resume allows."""
    workdir = _copy(reference_workdir, tmp_path)
    checkpoints = workdir / "checkpoints"
    _damage(checkpoints / str(TOTAL_STEPS))
    allowed = ["--config.checkpoint_every_steps=4", "--config.input.prefetch_batches=1",
               "--config.keep_checkpoints=4", "--config.linear_eval.num_epochs=3"]
    status, _, err = _run(["-m", "geo_contrast.main", *_flags(tiny_fmow[0], workdir), *allowed], env, tmp_path)
    assert status == 0, err[-3000:]
    assert re.search(rf"Checkpoint {checkpoints}/30 cannot be read \(.+\); resuming from step 28 instead. The "
                     rf"damaged checkpoint is kept as {checkpoints}/30.damaged.", err), err[-3000:]
    assert f"Resumed from {checkpoints} at step 28." in err
    assert "Traceback" not in err and "Event loop is closed" not in err
    assert (checkpoints / "30.damaged").is_dir() and _checkpoint_steps(workdir) >= {28, 30}
    rows = _rows(workdir)
    assert sorted(rows) == list(range(1, TOTAL_STEPS + 1))
    np.testing.assert_array_equal([rows[s] for s in sorted(rows)], [reference[s] for s in sorted(rows)])


def test_a_resume_with_a_config_that_changes_the_run_is_one_error_line(tiny_fmow, env, reference_workdir,
                                                                        tmp_path):
    """A changed queue size (silently kept before) and a changed width (a flax traceback after "Resumed") are
    refused before the first step, both named with their two values and the two ways out."""
    workdir = _copy(reference_workdir, tmp_path)
    changed = ["--config.moco.queue_size=64", "--config.model.width=8", "--config.optim.num_epochs=6"]
    status, _, err = _run(["-m", "geo_contrast.main", *_flags(tiny_fmow[0], workdir), *changed], env, tmp_path)
    assert status == 1, err[-3000:]
    assert err.strip().splitlines()[-1] == (
        f"error: Cannot resume from {workdir}/checkpoints/30 with another config: moco.queue_size=32 there, 64 "
        "now; model.width=4 there, 8 now. To resume, pass the checkpoint's values (--config.moco.queue_size=32 "
        "--config.model.width=4); to start a new run with the new ones, use a new --workdir.")
    assert "Traceback" not in err and "Resumed" not in err
    assert max(_rows(workdir)) == TOTAL_STEPS and _checkpoint_steps(workdir) == {26, 28, 30}


def _tiny_checkpoints(directory, steps):
    """A checkpoint manager with `steps` saved: {"w": step * ones(4096)} and the step in the metadata."""
    mngr = checkpointing.manager(directory, keep=len(steps))
    for step in steps:
        checkpointing.save(mngr, step, {"w": np.full(4096, step, np.float32)}, {"step": step})
    checkpointing.wait(mngr)
    return mngr


def test_restore_latest_falls_back_past_damaged_checkpoints_and_keeps_them(tmp_path, caplog):
    mngr = _tiny_checkpoints(tmp_path, [1, 2, 3])
    _damage(tmp_path / "3")  # A truncated data file.
    (tmp_path / "2" / "meta" / "metadata").write_bytes(b"\xff\xfe garbled")  # Metadata that is not even UTF-8.
    step, state, meta = checkpointing.restore_latest(mngr, {"w": np.zeros(4096, np.float32)})
    assert (step, meta) == (1, {"step": 1}) and (state["w"] == 1).all()
    assert sorted(os.listdir(tmp_path)) == ["1", "2.damaged", "3.damaged"] and mngr.all_steps() == [1]
    for damaged in (3, 2):
        assert f"Checkpoint {tmp_path}/{damaged} cannot be read (" in caplog.text
    checkpointing.save(mngr, 2, {"w": np.full(4096, 5, np.float32)}, {"step": 2})  # The manager goes on.
    checkpointing.wait(mngr)
    assert mngr.all_steps() == [1, 2]


def test_when_no_checkpoint_restores_it_is_one_error_and_none_is_renamed(tmp_path):
    mngr = _tiny_checkpoints(tmp_path, [1, 2])
    for step in (1, 2):
        _damage(tmp_path / str(step))
    message = re.escape(f"No checkpoint in {tmp_path} restores (step 2: ")
    with pytest.raises(checkpointing.CheckpointError, match=message) as error:
        checkpointing.restore_latest(mngr, {"w": np.zeros(4096, np.float32)})
    assert "; step 1: " in str(error.value) and "\n" not in str(error.value)
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]


def test_a_checkpoint_of_other_shapes_is_refused_before_its_state_is_read(tmp_path):
    mngr = _tiny_checkpoints(tmp_path, [1])
    with pytest.raises(checkpointing.CheckpointError, match=re.escape(
            f"Checkpoint {tmp_path}/1 does not fit the model this config builds: w is (4096,) there, (8,) here; "
            "x is absent there, () here.")):
        checkpointing.restore_latest(mngr, {"w": np.zeros(8, np.float32), "x": np.zeros((), np.int32)})
    assert sorted(os.listdir(tmp_path)) == ["1"]


def test_a_resumed_metric_writer_drops_later_rows_and_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": s, "loss": 10.0 - s}) + "\n" for s in range(1, 6)]
    path.write_text("".join(rows) + '{"step": 6, "lo')  # Killed in the middle of writing step 6.
    writer = metric_writer.MetricWriter(str(tmp_path), resume_step=3)
    writer.write(4, {"loss": 0.5})
    writer.close()
    assert path.read_text() == "".join(rows[:3]) + json.dumps({"step": 4, "loss": 0.5}) + "\n"


def test_a_resumed_metric_writer_sets_aside_lines_that_are_not_rows(tmp_path, caplog):
    """Non-UTF-8 bytes, a JSON list, rows without a numeric step: moved to metrics.jsonl.bad with a warning, byte
    for byte; the valid rows stay and the run goes on."""
    path = tmp_path / "metrics.jsonl"
    good = [json.dumps({"step": s, "loss": 1.0 / s}).encode() + b"\n" for s in (1, 2)]
    bad = [b"\xff\xfe\x00garbage", b"[1, 2, 3]", b'{"loss": 0.5}', b'{"step": "3", "loss": 0.5}',
           b'{"step": 3, "loss": "x"}']
    path.write_bytes(good[0] + b"\n".join(bad[:3]) + b"\n" + good[1] + b"\n".join(bad[3:]) + b"\n")
    writer = metric_writer.MetricWriter(str(tmp_path), resume_step=2)
    writer.write(3, {"loss": 0.25})
    writer.close()
    assert path.read_bytes() == good[0] + good[1] + json.dumps({"step": 3, "loss": 0.25}).encode() + b"\n"
    assert (tmp_path / "metrics.jsonl.bad").read_bytes() == b"".join(line + b"\n" for line in bad)
    assert f"{path}: 5 line(s) that are not metrics rows moved to {path}.bad." in caplog.text
