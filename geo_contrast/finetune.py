r"""Fine-tuning: the encoder and a new linear classifier trained together on the labelled train split (the
paper's Table 1, fine-tuned column).

The released code has no fine-tuning script, so the recipe is ours (config.finetune), a standard supervised
one: torchvision's classification reference (RandomResizedCrop + horizontal flip for training, Resize + centre
crop to evaluate; SGD, momentum 0.9, weight decay 1e-4 on every parameter) with the probe's cosine learning rate
set once per epoch (classification.epoch_learning_rate) and a lower peak than training from scratch uses, the
same for every init so that the rows of Table 1 compare. BatchNorm trains on each device's batch and its running
statistics are averaged over devices, as in pretraining.

The backbone starts from `config.finetune.init` (backbones.py: a run's pretrained encoder, pretraining's random
init for "supervised, scratch", or a weights file such as torchvision's ImageNet ResNet-50 for "supervised,
ImageNet init"); the classifier is main_lincls.py's new Linear (classification.head). After every epoch the model
is scored on val and the best epoch (val top-1) is kept; test, when the dataset has it, is evaluated once with
it. Results go to WORKDIR/results.{json,md} as the fine-tuned column beside the probe's.

It runs like pretraining (train_loop.py): one pmapped step over every device of every process, each process
feeding its rows of every global batch; checkpoints (WORKDIR/finetune_<init>_checkpoints/) hold the state and
the best epoch's model, so a kill or SIGTERM loses at most `checkpoint_every_steps` and the same command resumes,
from the checkpoint's step and with the same data stream (as pretraining: past a damaged checkpoint, and only
with a config that config_lib.RESUMABLE allows).
"""

import dataclasses
import functools
import json
import os
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax import lax

from geo_contrast import backbones
from geo_contrast import checkpointing
from geo_contrast import classification
from geo_contrast import config_lib
from geo_contrast import devices
from geo_contrast import evaluation
from geo_contrast import input_pipeline
from geo_contrast import metric_writer
from geo_contrast import pixels
from geo_contrast import preemption
from geo_contrast import records
from geo_contrast import results
from geo_contrast import train_loop
from geo_contrast import workdir as workdir_lib
from geo_contrast.models import resnet

STAGE = "finetune"


class Classifier(nn.Module):
    """The backbone and the new linear classifier: images -> logits. Variables `backbone/...`, `fc/...`."""

    backbone: resnet.ResNet
    num_classes: int

    @nn.compact
    def __call__(self, images, train: bool):
        features = self.backbone(images, train=train).astype(jnp.float32)
        return classification.head(self.num_classes)(features)


@flax.struct.dataclass
class FinetuneState:
    step: jax.Array
    params: Any  # {"backbone": ..., "fc": ...}
    batch_stats: Any  # {"backbone": ...}
    opt_state: Any  # SGD momentum buffers.


def finetune_step(state, batch, lr, *, model, momentum, weight_decay):
    """One SGD step of the whole model on this device's rows {"image": uint8, "label"}; the gradients and the BN
    statistics are averaged over devices. Returns (state, metrics averaged over devices)."""
    images = pixels.standardize(batch["image"])

    def loss_fn(params):
        logits, updated = model.apply({"params": params, "batch_stats": state.batch_stats}, images, train=True,
                                      mutable=["batch_stats"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        return loss, (updated["batch_stats"], accuracy)

    (loss, (batch_stats, accuracy)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = lax.pmean(grads, devices.AXIS)
    updates, opt_state = classification.sgd_direction(momentum, weight_decay).update(grads, state.opt_state,
                                                                                      state.params)
    params = jax.tree.map(lambda p, u: p - lr * u, state.params, updates)
    metrics = lax.pmean({"loss": loss, "accuracy": accuracy}, devices.AXIS)
    metrics["lr"] = lr
    return state.replace(step=state.step + 1, params=params, batch_stats=lax.pmean(batch_stats, devices.AXIS),
                         opt_state=opt_state), metrics


@dataclasses.dataclass(frozen=True)
class Outcome:
    entry: dict | None  # The results entry written, or None when stopped before the last epoch.
    stopped_by: str | None


def finetune(config, workdir):
    """Runs (or resumes) the fine-tuning `config.finetune` describes; returns its Outcome."""
    stop = preemption.StopRequest()
    try:
        return _finetune(config, workdir, stop)
    finally:
        stop.restore()


def _apply_eval(model, variables, images):
    return model.apply(variables, images, train=False).astype(jnp.float32)


_p_apply_eval = devices.pmap(_apply_eval, local=True, static_broadcasted_argnums=(0,))


def _finetune(config, workdir, stop):
    fc = config.finetune
    builder = records.load_builder(config.dataset.name, config.dataset.data_dir)
    index = records.read_location_index(builder, config.dataset.train_split)
    steps_per_epoch = int(index.num_images.sum()) // fc.global_batch
    if steps_per_epoch < 1:
        raise config_lib.ConfigError(
            f"config.dataset.train_split={config.dataset.train_split!r} has {int(index.num_images.sum())} images, "
            f"fewer than one batch (config.finetune.global_batch={fc.global_batch}); use a smaller batch.")
    total_steps = steps_per_epoch * fc.num_epochs
    label = builder.info.features["label"]
    class_names = tuple(label.names)

    backbone = backbones.load(config, workdir, fc.init)
    key = backbones.results_key(fc.init, backbone)
    model = Classifier(backbone.module, label.num_classes)
    sgd = classification.sgd_direction(fc.momentum, fc.weight_decay)
    like = _initial(model, backbone, sgd, config.seed, fc.image_size)
    mngr = checkpointing.manager(os.path.join(workdir, workdir_lib.stage_prefix(STAGE, key) + "checkpoints"),
                                 keep=config.keep_checkpoints)
    resumed = checkpointing.restore_latest(
        mngr, {"state": like, "best": _variables(like)},
        check=lambda step, meta: config_lib.check_resume(meta["config"], config, stage=STAGE,
                                                         checkpoint=f"{mngr.directory}/{step}"))
    if resumed is None:
        start_step, state = 0, like
        best = classification.Selection(0, {"params": state.params, "batch_stats": state.batch_stats}, None)
    else:
        start_step, saved, meta = resumed
        state = saved["state"]
        best = classification.Selection(meta["best_epoch"], saved["best"], meta["best_val"])
        logging.info("Resumed fine-tuning %s from %s at step %d.", key, mngr.directory, start_step)

    host = input_pipeline.HostSlice.of_this_process()
    data = input_pipeline.supervised_dataset(
        builder, config.dataset.train_split, index, size=fc.image_size, scale=tuple(fc.crop_scale),
        region=fc.region, box_context=fc.box_context, global_batch=fc.global_batch, host=host, seed=config.seed,
        start_step=start_step)
    batches = devices.shard(data.as_numpy_iterator(), config.input.prefetch_batches)
    step_fn = functools.partial(finetune_step, model=model, momentum=fc.momentum, weight_decay=fc.weight_decay)
    p_step = devices.pmap(train_loop.with_stop_vote(step_fn), donate_argnums=(0,))
    peak = config_lib.scaled_lr(fc.base_lr, fc.global_batch)

    def lr_of(step):
        lr = classification.epoch_learning_rate(step // steps_per_epoch, peak=peak, num_epochs=fc.num_epochs,
                                                schedule="cosine", decay_epochs=())
        return (np.full(host.local_devices, lr, np.float32),)

    writer = metric_writer.MetricWriter(workdir, prefix=workdir_lib.stage_prefix(STAGE, key),
                                        resume_step=start_step)
    meta = {"init": fc.init, "key": key, "config": json.loads(config.to_json()), "total_steps": total_steps,
            "steps_per_epoch": steps_per_epoch}
    selection = [best]  # The best epoch so far, updated at each epoch's end.

    def end_of_epoch(step, state):
        if step % steps_per_epoch:
            return
        epoch = step // steps_per_epoch
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        val = _score(model, variables, builder, config.dataset.val_split, fc, class_names)
        writer.write(step, {f"val_{k}": val[k] for k in ("top1", "top5", "macro_f1", "location_top1")})
        if jax.process_index() == 0:
            print(f"finetune[{key}] epoch {epoch}/{fc.num_epochs}  val top-1 {100 * val['top1']:.2f}", flush=True)
        if selection[0].val is None or val["top1"] > selection[0].val["top1"]:
            selection[0] = classification.Selection(epoch, devices.unreplicate(variables), val)

    def save(step, state):
        best = selection[0]
        checkpointing.save(mngr, step, {"state": devices.unreplicate(state), "best": best.params},
                           {**meta, "best_epoch": best.epoch, "best_val": best.val})

    logging.info("Fine-tuning %s: %d steps/epoch, %d epochs, global batch %d on %d devices.", key,
                 steps_per_epoch, fc.num_epochs, fc.global_batch, jax.device_count())
    _, stopped_by = train_loop.train(
        p_step, devices.replicate(state), batches, mngr=mngr, writer=writer, start_step=start_step,
        end_step=total_steps, stop=stop, progress=metric_writer.Progress(total_steps, fc.global_batch, start_step),
        log_every=config.log_every_steps, checkpoint_every=config.checkpoint_every_steps, save=save,
        step_args=lr_of, checkpoint_at=lambda step: step % steps_per_epoch == 0, after_step=end_of_epoch)
    if stopped_by is not None:
        return Outcome(None, stopped_by)

    best = selection[0]
    splits = {"val": best.val}
    if config.dataset.test_split in builder.info.splits:
        splits["test"] = _score(model, devices.replicate(best.params), builder, config.dataset.test_split, fc,
                                class_names)
    protocol = {"global_batch": fc.global_batch, "peak_lr": peak, "schedule": "cosine per epoch",
                "image_size": fc.image_size, "resize_size": fc.resize_size, "crop_scale": list(fc.crop_scale),
                "region": fc.region, "momentum": fc.momentum, "weight_decay": fc.weight_decay}
    entry = classification.results_entry(
        source=backbone.source, init=fc.init, backbone_module=backbone.module, dataset=config.dataset.name,
        selected={"selected_epoch": best.epoch, "num_epochs": fc.num_epochs}, protocol=protocol, splits=splits)
    if jax.process_index() == 0:
        print(results.update(workdir, key, entry, stage=STAGE), flush=True)
    return Outcome(entry, None)


def _variables(state):
    return {"params": state.params, "batch_stats": state.batch_stats}


def _initial(model, backbone, sgd, seed, image_size):
    """The first state: the init's backbone variables and a new classifier, on the host."""
    dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    init = jax.jit(functools.partial(model.init, train=False))
    variables = jax.device_get(init(jax.random.PRNGKey(seed), dummy))
    params = {**variables["params"], "backbone": backbone.variables["params"]}
    batch_stats = {**variables["batch_stats"], "backbone": backbone.variables["batch_stats"]}
    return FinetuneState(step=np.zeros((), np.int32), params=params, batch_stats=batch_stats,
                         opt_state=jax.device_get(sgd.init(params)))


def _score(model, variables, builder, split, views, class_names):
    """Every reported metric of the model (replicated `variables`) on `split` under the eval view."""
    scored = evaluation.forward_split(functools.partial(_p_apply_eval, model), variables, builder, split, views)
    return classification.report(scored.outputs, scored, class_names)
