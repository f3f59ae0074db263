"""The loop every training stage runs: pmapped steps, metrics fetched once per interval, a stop vote, checkpoints.

Pretraining and fine-tuning run the same loop (their steps, data and checkpoints differ):
- The device queue is never stalled for the host: a step's metrics stay on the devices until the logging interval
  ends (or a checkpoint is due), then the interval's are fetched at once, checked and written.
- A stop request (SIGTERM/SIGINT: preemption.StopRequest) is each process's vote, summed over all devices inside
  the step; the sum is read one step late, so every process stops after the same step, and the loop saves a
  checkpoint and returns. The same command resumes.
- A non-finite loss stops the run with `NonFiniteLossError`, the last checkpoint (before that interval) intact.
"""

import jax
import numpy as np
from jax import lax

from geo_contrast import checkpointing
from geo_contrast import devices


class NonFiniteLossError(FloatingPointError):
    pass


def with_stop_vote(step_fn):
    """`step_fn(state, batch, *args) -> (state, metrics)` for one device, as the loop runs it:
    `(state, batch, vote, *args) -> (state, metrics, votes)`, votes = the number of devices whose process asked to
    stop (the same on every device)."""

    def voting_step(state, batch, vote, *args):
        state, metrics = step_fn(state, batch, *args)
        return state, metrics, lax.psum(vote, devices.AXIS)

    return voting_step


def run(p_step, state, batches, *, start_step, end_step, stop, writer, progress, log_every, checkpoint_every, save,
        step_args=lambda step: (), checkpoint_at=lambda step: False, after_step=lambda step, state: None):
    """Runs steps start_step + 1 .. end_step of the pmapped `p_step` (made by `with_stop_vote`) on `batches`.

    `step_args(step)` gives the step's extra arguments (e.g. a learning rate set per epoch) for the step that
    ends at `step` + 1; `after_step(step, state)` runs after each step's metrics are written (an epoch's
    evaluation); `save(step, state)` writes a checkpoint every `checkpoint_every` steps, at the steps
    `checkpoint_at` names, at `end_step` and when stopped. Returns (state, last step done, what stopped the run
    or None).
    """
    pending = []  # Device-side metrics of steps not yet fetched: no host sync inside an interval.
    previous_votes = None
    stopped_by = None
    step = start_step
    local_devices = jax.local_device_count()
    while step < end_step:
        vote = np.full(local_devices, stop.requested is not None, np.int32)
        state, metrics, votes = p_step(state, next(batches), vote, *step_args(step))
        step += 1
        pending.append((step, metrics))
        # The previous step's votes: waits for that step only, while this one is already queued.
        if previous_votes is not None and devices.unreplicate(previous_votes) > 0:
            stopped_by = stop.requested or "a signal to another process"
        previous_votes = votes
        checkpoint = (step % checkpoint_every == 0 or step == end_step or checkpoint_at(step)
                      or stopped_by is not None)
        if checkpoint or step % log_every == 0:
            _flush_metrics(pending, writer, progress)
            pending = []
        after_step(step, state)
        if checkpoint:
            save(step, state)
        if stopped_by is not None:
            break
    return state, step, stopped_by


def train(p_step, state, batches, *, mngr, writer, **loop):
    """`run` to the end or a stop, then every checkpoint written and the metric writer closed (also on an error);
    on a stop, says how to resume. Returns (last step done, what stopped the run or None)."""
    try:
        _, step, stopped_by = run(p_step, state, batches, writer=writer, **loop)
        checkpointing.wait(mngr)
    finally:
        writer.close()
    if stopped_by is not None:
        print(f"Stopped by {stopped_by} at step {step}; checkpoint saved in {mngr.directory}. Run the same "
              "command to resume.", flush=True)
    return step, stopped_by


def _flush_metrics(pending, writer, progress):
    """Fetches the interval's metrics, stops on a non-finite loss, writes them; process 0 prints progress."""
    fetched = jax.device_get([m for _, m in pending])
    for (step, _), metrics in zip(pending, fetched):
        metrics = devices.unreplicate(metrics)
        if not np.isfinite(metrics["loss"]):
            raise NonFiniteLossError(
                f"Loss is {metrics['loss']} at step {step}; stopping. The last checkpoint (before this "
                "interval) is intact: lower the learning rate or check the data, then rerun to resume.")
        writer.write(step, metrics)
    if jax.process_index() == 0:
        last_step = pending[-1][0]
        print(progress.line(last_step, float(devices.unreplicate(fetched[-1])["loss"])), flush=True)
