r"""Entry point: parses flags, joins a multi-process run if asked, and runs the stages the config names.

    python -m geo_contrast.main --config=configs/fmow.py[:ARGS] --workdir=DIR [--config.FIELD=VALUE ...]

Several hosts (every process runs the same command; see distributed.py):

    ... --distributed                                     # Cloud TPU pod, SLURM, Open MPI, Kubernetes
    ... --coordinator_address=HOST0:PORT --num_processes=N --process_id=I      # any other cluster

A problem the user can fix (a misspelt config field or argument, a bad config value, a dataset that is not built,
an unusable workdir, a failed checkpoint write, a diverged loss) ends the run with its message and exit status 1,
without a traceback. SIGTERM stops pretraining with a checkpoint and exit status 0; the same command resumes it
(pretrain.py).
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from geo_contrast import config_lib
from geo_contrast import distributed
from geo_contrast import input_pipeline
from geo_contrast import stages
import tfds_builders

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/fmow.py:variant=tp.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics, clusters and results go. With several hosts: "
                    "a directory all of them see.")
flags.DEFINE_bool("distributed", False, "Join a multi-process run with jax.distributed.initialize(), which "
                  "detects Cloud TPU pods, SLURM, Open MPI and Kubernetes by itself.")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, the same on every process "
                    "(implies --distributed).")
flags.DEFINE_integer("num_processes", None, "Number of processes in the run (implies --distributed).")
flags.DEFINE_integer("process_id", None, "This process's index, 0..num_processes-1 (implies --distributed).")
flags.mark_flags_as_required(["config", "workdir"])

_USER_ERRORS = stages.USER_ERRORS + (distributed.DistributedInitError,)


# Where our own log records come from (this package and the dataset builders).
_OUR_CODE = (os.path.dirname(os.path.abspath(__file__)) + os.sep,
             os.path.dirname(os.path.abspath(tfds_builders.__file__)) + os.sep)


class _QuietLibraries:
    """Keeps our records and the libraries' warnings; drops the libraries' INFO records (orbax's dozens per save,
    TFDS's "Load dataset info", JAX's probe for a TPU that is not there), which drown the run's own lines, and
    orbax's warning that a reader is read-only, which checkpointing.reader asks for on purpose."""

    def filter(self, record):
        if os.path.abspath(record.pathname).startswith(_OUR_CODE):
            return True
        return (record.levelno >= logging.converter.ABSL_TO_STANDARD[logging.WARNING]
                and not record.getMessage().startswith("Given directory is read only"))


def _parse_flags(argv):
    """absl's flag parsing, with the config's mistakes as one `error:` line (exit status 1): a field that does not
    exist (with the closest name), an unknown config argument or variant (refused by get_config), a value of the
    wrong type, a config file that cannot be loaded."""
    try:
        remaining = FLAGS(argv)
        FLAGS.config.keys()  # A config file that failed to load raises only when read (ml_collections).
        return remaining
    except (flags.Error, OSError, AttributeError, KeyError) as e:
        message = _config_mistake(e, argv)
        if message is None:
            raise
        sys.stderr.write(f"error: {message}\n")
        sys.exit(1)


def _config_mistake(error, argv):
    """The message of a mistake in the config flags that stopped their parsing, or None (a bug)."""
    cause, refusal = error, None
    while cause is not None:  # get_config's ConfigError, wrapped (twice, with its traceback) on its way up.
        refusal = cause if isinstance(cause, config_lib.ConfigError) else refusal
        cause = cause.__cause__ or cause.__context__
    if refusal is not None:
        return str(refusal)
    if isinstance(error, OSError):
        return f"--config cannot be loaded: {str(error).splitlines()[-1].strip()}"
    if isinstance(error, flags.Error):
        return str(error)
    # ml_collections raises an AttributeError (KeyError) for an override of a field that does not exist.
    config = FLAGS["config"].parser.parse(_flag_value(argv, "config"))
    for arg in argv:
        if arg.startswith("--config."):
            path = arg[len("--config."):].partition("=")[0]
            problem = config_lib.unknown_field(config, path)
            if problem:
                return f"--config.{path}: {problem}"
    return None


def _flag_value(argv, name):
    """The value of --name in `argv` (as --name=VALUE or --name VALUE)."""
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_QuietLibraries())
    try:
        distributed.initialize(auto=FLAGS.distributed, coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
        input_pipeline.hide_accelerators_from_tf()
        stages.run(FLAGS.config, FLAGS.workdir)
    except _USER_ERRORS as e:
        sys.stderr.write(f"\nerror: {e}\n")
        sys.exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
