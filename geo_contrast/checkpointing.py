"""Orbax checkpoints of the whole training state, with the run's metadata beside it.

Atomicity: orbax writes step N into `N.orbax-checkpoint-tmp*` and renames it to `N` only once every process has
finished writing, so a save interrupted by a kill (or a full disk) is never listed as a step: `latest_step` only
ever names a finished checkpoint, and a later save of the same step replaces the leftover temporary directory.

Multi-process: every process calls `save`, `wait` and `restore` in the same order (orbax synchronises them
through the jax.distributed coordinator). The state is a pytree of host numpy arrays, identical on every
process (replicated training state); orbax writes numpy leaves from process 0 only and every process reads
them back. So the checkpoint directory must be storage that all hosts see (NFS, Filestore, a gcsfuse mount).

Storage failures (unwritable directory, full disk) surface as `CheckpointError` naming the directory, whether
orbax reports them as an OSError or, from tensorstore, as a ValueError carrying the OS error code.
"""

import contextlib
import os
import re

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    pass


def manager(directory, *, keep, save_interval_steps=1):
    """A CheckpointManager in `directory`, refusing early (with the path) a directory it cannot write."""
    directory = os.path.abspath(directory)
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, f".write_test.{jax.process_index()}")  # One per process: no races.
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise CheckpointError(
            f"Cannot write checkpoints to {directory}: {e.strerror or e}. "
            "Choose a writable --workdir with free space."
        ) from e
    return ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=save_interval_steps, create=True, enable_async_checkpointing=True
        ),
    )


def reader(directory):
    """A CheckpointManager that never writes (no directory creation, no cleanup), so read-only or shared
    checkpoint directories can be listed and restored."""
    options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False)  # Else warned.
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(mngr, step, state, meta):
    """Starts saving host-side `state` (a pytree of numpy arrays) and the JSON-able `meta` at `step`.

    Asynchronous: the write goes on in the background; a failure of the previous save is reported here, one of
    this save at the next `save` or `wait`.
    """
    with _storage_errors(f"Saving checkpoint {step} to {mngr.directory}"):
        mngr.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True,
        )


def wait(mngr):
    """Blocks until the asynchronous saves are on disk, reporting a storage failure as a CheckpointError."""
    with _storage_errors(f"Writing a checkpoint to {mngr.directory}"):
        mngr.wait_until_finished()


def restore(mngr, step, like):
    """Restores (state, meta) of `step` as host numpy arrays, with `state` shaped like the pytree `like` (arrays
    or jax.ShapeDtypeStruct)."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    restored = mngr.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
    )
    return restored["state"], restored["meta"]


@contextlib.contextmanager
def _storage_errors(what):
    try:
        yield
    except (OSError, ValueError) as e:
        reason = _storage_failure(e)
        if reason is None:
            raise
        raise CheckpointError(
            f"{what} failed: {reason} (disk full or unwritable?). The previous checkpoint is "
            "intact; free space or choose another --workdir, then rerun the same command to "
            "resume."
        ) from e


_TENSORSTORE_OS_ERROR = re.compile(r"os_error_code='?(\d+)")


def _storage_failure(error):
    """A short reason when `error` is the storage failing (an OSError, or a tensorstore error that carries an
    OS error code), else None: any other error is a bug and propagates unchanged."""
    if isinstance(error, OSError):
        return error.strerror or str(error)
    match = _TENSORSTORE_OS_ERROR.search(str(error))
    return os.strerror(int(match.group(1))) if match else None
