r"""Linear evaluation: a linear classifier on the frozen backbone's pooled features (the paper's Tables 1 and 2).

Protocol (config.linear_eval; the released main_lincls.py): the pretraining query encoder's ResNet, frozen with
BatchNorm in inference mode (running statistics), its globally pooled features (2048-d for ResNet-50) into a new
Dense layer over the dataset's classes, initialised N(0, 0.01) with zero bias. SGD with momentum 0.9 and weight
decay 0 (torch's SGD: decay added to the gradient before the momentum buffer), lr = base_lr x global_batch / 256
(the released code does not scale: at its batch of 256 the two agree), constant within an epoch and x0.1 at each
of `decay_epochs` ("step") or half-cosine over the epochs ("cosine"). Training images: resize the shorter side to
`resize_size` + random crop `image_size`; evaluation: resize + centre crop. Every training image is seen once per
epoch (the last batch is padded and masked, as torch's DataLoader keeps a partial batch).

Model selection is on val: after every epoch the classifier is scored on val and the epoch with the best val top-1
(the earliest on ties) is kept. Test, when the built dataset has the labelled `config.dataset.test_split`, is
evaluated once, with the selected classifier (the released script picks the best epoch on test; we do not). Val
and test features are deterministic under the eval transform, so they are extracted once.

Reported per evaluated split (see eval_metrics): top-1, top-5 and macro-F1 over images, the same per location
(softmax summed over a location's images, Table 2) and per-class F1; written to WORKDIR/results.{json,md} (see
results.py) with the per-epoch train loss and val metrics in WORKDIR/linear_eval_<init>_metrics.jsonl.

`config.linear_eval.init`: "pretrained" (the latest checkpoint in WORKDIR/checkpoints), a checkpoint path (an
orbax step directory or a directory of them), or "random" (pretraining's initial query encoder for config.seed:
the floor every pretrained result is compared with). A checkpoint's backbone architecture comes from the
pretraining config stored in its metadata.

`config.linear_eval.cache_features=True`, the fast path, extracts every training image's features once under the
*eval* transform and trains the classifier on those fixed vectors; the released protocol instead passes a fresh
random crop of every image through the frozen backbone each epoch. It costs one backbone pass instead of
num_epochs, but sees no augmentation, so its numbers can differ a little from the protocol's.

Every process runs the whole evaluation on its own local devices (the batch sharded over them): the work is small
next to pretraining and needs no cross-host traffic; the results are identical and process 0 writes them.
"""

import dataclasses
import functools
import math
import os
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import tensorflow as tf
from absl import logging
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from geo_contrast import augment
from geo_contrast import checkpointing
from geo_contrast import config_lib
from geo_contrast import eval_metrics
from geo_contrast import input_pipeline
from geo_contrast import metric_writer
from geo_contrast import pretrain
from geo_contrast import train_setup
from geo_contrast import results
from geo_contrast.models import resnet

SCHEDULES = ("step", "cosine")
_DATA_AXIS = "batch"
# One initializer object for every head, so heads over the same classes are equal (hashable static args of jit).
_HEAD_KERNEL_INIT = nn.initializers.normal(stddev=0.01)


# ---------------------------------------------------------------------------------------------------------------
# Backbone: the frozen ResNet of a pretraining checkpoint, or pretraining's initial one


@dataclasses.dataclass(frozen=True)
class Backbone:
    module: resnet.ResNet
    variables: Any  # {"params", "batch_stats"} of the ResNet, host arrays.
    source: dict  # JSON-able: checkpoint, pretrain_step, pretrain_total_steps, variant.


def load_backbone(config, workdir):
    """The backbone `config.linear_eval.init` names (see the module docstring), in config.model.compute_dtype."""
    init = config.linear_eval.init
    if init == "random":
        model_config = config
        state = _pretraining_state(config)
        source = {"checkpoint": None, "pretrain_step": None, "pretrain_total_steps": None, "variant": None}
    else:
        directory, step = find_checkpoint(init, workdir)
        reader = checkpointing.reader(directory)
        meta = reader.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if "config" not in meta:
            raise ValueError(f"Checkpoint {directory}/{step} has no pretraining config in its metadata; it was "
                             "not written by geo_contrast.pretrain.")
        model_config = ml_collections.ConfigDict(meta["config"])
        state, _ = checkpointing.restore(reader, step, _pretraining_state(model_config))
        source = {"checkpoint": os.path.join(directory, str(step)), "pretrain_step": step,
                  "pretrain_total_steps": meta.get("total_steps"), "variant": model_config.variant}
        logging.info("Linear evaluation of %s (variant %s, ResNet-%d width %d, step %d).", source["checkpoint"],
                     model_config.variant, model_config.model.depth, model_config.model.width, step)
    module = resnet.ResNet(depth=model_config.model.depth, width=model_config.model.width,
                           dtype=train_setup.compute_dtype(config.model.compute_dtype))
    variables = {"params": state.params["encoder"]["backbone"], "batch_stats": state.batch_stats["backbone"]}
    return Backbone(module, variables, source)


def find_checkpoint(init, workdir):
    """(checkpoints directory, step) of init "pretrained" or a path; a clear error when there is none."""
    if init == "pretrained":
        directory = os.path.join(workdir, pretrain.CHECKPOINT_DIR)
        step = checkpointing.reader(directory).latest_step()
        if step is None:
            raise FileNotFoundError(
                f"config.linear_eval.init='pretrained' but {directory} holds no pretraining checkpoint. Run the "
                "pretrain stage first (config.stages='pretrain,linear_eval'), or set "
                "--config.linear_eval.init=random (or a checkpoint path).")
        return directory, step
    path = os.path.abspath(os.path.expanduser(init)).rstrip(os.sep)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"config.linear_eval.init={init!r} is not 'pretrained', 'random' or an existing "
                                "checkpoint directory.")
    parent, name = os.path.split(path)
    if name.isdigit() and int(name) in checkpointing.reader(parent).all_steps():
        return parent, int(name)
    step = checkpointing.reader(path).latest_step()
    if step is None:
        raise FileNotFoundError(f"config.linear_eval.init={init!r}: {path} is neither a checkpoint step "
                                "directory nor a directory of checkpoints.")
    return path, step


def _pretraining_state(config):
    """Pretraining's initial TrainState for `config`, on the host: the restore template, and init "random"."""
    return train_setup.initial_state(config)


def backbone_features(module, variables, images):
    """Pooled features of the backbone in inference mode (BN running statistics, nothing updated), float32."""
    return module.apply(variables, images, train=False).astype(jnp.float32)


_jit_features = jax.jit(backbone_features, static_argnums=0)


# ---------------------------------------------------------------------------------------------------------------
# Data: one element per image (the stored examples are locations)


def split_images(builder, split):
    """One element per image of `split`: {"image": encoded JPEG, "label", "location": the location's index}.

    Locations are read in the split's stored order, so the index is stable across reads.
    """
    locations = input_pipeline.encoded_locations(builder, split)

    def expand(index, example):
        images = example["images"]
        n = tf.shape(images)[0]
        return tf.data.Dataset.from_tensor_slices(
            {"image": images, "label": tf.fill([n], example["label"]), "location": tf.fill([n], index)})

    return locations.enumerate().flat_map(expand)


def pad_batch(batch, size):
    """Zero-pads every array of `batch` to `size` rows and adds "weight": 1 for real rows, 0 for padding."""
    n = len(next(iter(batch.values())))
    if n > size:
        raise ValueError(f"pad_batch: batch of {n} rows exceeds size {size}.")
    padded = {k: np.concatenate([v, np.zeros((size - n,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}
    padded["weight"] = (np.arange(size) < n).astype(np.float32)
    return padded


def _padded_batches(dataset, batch_size):
    options = tf.data.Options()
    options.deterministic = True
    dataset = dataset.batch(batch_size).prefetch(2).with_options(options)
    for batch in dataset.as_numpy_iterator():
        yield pad_batch(batch, batch_size)


def eval_batches(builder, split, lc):
    """Padded batches {"image", "label", "location", "weight"} of `split` under the eval transform."""
    dataset = split_images(builder, split).map(
        lambda ex: {**ex, "image": augment.eval_view(ex["image"], lc.image_size, lc.resize_size)},
        num_parallel_calls=tf.data.AUTOTUNE)
    return _padded_batches(dataset, lc.global_batch)


def augmented_batches(builder, split, lc, *, seed, epoch, shuffle_buffer):
    """One epoch of padded batches {"inputs": augmented images, "label", "weight"} of `split`, shuffled.

    Shuffle order and crops are functions of (seed, epoch, position), so a rerun sees the same epochs.
    """
    epoch_seed = seed * 1_000_003 + epoch

    def view(index, ex):
        crop_seed = tf.random.experimental.stateless_fold_in(tf.constant([seed, epoch], tf.int64), index)
        return {"inputs": augment.train_view_lincls(ex["image"], crop_seed, lc.image_size, lc.resize_size),
                "label": ex["label"]}

    dataset = (split_images(builder, split).shuffle(shuffle_buffer, seed=epoch_seed).enumerate()
               .map(view, num_parallel_calls=tf.data.AUTOTUNE))
    return _padded_batches(dataset, lc.global_batch)


def feature_batches(features, labels, batch_size, *, seed, epoch):
    """One epoch of padded batches {"inputs": features, "label", "weight"} in a (seed, epoch) permutation."""
    order = np.random.default_rng([seed, epoch]).permutation(len(labels))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        yield pad_batch({"inputs": features[rows], "label": labels[rows]}, batch_size)


# ---------------------------------------------------------------------------------------------------------------
# Features of a split, extracted once


@dataclasses.dataclass(frozen=True)
class SplitData:
    name: str
    features: np.ndarray  # [N, F] float32, eval transform.
    labels: np.ndarray  # [N] int64.
    locations: np.ndarray  # [N] int64, the location's index in the split.


def extract_split(backbone, variables, builder, split, lc, mesh):
    """Features of every image of `split` under the eval transform; `variables` already on `mesh`."""
    start = time.monotonic()
    features, labels, locations = [], [], []

    def collect(pending):
        out, batch = pending
        n = int(batch["weight"].sum())  # Padding is only ever at the end of a batch.
        features.append(np.asarray(out)[:n])
        labels.append(batch["label"][:n])
        locations.append(batch["location"][:n])

    pending = None
    for batch in eval_batches(builder, split, lc):
        out = _jit_features(backbone, variables, _shard(batch["image"], mesh))
        if pending is not None:  # Fetch the previous batch while this one computes.
            collect(pending)
        pending = (out, batch)
    if pending is None:
        raise ValueError(f"Split {split!r} of {builder.info.full_name} has no images.")
    collect(pending)
    data = SplitData(split, np.concatenate(features), np.concatenate(labels).astype(np.int64),
                     np.concatenate(locations).astype(np.int64))
    logging.info("Extracted %s features of %d %s images in %.0f s.", data.features.shape[1:], len(data.labels),
                 split, time.monotonic() - start)
    return data


# ---------------------------------------------------------------------------------------------------------------
# The classifier and its training


def classifier_head(num_classes):
    """main_lincls.py's new fc: Linear(feature_dim, num_classes), weight N(0, 0.01), bias 0."""
    return nn.Dense(num_classes, kernel_init=_HEAD_KERNEL_INIT, bias_init=nn.initializers.zeros, name="fc")


@flax.struct.dataclass
class ProbeState:
    backbone: Any  # Frozen ResNet variables, carried (as main_lincls's model carries them) but never updated.
    head: Any  # The classifier's params.
    opt_state: Any  # SGD momentum buffer.


def _sgd(momentum, weight_decay):
    """torch.optim.SGD without the lr: decay added to the gradient, then the momentum buffer (lr applied in
    the step, so it can change per epoch without recompiling)."""
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.trace(decay=momentum))


def init_probe_state(backbone_variables, head, feature_dim, *, seed, momentum, weight_decay):
    params = head.init(jax.random.PRNGKey(seed), jnp.zeros((1, feature_dim)))["params"]
    return ProbeState(backbone=backbone_variables, head=params,
                      opt_state=_sgd(momentum, weight_decay).init(params))


@functools.partial(jax.jit, static_argnames=("backbone", "head", "momentum", "weight_decay"))
def train_step(state, batch, lr, *, backbone, head, momentum, weight_decay):
    """One SGD step of the classifier on {"inputs", "label", "weight"}; returns (state, mean loss).

    backbone None: the inputs are cached features. Otherwise they are images, encoded here by the frozen
    backbone in inference mode, with the gradient stopped at the features.
    """
    features = batch["inputs"]
    if backbone is not None:
        features = lax.stop_gradient(backbone_features(backbone, state.backbone, features))

    def loss_fn(params):
        logits = head.apply({"params": params}, features)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        return jnp.sum(losses * batch["weight"]) / jnp.maximum(jnp.sum(batch["weight"]), 1.0)

    loss, grads = jax.value_and_grad(loss_fn)(state.head)
    updates, opt_state = _sgd(momentum, weight_decay).update(grads, state.opt_state, state.head)
    params = jax.tree.map(lambda p, u: p - lr * u, state.head, updates)
    return state.replace(head=params, opt_state=opt_state), loss


def epoch_learning_rate(epoch, *, peak, num_epochs, schedule, decay_epochs):
    """main_lincls.py's adjust_learning_rate for 0-based `epoch`: x0.1 per passed milestone, or half-cosine."""
    if schedule == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * epoch / num_epochs))
    return peak * 0.1 ** sum(epoch >= milestone for milestone in decay_epochs)


@functools.partial(jax.jit, static_argnums=0)
def _logits(head, params, features):
    return head.apply({"params": params}, features)


def evaluate_split(head, params, split, class_names):
    """Every reported metric of the classifier `params` (host arrays) on the extracted `split`."""
    probs = eval_metrics.softmax(np.asarray(_logits(head, params, split.features)))
    return eval_metrics.classification_report(probs, split.labels, split.locations, class_names)


@dataclasses.dataclass(frozen=True)
class Selection:
    epoch: int  # 1-based.
    params: Any  # The classifier after that epoch, host arrays.
    val: dict  # Its val report.


def train_classifier(state, epoch_batches, val, class_names, *, lc, head, backbone, mesh, writer, name):
    """Trains for lc.num_epochs epochs, scoring val after each; returns (final state, the best val Selection).

    epoch_batches(epoch) yields one epoch of padded batches; `backbone` is None when they hold features.
    """
    peak = lc.base_lr * lc.global_batch / 256
    best = None
    for epoch in range(lc.num_epochs):
        lr = epoch_learning_rate(epoch, peak=peak, num_epochs=lc.num_epochs, schedule=lc.schedule,
                                 decay_epochs=tuple(lc.decay_epochs))
        losses, counts = [], []
        for batch in epoch_batches(epoch):
            state, loss = train_step(state, _shard(batch, mesh), lr, backbone=backbone, head=head,
                                     momentum=lc.momentum, weight_decay=lc.weight_decay)
            losses.append(loss)
            counts.append(batch["weight"].sum())
        train_loss = float(np.dot(jax.device_get(losses), counts) / np.sum(counts))
        if not np.isfinite(train_loss):
            raise FloatingPointError(f"Linear evaluation loss is {train_loss} in epoch {epoch + 1}; lower "
                                     f"config.linear_eval.base_lr (now {lc.base_lr}).")
        params = jax.device_get(state.head)
        report = evaluate_split(head, params, val, class_names)
        writer.write(epoch + 1, {"train_loss": train_loss, "lr": lr, **{
            f"val_{k}": report[k] for k in ("top1", "top5", "macro_f1", "location_top1")}})
        print(f"linear_eval[{name}] epoch {epoch + 1}/{lc.num_epochs}  lr {lr:.4g}  train loss {train_loss:.4f}  "
              f"val top-1 {100 * report['top1']:.2f}", flush=True)
        if best is None or report["top1"] > best.val["top1"]:
            best = Selection(epoch + 1, params, report)
    return state, best


# ---------------------------------------------------------------------------------------------------------------
# The stage


def evaluate(config, workdir):
    """Runs the linear evaluation `config.linear_eval` describes; returns the results entry it writes."""
    lc = config.linear_eval
    mesh = Mesh(np.array(jax.local_devices()), (_DATA_AXIS,))
    validate(lc, mesh.size)
    builder = input_pipeline.load_builder(config.dataset.name, config.dataset.data_dir)
    label_feature = builder.info.features["label"]
    class_names = tuple(label_feature.names)
    backbone = load_backbone(config, workdir)
    key = lc.init if lc.init in ("pretrained", results.RANDOM) else backbone.source["checkpoint"]
    variables = _replicate(backbone.variables, mesh)
    extract = functools.partial(extract_split, backbone.module, variables, builder, lc=lc, mesh=mesh)

    val = extract(config.dataset.val_split)
    if lc.cache_features:
        train = extract(config.dataset.train_split)
        step_backbone = None
        epoch_batches = functools.partial(feature_batches, train.features, train.labels, lc.global_batch,
                                          seed=config.seed)
    else:
        step_backbone = backbone.module
        epoch_batches = functools.partial(augmented_batches, builder, config.dataset.train_split, lc,
                                          seed=config.seed, shuffle_buffer=config.input.shuffle_buffer)
    head = classifier_head(label_feature.num_classes)
    state = init_probe_state(variables, head, backbone.module.feature_dim, seed=config.seed,
                             momentum=lc.momentum, weight_decay=lc.weight_decay)
    state = _replicate(state, mesh)
    # A probe is never resumed: a rerun trains from epoch 1 and replaces the earlier run's per-epoch rows.
    writer = metric_writer.MetricWriter(workdir, prefix=f"linear_eval_{results.slug(key)}_", resume_step=0)
    try:
        _, best = train_classifier(state, lambda epoch: epoch_batches(epoch=epoch), val, class_names, lc=lc,
                                   head=head, backbone=step_backbone, mesh=mesh, writer=writer, name=key)
    finally:
        writer.close()

    splits = {"val": best.val}
    if config.dataset.test_split in builder.info.splits:
        test = extract(config.dataset.test_split)
        splits["test"] = evaluate_split(head, best.params, test, class_names)
    entry = {
        **backbone.source,
        "init": lc.init,
        "backbone": f"ResNet-{backbone.module.depth}" + (
            "" if backbone.module.width == 64 else f" (width {backbone.module.width})"),
        "dataset": config.dataset.name,
        "num_epochs": lc.num_epochs,
        "selected_epoch": best.epoch,
        "selection": "best val top-1",
        "protocol": {"cache_features": bool(lc.cache_features), "global_batch": lc.global_batch,
                     "peak_lr": lc.base_lr * lc.global_batch / 256, "schedule": lc.schedule,
                     "image_size": lc.image_size, "resize_size": lc.resize_size},
        "splits": splits,
    }
    if jax.process_index() == 0:
        print(results.update(workdir, key, entry), flush=True)
    return entry


def validate(lc, num_local_devices):
    """Refuses impossible config.linear_eval values before any data is read, naming the field."""
    if lc.schedule not in SCHEDULES:
        raise config_lib.ConfigError(f"config.linear_eval.schedule={lc.schedule!r}; choose one of {list(SCHEDULES)}.")
    if lc.num_epochs <= 0 or lc.base_lr <= 0:
        raise config_lib.ConfigError("config.linear_eval.num_epochs and config.linear_eval.base_lr must be > 0.")
    if lc.global_batch <= 0 or lc.global_batch % num_local_devices:
        raise config_lib.ConfigError(f"config.linear_eval.global_batch={lc.global_batch} must be a positive multiple of the "
                         f"local device count ({num_local_devices}).")
    if not 0 < lc.image_size <= lc.resize_size:
        raise config_lib.ConfigError(f"config.linear_eval: need 0 < image_size ({lc.image_size}) <= resize_size "
                         f"({lc.resize_size}).")
    if not lc.init:
        raise config_lib.ConfigError("config.linear_eval.init is empty; use 'pretrained', 'random' or a checkpoint path.")


def _shard(tree, mesh):
    """Splits every array's leading (batch) axis over the local devices."""
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec(_DATA_AXIS)))


def _replicate(tree, mesh):
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))
