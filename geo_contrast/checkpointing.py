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

Damage (a finished checkpoint whose files were later truncated, garbled or lost): `restore_latest` falls back to
the newest checkpoint that restores and keeps the damaged ones for inspection as `<step>.damaged`, a name orbax
does not list. Readers (workdir.read_run) catch `UNREADABLE` and report the `gist` of the error.
"""

import contextlib
import os
import re
import sys

import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils


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
        item_handlers=_item_handlers(),
    )


def reader(directory):
    """A CheckpointManager that never writes (no directory creation, no cleanup), so read-only or shared
    checkpoint directories can be listed and restored."""
    options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False)  # Else warned.
    return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_handlers=_item_handlers())


def _item_handlers():
    """The handlers of a checkpoint's items, named up front so that their metadata (the arrays' shapes) can be
    read before anything is restored."""
    return {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}


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


# What reading a damaged checkpoint raises: OSError for a missing file; ValueError for tensorstore's errors, a
# garbled JSON file or bytes that are not UTF-8.
UNREADABLE = (OSError, ValueError)


def restore_latest(mngr, like, check=lambda step, meta: None):
    """(step, state, meta) of the newest checkpoint of `mngr` that restores, `state` shaped like `like`; None when
    there is no checkpoint.

    `check(step, meta)` sees each candidate's metadata before its state is read, and may refuse it by raising (a
    config that differs from the checkpoint's). A checkpoint whose arrays have other shapes than `like` is refused
    with a CheckpointError naming them. A checkpoint that cannot be read is damaged: once an older one restores,
    each newer damaged one is renamed `<step>.damaged` (kept for inspection, no longer listed by orbax), with a
    warning. When none restores, a CheckpointError names them all and nothing is renamed. Every process reads the
    same files (shared storage), so all of them come to the same step.
    """
    quiet_closed_loop_reports()
    damaged = []
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            meta = read_meta(mngr, step)
            stored = _shapes(mngr.item_metadata(step)["state"])
        except UNREADABLE as e:
            damaged.append((step, e))
            continue
        check(step, meta)
        _check_shapes(f"{mngr.directory}/{step}", stored, _shapes(like))
        try:
            state, meta = restore(mngr, step, like)
        except UNREADABLE as e:
            damaged.append((step, e))
            continue
        _set_aside(mngr, damaged, step)
        return step, state, meta
    if damaged:
        reasons = "; ".join(f"step {step}: {gist(e)}" for step, e in damaged)
        raise CheckpointError(f"No checkpoint in {mngr.directory} restores ({reasons}). Move it away (or use a "
                              "new --workdir) to start over.")
    return None


def read_meta(mngr, step):
    """The metadata saved beside the state of `step`."""
    return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def _shapes(tree):
    """{"params.encoder.conv1.kernel": shape} of a pytree of arrays, ShapeDtypeStructs or orbax's array
    metadata."""
    def name(key):  # DictKey, GetAttrKey (a dataclass's field) or SequenceKey.
        return str(next(getattr(key, a) for a in ("key", "name", "idx") if hasattr(key, a)))

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {".".join(map(name, path)): tuple(leaf.shape) for path, leaf in leaves}


def _check_shapes(path, stored, expected):
    differences = [f"{name} is {stored.get(name, 'absent')} there, {expected.get(name, 'absent')} here"
                   for name in sorted(stored.keys() | expected.keys()) if stored.get(name) != expected.get(name)]
    if differences:
        more = f" and {len(differences) - 3} more" if len(differences) > 3 else ""
        raise CheckpointError(f"Checkpoint {path} does not fit the model this config builds: "
                              f"{'; '.join(differences[:3])}{more}. It was written by another config or version "
                              "of the code; use a new --workdir.")


def _set_aside(mngr, damaged, restored_step):
    """Renames the damaged checkpoints `<step>.damaged` (process 0, then every process sees it), with a warning."""
    if not damaged:
        return
    for step, error in damaged:
        path = os.path.join(str(mngr.directory), str(step))
        target = path + ".damaged"
        suffix = 1
        while os.path.exists(target):
            target, suffix = f"{path}.damaged.{suffix}", suffix + 1
        if jax.process_index() == 0:
            os.rename(path, target)
        logging.warning("Checkpoint %s cannot be read (%s); resuming from step %d instead. The damaged checkpoint "
                        "is kept as %s.", path, gist(error), restored_step, target)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("damaged checkpoints set aside")
    mngr.reload()


def gist(error):
    """A read error in one line: its first, without tensorstore's spec (a screenful of JSON)."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    text = text.split(" [tensorstore_spec=")[0]
    return text if len(text) <= 300 else text[:300] + "..."


def quiet_closed_loop_reports():
    """When a read fails, orbax closes its event loop while tensorstore's other reads are in flight; each of them
    then reports "RuntimeError: Event loop is closed" as an unraisable exception, hundreds of tracebacks about
    nothing. Those are dropped from here on; every other unraisable exception is still reported."""
    if getattr(sys.unraisablehook, "drops_closed_loop_reports", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        value = unraisable.exc_value
        if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
            previous(unraisable)

    hook.drops_closed_loop_reports = True
    sys.unraisablehook = hook


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
