"""Orbax checkpoints of the whole training state, with the run's metadata beside it.

Orbax writes each step to a temporary directory and renames it when complete, so a save interrupted by a kill
is never listed as a step and `latest_step` only ever names a finished checkpoint.
"""

import os

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  pass


def manager(directory, *, keep, save_interval_steps=1):
  """A CheckpointManager in `directory`, refusing early (with the path) a directory it cannot write."""
  directory = os.path.abspath(directory)
  try:
    os.makedirs(directory, exist_ok=True)
    probe = os.path.join(directory, ".write_test")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise CheckpointError(f"Cannot write checkpoints to {directory}: {e.strerror or e}. "
                          "Choose a writable --workdir with free space.") from e
  return ocp.CheckpointManager(
      directory,
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_interval_steps,
                                           create=True, enable_async_checkpointing=True))


def save(mngr, step, state, meta):
  """Saves host-side `state` (a pytree of arrays) and the JSON-able `meta` at `step`."""
  try:
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
              force=True)
  except OSError as e:
    raise CheckpointError(f"Saving checkpoint {step} to {mngr.directory} failed: {e.strerror or e} "
                          "(disk full or unwritable?). The previous checkpoint is intact.") from e


def restore(mngr, step, like):
  """Restores (state, meta) of `step`, with `state` shaped like the pytree `like`."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                        meta=ocp.args.JsonRestore()))
  return restored["state"], restored["meta"]


def wait(mngr):
  """Blocks until the asynchronous saves are on disk, reporting a failure there as a CheckpointError."""
  try:
    mngr.wait_until_finished()
  except OSError as e:
    raise CheckpointError(f"Writing a checkpoint to {mngr.directory} failed: {e.strerror or e}.") from e
