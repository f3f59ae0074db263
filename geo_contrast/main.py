r"""Entry point: parses flags and runs the stages the config names. Nothing else.

    python -m geo_contrast.main --config=configs/fmow.py[:ARGS] --workdir=DIR [--config.FIELD=VALUE ...]
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from geo_contrast import input_pipeline
from geo_contrast import stages

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/fmow.py:variant=tp.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics, clusters and results go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    input_pipeline.hide_accelerators_from_tf()
    logging.set_verbosity(logging.INFO)
    stages.run(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
