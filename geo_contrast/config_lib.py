"""Config plumbing shared by the files in `configs/`: argument parsing, variants, validation.

Configs take their options in the path, big_vision style (`configs/fmow.py:variant=tp,sample`), so one file
describes a whole family of runs and a command line names the run exactly. Validation lives here, apart from
the trainer, so a bad value is refused before any data is read or any device is touched.
"""

import difflib
import json
import os
import shlex

import ml_collections

from geo_contrast import safetensors_io


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field and the fix."""


# What each variant turns on: (temporal positives, geo-location classification, MoCo's contrastive loss).
# geo_only is Table 1's "geo-location classification only": the query encoder and the geo head, nothing else.
VARIANTS = {
    "moco": (False, False, True),
    "tp": (True, False, True),
    "geo": (False, True, True),
    "geo_tp": (True, True, True),
    "geo_only": (False, True, False),
}


def parse_arg(arg, **defaults):
    """Parses `'a=1,b,c=x'` into a ConfigDict over `defaults`; a bare name sets a boolean to True.

    Values are cast to the type of their default, so `sample` and `sample=True` mean the same and a misspelt
    option is an error rather than a silently ignored string.
    """
    result = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        name, has_value, value = item.partition("=")
        if name not in defaults:
            raise ConfigError(f"Unknown config argument {name!r} in {arg!r}; known: {sorted(defaults)}.")
        default = defaults[name]
        if isinstance(default, bool):
            result[name] = (value.lower() in ("1", "true", "yes")) if has_value else True
        elif not has_value:
            raise ConfigError(f"Config argument {name!r} needs a value ({name}=...).")
        else:
            result[name] = type(default)(value) if default is not None else value
    return ml_collections.ConfigDict(result)


def unknown_field(config, path):
    """Why `path` ("moco.temprature") names no field of `config`, with the closest valid name; None if it does.

    ml_collections reports a misspelt override with a traceback and without the section; this says both.
    """
    node, where = config, "config"
    for name in path.split("."):
        if not isinstance(node, ml_collections.ConfigDict):
            return f"{where} is a value, not a section: it has no field {name!r}."
        if name not in node:
            close = difflib.get_close_matches(name, list(node.keys()), n=1)
            hint = f"did you mean {where}.{close[0]}?" if close else f"its fields are {sorted(node.keys())}."
            return f"{where} has no field {name!r}; {hint}"
        node, where = node[name], f"{where}.{name}"
    return None


def uses_temporal_positives(variant):
    return _variant(variant)[0]


def uses_geo_loss(variant):
    return _variant(variant)[1]


def uses_contrastive_loss(variant):
    return _variant(variant)[2]


def _variant(variant):
    if variant not in VARIANTS:
        raise ConfigError(
            f"config.variant={variant!r} is not a variant; choose one of {sorted(VARIANTS)} "
            "(--config.variant=... or configs/fmow.py:variant=...)."
        )
    return VARIANTS[variant]


STAGES = ("pretrain", "linear_eval", "finetune")
# The smallest crop side: the ResNet divides the image by 32, so at 16 px its last two stages already see one
# pixel, and smaller crops leave nothing past its stem to learn from (16 px is what the tests train at).
MIN_IMAGE_SIZE = 16
# augment.REGIONS, repeated here so that validating a config needs no TensorFlow (a test keeps the two equal).
REGIONS = ("whole", "center_square", "box_square")
LINEAR_EVAL_SCHEDULES = ("step", "cosine")
READOUTS = ("sgd", "logistic")


def scaled_lr(base_lr, global_batch):
    """The linear scaling rule of MoCo and main_lincls.py: `base_lr` is the rate for a batch of 256."""
    return base_lr * global_batch / 256


def stage_names(config):
    """The stages `config.stages` names, in order; a ConfigError for an empty or unknown one."""
    names = [s.strip() for s in config.stages.split(",") if s.strip()]
    unknown = [s for s in names if s not in STAGES]
    if unknown or not names:
        raise ConfigError(f"config.stages={config.stages!r}: unknown stage(s) {unknown}; use a comma-separated "
                          f"subset of {list(STAGES)}.")
    return names


def validate(config, *, num_devices, num_local_devices, stages=None):
    """The one validation of a config: every check of the stages it runs (`stages`, default `config.stages`),
    before any data is read or any device computes. Each error names the field and the fix.

    `num_devices` is the global device count (all processes), `num_local_devices` this process's.
    """
    names = stage_names(config) if stages is None else stages
    _variant(config.variant)
    if "pretrain" in names:
        _validate_pretrain(config, num_devices)
    if "linear_eval" in names:
        _validate_linear_eval(config.linear_eval, num_local_devices)
    if "finetune" in names:
        _validate_finetune(config.finetune, num_devices, num_local_devices)


def _nearest(value, ok, limit=1 << 20):
    """The positive integer closest to `value` (the smaller on ties) for which `ok` holds; None below `limit`."""
    for distance in range(limit):
        for candidate in (value - distance, value + distance):
            if 0 < candidate < limit and ok(candidate):
                return candidate
    return None


def _validate_pretrain(config, num_devices):
    """The pretraining checks; every suggested value passes all of them (the others' values held fixed)."""
    if not config.dataset.name:
        raise ConfigError("config.dataset.name is empty; use a built TFDS dataset such as fmow.")
    if config.init_from:
        _validate_weights_file("config.init_from", config.init_from)
    contrastive = uses_contrastive_loss(config.variant)
    batch, groups, queue = config.input.global_batch, config.moco.bn_groups, config.moco.queue_size
    # Shuffle BN needs two BN groups in all (a query and its key must never share statistics); whole batches
    # are enqueued, so the queue holds a whole number of them.
    min_groups = 2 if contrastive else 1

    def batch_ok(b):
        return (b % num_devices == 0 and (b // num_devices) % max(groups, 1) == 0
                and (not contrastive or queue % b == 0))

    def groups_ok(g):
        return (batch // num_devices) % g == 0 and num_devices * g >= min_groups

    if batch <= 0 or batch % num_devices:
        raise ConfigError(
            f"config.input.global_batch={batch} must be a positive multiple of the device count ({num_devices}); "
            f"use e.g. --config.input.global_batch={_nearest(max(batch, 1), batch_ok)}.")
    per_device = batch // num_devices
    if groups <= 0 or per_device % groups or num_devices * groups < min_groups:
        fix = _nearest(max(groups, 1), groups_ok, limit=per_device + 1)
        fix = f"--config.moco.bn_groups={fix}" if fix else (
            f"--config.input.global_batch={2 * batch} --config.moco.bn_groups=2")
        raise ConfigError(
            f"config.moco.bn_groups={groups} must divide the per-device batch ({per_device} = global_batch "
            f"{batch} / {num_devices} devices)" + (
                ", and shuffle BN needs at least two BN groups in all (a query and its key must never share BN "
                "statistics)" if contrastive else "") + f"; use e.g. {fix}.")
    if not contrastive:
        return _validate_training(config)
    if queue <= 0 or queue % batch:
        raise ConfigError(
            f"config.moco.queue_size={queue} must be a positive multiple of config.input.global_batch={batch} "
            "(whole batches are enqueued); use e.g. "
            f"--config.moco.queue_size={max(batch, queue - queue % batch)}.")
    if not config.moco.temperature > 0:
        raise ConfigError(
            f"config.moco.temperature={config.moco.temperature} must be > 0; use e.g. "
            "--config.moco.temperature=0.2 (MoCo-v2; the authors' commands: 0.02)."
        )
    if not 0 <= config.moco.momentum < 1:
        raise ConfigError(f"config.moco.momentum={config.moco.momentum} must be in [0, 1); MoCo uses 0.999.")
    _validate_training(config)


def _validate_training(config):
    """The checks of every variant: geo clusters, optimisation, crops, logging."""
    if uses_geo_loss(config.variant) and config.geo.num_clusters < 2:
        raise ConfigError(
            f"config.geo.num_clusters={config.geo.num_clusters} must be >= 2 for variant {config.variant!r}."
        )
    if config.optim.num_epochs <= 0 or config.optim.base_lr <= 0:
        raise ConfigError(
            f"config.optim.num_epochs={config.optim.num_epochs} and config.optim.base_lr="
            f"{config.optim.base_lr} must both be > 0."
        )
    if config.input.image_size < MIN_IMAGE_SIZE:
        raise ConfigError(
            f"config.input.image_size={config.input.image_size} must be >= {MIN_IMAGE_SIZE} px (the ResNet's "
            "stride is 32); use e.g. --config.input.image_size=224."
        )
    if not 0 < config.input.crop_scale[0] <= config.input.crop_scale[1] <= 1:
        raise ConfigError(
            f"config.input.crop_scale={tuple(config.input.crop_scale)} must satisfy 0 < min <= max <= 1."
        )
    _validate_region("config.input", config.input)
    if config.input.prefetch_batches < 1:
        raise ConfigError(
            f"config.input.prefetch_batches={config.input.prefetch_batches} must be >= 1 (batches copied to the "
            "devices ahead of the step); 2 overlaps the copy with the step."
        )
    knn = config.knn
    if knn.every_steps < 0 or knn.k < 1 or not knn.temperature > 0 or min(knn.train_locations,
                                                                           knn.val_locations) < 0:
        raise ConfigError(f"config.knn: need every_steps >= 0 (0: off), k >= 1, temperature > 0 and location "
                          f"counts >= 0 (0: all); got {knn.every_steps}, {knn.k}, {knn.temperature}, "
                          f"{knn.train_locations}, {knn.val_locations}.")
    if config.log_every_steps <= 0 or config.checkpoint_every_steps <= 0:
        raise ConfigError(
            f"config.log_every_steps={config.log_every_steps} and config.checkpoint_every_steps="
            f"{config.checkpoint_every_steps} must both be > 0."
        )


def _validate_linear_eval(lc, num_local_devices):
    if lc.readout not in READOUTS:
        raise ConfigError(f"config.linear_eval.readout={lc.readout!r}; choose one of {list(READOUTS)}.")
    if lc.schedule not in LINEAR_EVAL_SCHEDULES:
        raise ConfigError(f"config.linear_eval.schedule={lc.schedule!r}; choose one of "
                          f"{list(LINEAR_EVAL_SCHEDULES)}.")
    if lc.num_epochs <= 0 or lc.base_lr <= 0:
        raise ConfigError("config.linear_eval.num_epochs and config.linear_eval.base_lr must be > 0.")
    if lc.global_batch <= 0 or lc.global_batch % num_local_devices:
        raise ConfigError(f"config.linear_eval.global_batch={lc.global_batch} must be a positive multiple of the "
                          f"local device count ({num_local_devices}).")
    if not MIN_IMAGE_SIZE <= lc.image_size <= lc.resize_size:
        raise ConfigError(f"config.linear_eval: need {MIN_IMAGE_SIZE} <= image_size ({lc.image_size}) <= "
                          f"resize_size ({lc.resize_size}).")
    _validate_init("config.linear_eval.init", lc.init)
    _validate_region("config.linear_eval", lc)


def _validate_finetune(fc, num_devices, num_local_devices):
    if fc.num_epochs <= 0 or fc.base_lr <= 0:
        raise ConfigError(f"config.finetune.num_epochs={fc.num_epochs} and config.finetune.base_lr={fc.base_lr} "
                          "must both be > 0.")
    if fc.global_batch <= 0 or fc.global_batch % num_devices or fc.global_batch % num_local_devices:
        fix = _nearest(max(fc.global_batch, 1), lambda b: b % num_devices == 0 and b % num_local_devices == 0)
        raise ConfigError(f"config.finetune.global_batch={fc.global_batch} must be a positive multiple of the "
                          f"device count ({num_devices}); use e.g. --config.finetune.global_batch={fix}.")
    if not 0 < fc.crop_scale[0] <= fc.crop_scale[1] <= 1:
        raise ConfigError(f"config.finetune.crop_scale={tuple(fc.crop_scale)} must satisfy 0 < min <= max <= 1.")
    if not MIN_IMAGE_SIZE <= fc.image_size <= fc.resize_size:
        raise ConfigError(f"config.finetune: need {MIN_IMAGE_SIZE} <= image_size ({fc.image_size}) <= "
                          f"resize_size ({fc.resize_size}).")
    _validate_init("config.finetune.init", fc.init)
    _validate_region("config.finetune", fc)


def _validate_init(field, init):
    """An evaluation's init: "pretrained", "random", a checkpoint directory or a readable .safetensors file."""
    if init in ("pretrained", "random") or os.path.isdir(os.path.expanduser(init)):
        return
    if init.endswith(".safetensors"):
        _validate_weights_file(field, init)
        return
    raise ConfigError(f"{field}={init!r} is not 'pretrained', 'random', a checkpoint directory or a .safetensors "
                      "file (python -m geo_contrast.convert makes one from a PyTorch checkpoint).")


def _validate_weights_file(field, path):
    try:
        safetensors_io.read_metadata(os.path.expanduser(path))
    except ValueError as e:
        raise ConfigError(f"{field}={path!r}: {e}") from e


def _validate_region(name, section):
    if section.region not in REGIONS:
        raise ConfigError(f"{name}.region={section.region!r}; choose one of {list(REGIONS)}.")
    if not section.box_context > 0:
        raise ConfigError(f"{name}.box_context={section.box_context} must be > 0 (2.0: the square is twice the "
                          "labelled box's longer side).")


def validate_against_data(config, *, num_images, num_distinct_locations):
    """The checks that need the training split's size (read from its location index, before any model exists)."""
    split = f"config.dataset.train_split={config.dataset.train_split!r}"
    batch = config.input.global_batch
    if num_images < batch:
        raise ConfigError(
            f"{split} has {num_images} images, fewer than one global batch "
            f"(config.input.global_batch={batch}); use a smaller batch or a larger split."
        )
    clusters = config.geo.num_clusters
    if uses_geo_loss(config.variant) and clusters > num_distinct_locations:
        raise ConfigError(
            f"config.geo.num_clusters={clusters} exceeds the {num_distinct_locations} distinct "
            f"locations of {split}: k-means cannot form more clusters than places; use "
            f"--config.geo.num_clusters={num_distinct_locations} or fewer."
        )


# The fields a stage may change when it resumes from its checkpoint (a section stands for all of its fields): those
# that neither shape the checkpointed state nor change the data or the updates that led to it. Any other difference
# from the checkpoint's recorded config is refused: the run would go on with the old state (its queue, its model)
# under the new value, or die of a shape error, and record the new value as if it had held from the start.
_RESUMABLE_IN_ANY_STAGE = (
    "stages", "compare_random",  # Which stages run, and after which.
    "log_every_steps", "checkpoint_every_steps", "keep_checkpoints",  # Bookkeeping.
    "dataset.data_dir", "dataset.generate_sample",  # Where the same built dataset is read.
    "input.prefetch_batches", "model.compute_dtype",  # Speed: the same parameters, computed in another precision.
    "linear_eval",  # Has no checkpoint: it runs whole, after training.
    "knn",  # A monitor: it reads the encoder and changes nothing.
)
RESUMABLE = {
    # A longer (or shorter) run: its cosine spans the new number of epochs from the resumed step on.
    "pretrain": _RESUMABLE_IN_ANY_STAGE + ("optim.num_epochs", "finetune"),
    # Fine-tuning reads none of pretraining's own fields (its backbone comes from the pretraining checkpoint, or
    # from config.model for the random init).
    "finetune": _RESUMABLE_IN_ANY_STAGE + ("finetune.num_epochs", "variant", "init_from", "input", "moco", "geo",
                                           "optim"),
}


def check_resume(recorded, config, *, stage, checkpoint):
    """Refuses (ConfigError) to resume `stage` from `checkpoint` with a `config` that differs from the one its
    run recorded (`recorded`, the metadata's JSON) in a field that RESUMABLE[stage] does not list; the message
    names every such field with both values, and the two ways out."""
    old, new = _flat(recorded), _flat(json.loads(config.to_json()))
    differing = [path for path in sorted(old.keys() | new.keys())
                 if old.get(path, _ABSENT) != new.get(path, _ABSENT)
                 and not any(path == f or path.startswith(f + ".") for f in RESUMABLE[stage])]
    if not differing:
        return
    changes = "; ".join(f"{path}={_shown(old.get(path, _ABSENT))} there, {_shown(new.get(path, _ABSENT))} now"
                        for path in differing)
    flags = " ".join(shlex.quote(f"--config.{path}={_shown(old[path])}") for path in differing if path in old)
    raise ConfigError(f"Cannot resume from {checkpoint} with another config: {changes}. To resume, pass the "
                      f"checkpoint's values ({flags}); to start a new run with the new ones, use a new --workdir.")


_ABSENT = "<absent>"


def _flat(tree, prefix=""):
    """{"moco.queue_size": 65536, ...} of a nested dict."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _shown(value):
    """A value as a --config flag takes it: JSON's lists back as the config's tuples."""
    return str(tuple(value) if isinstance(value, list) else value)
