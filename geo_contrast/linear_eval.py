r"""The linear probe: a linear classifier on the frozen backbone's pooled features (the paper's Tables 1 and 2).

Protocol (config.linear_eval; the released main_lincls.py): the backbone `init` names (backbones.py), frozen with
BatchNorm in inference mode (running statistics), its globally pooled features (2048-d for ResNet-50) into a new
classifier (classification.head). SGD with momentum 0.9 and weight decay 0 (torch's SGD: decay added to the
gradient before the momentum buffer), lr = base_lr x global_batch / 256 (the released code does not scale: at its
batch of 256 the two agree), constant within an epoch (classification.epoch_learning_rate). Training images:
resize the shorter side to `resize_size` + random crop `image_size`; evaluation: resize + centre crop (the views
are input_pipeline's). Every training image is seen once per epoch (the last batch padded and masked).

Selection (classification.select): after every epoch the classifier is scored on val and the epoch with the
best val top-1 is kept; test, when the built dataset has the labelled `config.dataset.test_split`, is evaluated
once with it. Val and test features are deterministic under the eval transform, so they are extracted once.
Reported per split: top-1, top-5, macro-F1 over images and per location (Table 2), per-class F1; written to
WORKDIR/results.{json,md}, with the per-epoch train loss and val metrics in
WORKDIR/linear_eval_<init>_metrics.jsonl.

`config.linear_eval.cache_features=True`, the fast path, extracts every training image's features once under the
*eval* transform and trains the classifier on those fixed vectors; the released protocol instead passes a fresh
random crop of every image through the frozen backbone each epoch. It costs one backbone pass instead of
num_epochs, but sees no augmentation, so its numbers can differ a little from the protocol's.

Every process runs the whole probe on its own devices (devices.pmap(local=True), the batch split over them): the
work is small next to pretraining and needs no cross-host traffic; the results are identical and process 0
writes them.
"""

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax import lax

from geo_contrast import backbones
from geo_contrast import classification
from geo_contrast import config_lib
from geo_contrast import devices
from geo_contrast import evaluation
from geo_contrast import input_pipeline
from geo_contrast import logistic
from geo_contrast import metric_writer
from geo_contrast import records
from geo_contrast import results
from geo_contrast import workdir as workdir_lib


# ---------------------------------------------------------------------------------------------------------------
# Features of a split, extracted once


def extract_split(module, variables, builder, split, lc):
    """Features of every image of `split` under the eval transform (`.outputs`); `variables` replicated."""
    return evaluation.forward_split(evaluation.features_of(module), variables, builder, split, lc)


def feature_batches(features, labels, batch_size, *, seed, epoch):
    """One epoch of padded batches {"inputs": features, "label", "weight"} in a (seed, epoch) permutation."""
    order = input_pipeline.epoch_order(seed, epoch, len(labels))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        yield input_pipeline.pad_batch({"inputs": features[rows], "label": labels[rows]}, batch_size)


# ---------------------------------------------------------------------------------------------------------------
# The classifier and its training


@flax.struct.dataclass
class ProbeState:
    backbone: Any  # Frozen ResNet variables, carried (as main_lincls's model carries them) but never updated.
    head: Any  # The classifier's params.
    opt_state: Any  # SGD momentum buffer.


def init_probe_state(backbone_variables, head, feature_dim, *, seed, momentum, weight_decay):
    params = head.init(jax.random.PRNGKey(seed), jnp.zeros((1, feature_dim)))["params"]
    return ProbeState(backbone=backbone_variables, head=params,
                      opt_state=classification.sgd_direction(momentum, weight_decay).init(params))


def probe_step(state, batch, lr, backbone, head, momentum, weight_decay):
    """One SGD step of the classifier on this device's rows {"inputs", "label", "weight"}; returns (state, mean
    loss over the real rows of all devices).

    backbone None: the inputs are cached features. Otherwise they are images, encoded here by the frozen
    backbone in inference mode, with the gradient stopped at the features. The loss is the mean over the real
    rows of every device's part of the batch, so each device's gradient is its share and their sum is the
    gradient of the whole batch.
    """
    features = batch["inputs"]
    if backbone is not None:
        features = lax.stop_gradient(evaluation.backbone_features(backbone, state.backbone, features))
    count = jnp.maximum(lax.psum(jnp.sum(batch["weight"]), devices.AXIS), 1.0)

    def loss_fn(params):
        logits = head.apply({"params": params}, features)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        return jnp.sum(losses * batch["weight"]) / count

    loss, grads = jax.value_and_grad(loss_fn)(state.head)
    grads = lax.psum(grads, devices.AXIS)
    sgd = classification.sgd_direction(momentum, weight_decay)
    updates, opt_state = sgd.update(grads, state.opt_state, state.head)
    params = jax.tree.map(lambda p, u: p - lr * u, state.head, updates)
    return state.replace(head=params, opt_state=opt_state), lax.psum(loss, devices.AXIS)


_p_probe_step = devices.pmap(probe_step, local=True, static_broadcasted_argnums=(3, 4, 5, 6))


def evaluate_split(head, params, split, class_names):
    """Every reported metric of the classifier `params` (host arrays) on the extracted `split`."""
    return classification.report(classification.head_logits(head, params, split.outputs), split, class_names)


def train_classifier(state, epoch_batches, val, class_names, *, lc, head, backbone, writer, name):
    """Trains for lc.num_epochs epochs, scoring val after each; returns (final state, the best val Selection).

    `state` is replicated; epoch_batches(epoch) yields one epoch of padded host batches; `backbone` is None when
    they hold features.
    """
    peak = config_lib.scaled_lr(lc.base_lr, lc.global_batch)
    num_devices = jax.local_device_count()
    best = None
    for epoch in range(lc.num_epochs):
        lr = classification.epoch_learning_rate(epoch, peak=peak, num_epochs=lc.num_epochs, schedule=lc.schedule,
                                                decay_epochs=tuple(lc.decay_epochs))
        losses, counts = [], []
        for batch in epoch_batches(epoch):
            state, loss = _p_probe_step(state, devices.split_rows(batch, num_devices),
                                        np.full(num_devices, lr, np.float32), backbone, head, lc.momentum,
                                        lc.weight_decay)
            losses.append(loss)
            counts.append(batch["weight"].sum())
        train_loss = float(np.dot(devices.unreplicate(jax.device_get(losses)), counts) / np.sum(counts))
        if not np.isfinite(train_loss):
            raise FloatingPointError(f"Linear evaluation loss is {train_loss} in epoch {epoch + 1}; lower "
                                     f"config.linear_eval.base_lr (now {lc.base_lr}).")
        params = devices.unreplicate(state.head)
        report = evaluate_split(head, params, val, class_names)
        writer.write(epoch + 1, {"train_loss": train_loss, "lr": lr, **{
            f"val_{k}": report[k] for k in ("top1", "top5", "macro_f1", "location_top1")}})
        print(f"linear_eval[{name}] epoch {epoch + 1}/{lc.num_epochs}  lr {lr:.4g}  train loss {train_loss:.4f}  "
              f"val top-1 {100 * report['top1']:.2f}", flush=True)
        best = classification.select(best, epoch + 1, params, report)
    return state, best


# ---------------------------------------------------------------------------------------------------------------
# The stage


def evaluate(config, workdir):
    """Runs the linear evaluation `config.linear_eval` describes; returns the results entry it writes."""
    lc = config.linear_eval
    builder = records.load_builder(config.dataset.name, config.dataset.data_dir)
    label_feature = builder.info.features["label"]
    class_names = tuple(label_feature.names)
    backbone = backbones.load(config, workdir, lc.init)
    key = backbones.results_key(lc.init, backbone)
    variables = devices.replicate(backbone.variables)
    extract = functools.partial(extract_split, backbone.module, variables, builder, lc=lc)
    # A probe is never resumed: a rerun trains from the start and replaces the earlier run's per-epoch rows.
    writer = metric_writer.MetricWriter(workdir, prefix=workdir_lib.stage_prefix("linear_eval", key),
                                        resume_step=0)
    test = config.dataset.test_split if config.dataset.test_split in builder.info.splits else None
    try:
        readout = _logistic if lc.readout == "logistic" else _sgd_probe
        splits, selected, protocol = readout(config, builder, extract, label_feature.num_classes, class_names,
                                             backbone, writer, key, test)
    finally:
        writer.close()
    entry = classification.results_entry(
        source=backbone.source, init=lc.init, backbone_module=backbone.module, dataset=config.dataset.name,
        selected=selected, protocol={"readout": lc.readout, "image_size": lc.image_size,
                                     "resize_size": lc.resize_size, "region": lc.region, **protocol},
        splits=splits)
    if jax.process_index() == 0:
        print(results.update(workdir, key, entry), flush=True)
    return entry


def _sgd_probe(config, builder, extract, num_classes, class_names, backbone, writer, key, test):
    """The released protocol: SGD epochs on the classifier, the best val epoch kept, test scored once."""
    lc = config.linear_eval
    val = extract(config.dataset.val_split)
    if lc.cache_features:
        train = extract(config.dataset.train_split)
        step_backbone = None
        epoch_batches = functools.partial(feature_batches, train.outputs, train.labels, lc.global_batch,
                                          seed=config.seed)
    else:
        step_backbone = backbone.module
        epoch_batches = functools.partial(
            input_pipeline.lincls_train_batches, builder, config.dataset.train_split,
            records.read_location_index(builder, config.dataset.train_split), image_size=lc.image_size,
            resize_size=lc.resize_size, batch_size=lc.global_batch, seed=config.seed, region=lc.region,
            box_context=lc.box_context)
    head = classification.head(num_classes)
    state = init_probe_state(backbone.variables, head, backbone.module.feature_dim, seed=config.seed,
                             momentum=lc.momentum, weight_decay=lc.weight_decay)
    _, best = train_classifier(devices.replicate(state), lambda epoch: epoch_batches(epoch=epoch), val,
                               class_names, lc=lc, head=head, backbone=step_backbone, writer=writer, name=key)
    splits = {"val": best.val}
    if test is not None:
        splits["test"] = evaluate_split(head, best.params, extract(test), class_names)
    protocol = {"cache_features": bool(lc.cache_features), "global_batch": lc.global_batch,
                "peak_lr": config_lib.scaled_lr(lc.base_lr, lc.global_batch), "schedule": lc.schedule}
    return splits, {"selected_epoch": best.epoch, "num_epochs": lc.num_epochs}, protocol


def _logistic(config, builder, extract, num_classes, class_names, backbone, writer, key, test):
    """The converged readout (logistic.py): standardised features, L2 logistic regression for each strength,
    the best val top-1 kept, test scored once."""
    train, val = extract(config.dataset.train_split), extract(config.dataset.val_split)
    fit, standardise, scores = logistic.fit_on_val(train.outputs, train.labels, val.outputs, val.labels,
                                                   num_classes)
    for i, (strength, top1) in enumerate(sorted(scores.items(), reverse=True), start=1):
        writer.write(i, {"l2": strength, "val_top1": top1})
    if not fit.converged:
        logging.warning("linear_eval[%s]: the logistic regression at l2=%g stopped before converging.", key,
                        fit.strength)
    if jax.process_index() == 0:
        print(f"linear_eval[{key}] logistic readout: l2 {fit.strength:.3g} selected on val "
              f"(top-1 {100 * scores[fit.strength]:.2f}) from {len(scores)} strengths", flush=True)
    splits = {"val": classification.report(fit.logits(standardise(val.outputs)), val, class_names)}
    if test is not None:
        scored = extract(test)
        splits["test"] = classification.report(fit.logits(standardise(scored.outputs)), scored, class_names)
    return splits, {"selected_l2": fit.strength}, {"strengths": len(scores), "converged": fit.converged}
