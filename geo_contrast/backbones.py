"""The ResNet an evaluation stage starts from, named by an `init`: a run's pretrained query encoder, a
checkpoint of any run, or pretraining's random initialisation (the floor every pretrained result is held against).

    "pretrained"          the latest checkpoint of this workdir's pretraining
    "random"              pretraining's initial query encoder for config.seed
    PATH                  a workdir, its checkpoints/ directory, or one checkpoint step directory
    FILE.safetensors      torchvision-layout weights (torchvision's ImageNet ResNet, an export, the authors'
                          released encoder converted by `python -m geo_contrast.convert`)

A checkpoint's architecture comes from the pretraining config recorded beside it, so any run's encoder can be
evaluated with another run's evaluation config; a weights file must fit config.model (depth and width).
TensorFlow-free: only the model, the checkpoints and the weights file are touched.
"""

import dataclasses
import os
from typing import Any

from absl import logging

from geo_contrast import safetensors_io
from geo_contrast import train_setup
from geo_contrast import workdir as workdir_lib
from geo_contrast.models import resnet

PRETRAINED = "pretrained"
RANDOM = "random"


@dataclasses.dataclass(frozen=True)
class Backbone:
    module: resnet.ResNet
    variables: Any  # {"params", "batch_stats"} of the ResNet, host arrays.
    source: dict  # JSON-able: checkpoint, pretrain_step, pretrain_total_steps, variant.


def is_weights_file(init):
    return init.endswith(".safetensors")


def results_key(init, backbone):
    """The key of `init`'s entry in results.json: "pretrained", "random", the checkpoint's or the file's path."""
    if init in (PRETRAINED, RANDOM):
        return init
    return backbone.source["init_file"]["path"] if is_weights_file(init) else backbone.source["checkpoint"]


def load(config, workdir, init):
    """The backbone `init` names (see the module docstring), computing in config.model.compute_dtype."""
    source = {"checkpoint": None, "pretrain_step": None, "pretrain_total_steps": None, "variant": None}
    if init == RANDOM:
        model_config = config
        state = train_setup.initial_state(config)
    elif is_weights_file(init):
        model_config = config
        path = os.path.abspath(os.path.expanduser(init))
        state = train_setup.with_torchvision_backbone(train_setup.initial_state(config), path)
        source["init_file"] = {"path": path, **safetensors_io.read_metadata(path)}
        logging.info("Evaluating the weights of %s (ResNet-%d width %d).", path, config.model.depth,
                     config.model.width)
    else:
        if init == PRETRAINED:
            directory, step = workdir_lib.checkpoints_dir(workdir), None
            if workdir_lib.latest_step(directory) is None:
                raise workdir_lib.WorkdirError(
                    f"init='pretrained' but {directory} holds no pretraining checkpoint. Run the pretrain stage "
                    "first (config.stages='pretrain,linear_eval'), or set --config.linear_eval.init=random (or a "
                    "checkpoint path).")
        else:
            directory, step = workdir_lib.find_checkpoint(init)
        run = workdir_lib.read_run(directory, step)
        model_config = run.config
        run = workdir_lib.read_run(directory, run.step, like=train_setup.initial_state(model_config))
        state = run.state
        source = {"checkpoint": run.path, "pretrain_step": run.step,
                  "pretrain_total_steps": run.meta.get("total_steps"), "variant": model_config.variant}
        logging.info("Evaluating %s (variant %s, ResNet-%d width %d, step %d).", run.path, model_config.variant,
                     model_config.model.depth, model_config.model.width, run.step)
    module = resnet.ResNet(depth=model_config.model.depth, width=model_config.model.width,
                           dtype=train_setup.compute_dtype(config.model.compute_dtype))
    variables = {"params": state.params["encoder"]["backbone"], "batch_stats": state.batch_stats["backbone"]}
    return Backbone(module, variables, source)
