"""The pretraining loop: data, state, pmapped MoCo step, checkpoints, metrics, signals.

Reads a built fMoW(-format) TFDS dataset, fits (or reloads) the geo clusters, and runs `train_step.train_step`
under `jax.pmap` until `config.optim.num_epochs` epochs of images are done. Everything the run needs to
resume exactly (state, queue, RNG, data position = step) is in the checkpoint; the clusters are in
`WORKDIR/geo_clusters.npz`.
"""

import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tensorflow_datasets as tfds
from absl import logging
from flax import jax_utils

from geo_contrast import checkpointing
from geo_contrast import config_lib
from geo_contrast import geo_clusters
from geo_contrast import input_pipeline
from geo_contrast import metric_writer
from geo_contrast import preemption
from geo_contrast import replication
from geo_contrast import train_step as ts
from geo_contrast.models import moco
from geo_contrast.models import resnet

CLUSTERS_FILE = "geo_clusters.npz"
CHECKPOINT_DIR = "checkpoints"


class NonFiniteLossError(FloatingPointError):
    pass


def compute_dtype(name):
    """"auto" means bfloat16 where matrix units want it (TPU/GPU) and float32 on CPU."""
    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return jnp.dtype(name)


def build_encoder(model_config, dtype=jnp.float32):
    """The query/key encoder (backbone + projection head) a config describes."""
    return moco.Encoder(resnet.ResNet(depth=model_config.depth, width=model_config.width, dtype=dtype),
                        embed_dim=model_config.projection_dim)


def learning_rate_schedule(config, total_steps):
    """SGD lr 0.03 x global_batch / 256 with a cosine decay to 0 over the run (MoCo-v2)."""
    peak = config.optim.base_lr * config.input.global_batch / 256
    return optax.cosine_decay_schedule(peak, decay_steps=max(total_steps, 1))


def optimizer(config, lr_fn):
    """torch.optim.SGD(momentum, weight_decay) as the authors ran it: decay added to the gradient of every
    parameter before the momentum buffer."""
    return optax.chain(optax.add_decayed_weights(config.optim.weight_decay),
                       optax.sgd(lr_fn, momentum=config.optim.momentum))


def init_state(config, encoder, geo_head, tx, image_size, seed):
    """A fresh TrainState on the host: key encoder = query encoder, queue = random unit vectors."""
    init_key, queue_key, step_key = jax.random.split(jax.random.PRNGKey(seed), 3)
    dummy = jnp.zeros((2, image_size, image_size, 3), jnp.float32)
    variables = encoder.init(init_key, dummy, train=False)
    params = {"encoder": variables["params"]}
    if geo_head is not None:
        params["geo_head"] = geo_head.init(init_key, jnp.zeros((1, config.model.projection_dim)))["params"]
    queue = jax.random.normal(queue_key, (config.moco.queue_size, config.model.projection_dim))
    queue = queue / jnp.linalg.norm(queue, axis=1, keepdims=True)
    return ts.TrainState(
        step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables["batch_stats"],
        key_params=variables["params"], key_batch_stats=variables["batch_stats"], opt_state=tx.init(params),
        queue=queue, queue_ptr=jnp.zeros((), jnp.int32), rng=step_key)


def fit_or_load_clusters(config, workdir, train_index):
    """K-means centroids of the training images' coordinates, fitted once per run and then reloaded."""
    path = os.path.join(workdir, CLUSTERS_FILE)
    if os.path.exists(path):
        with np.load(path) as f:
            centroids = f["centroids"]
        if len(centroids) != config.geo.num_clusters:
            raise ValueError(f"{path} holds {len(centroids)} clusters but config.geo.num_clusters="
                             f"{config.geo.num_clusters}; use a new --workdir or the same value.")
        return centroids
    centroids = geo_clusters.fit(train_index.image_coordinates, config.geo.num_clusters, seed=config.seed)
    if jax.process_index() == 0:
        tmp = path + ".tmp.npz"
        np.savez(tmp, centroids=centroids, centroids_latlon=geo_clusters.centroids_latlon(centroids))
        os.replace(tmp, path)
    return centroids


def pretrain(config, workdir):
    """Runs (or resumes) pretraining; returns the final step."""
    num_devices = jax.device_count()
    config_lib.validate_pretrain(config, num_devices)
    use_geo = config_lib.uses_geo_loss(config.variant)
    temporal = config_lib.uses_temporal_positives(config.variant)
    mngr = checkpointing.manager(os.path.join(workdir, CHECKPOINT_DIR), keep=config.keep_checkpoints)

    builder = input_pipeline.load_builder(config.dataset.name, config.dataset.data_dir)
    train_index = input_pipeline.read_location_index(builder, config.dataset.train_split)
    local_index = input_pipeline.read_location_index(
        builder, tfds.split_for_jax_process(config.dataset.train_split))
    total_images = int(train_index.num_images.sum())
    global_batch = config.input.global_batch
    steps_per_epoch = total_images // global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"The train split has {total_images} images, fewer than one global batch "
                         f"(config.input.global_batch={global_batch}).")
    total_steps = steps_per_epoch * config.optim.num_epochs
    centroids = fit_or_load_clusters(config, workdir, train_index) if use_geo else None

    dtype = compute_dtype(config.model.compute_dtype)
    encoder = build_encoder(config.model, dtype)
    geo_head = moco.GeoHead(config.geo.num_clusters, dtype=dtype) if use_geo else None
    lr_fn = learning_rate_schedule(config, total_steps)
    tx = optimizer(config, lr_fn)
    state = init_state(config, encoder, geo_head, tx, config.input.image_size, config.seed)
    state = jax.device_get(state)
    start_step = 0
    if mngr.latest_step() is not None:
        state, meta = checkpointing.restore(mngr, mngr.latest_step(), state)
        start_step = int(state.step)
        logging.info("Resumed from %s at step %d.", mngr.directory, start_step)

    step_cfg = ts.StepConfig(temperature=config.moco.temperature, momentum=config.moco.momentum,
                             bn_groups=config.moco.bn_groups, infonce_weight=config.moco.infonce_weight,
                             geo_weight=config.geo.loss_weight if use_geo else 0.0)
    p_step = jax.pmap(functools.partial(ts.train_step, encoder=encoder, geo_head=geo_head, tx=tx, lr_fn=lr_fn,
                                        cfg=step_cfg), axis_name=ts.AXIS, donate_argnums=(0,))

    local_devices = jax.local_device_count()
    per_device = global_batch // num_devices
    data = input_pipeline.pretrain_dataset(
        builder, config.dataset.train_split, temporal=temporal, image_size=config.input.image_size,
        crop_scale=tuple(config.input.crop_scale), local_devices=local_devices, per_device_batch=per_device,
        seed=config.seed, start_step=start_step,
        local_images_per_epoch=int(local_index.num_images.sum()), shuffle_buffer=config.input.shuffle_buffer)
    batches = jax_utils.prefetch_to_device(
        input_pipeline.with_geo_labels(data.as_numpy_iterator(), centroids), config.input.prefetch_batches,
        axis_name=ts.AXIS)

    meta = {"variant": config.variant, "config": json.loads(config.to_json()), "total_steps": total_steps,
            "steps_per_epoch": steps_per_epoch, "train_images": total_images}
    writer = metric_writer.MetricWriter(workdir)
    progress = metric_writer.Progress(total_steps, global_batch, start_step)
    stop = preemption.StopRequest()
    state = replication.replicate(state)
    pending = []  # Device-side metrics of steps not yet fetched: no host sync inside an interval.
    step = start_step
    logging.info("Pretraining %s: %d images, %d steps/epoch, %d steps, global batch %d on %d devices.",
                 config.variant, total_images, steps_per_epoch, total_steps, global_batch, num_devices)
    try:
        while step < total_steps:
            state, metrics = p_step(state, next(batches))
            step += 1
            pending.append((step, metrics))
            boundary = (step % config.log_every_steps == 0 or step == total_steps or stop.requested
                        or step % config.checkpoint_every_steps == 0)
            if boundary:
                _flush_metrics(pending, writer, progress)
                pending = []
            if step % config.checkpoint_every_steps == 0 or step == total_steps or stop.requested:
                checkpointing.save(mngr, step, replication.unreplicate(state), meta)
            if stop.requested:
                checkpointing.wait(mngr)
                print(f"Stopped by {stop.requested} at step {step}; checkpoint saved in {mngr.directory}. "
                      "Run the same command to resume.", flush=True)
                return step
        checkpointing.wait(mngr)
    finally:
        stop.restore()
        writer.close()
    return step


def _flush_metrics(pending, writer, progress):
    """Fetches the interval's metrics, stops on a non-finite loss, writes the last step's values."""
    fetched = jax.device_get([m for _, m in pending])
    for (step, _), metrics in zip(pending, fetched):
        metrics = replication.unreplicate(metrics)
        if not np.isfinite(metrics["loss"]):
            raise NonFiniteLossError(
                f"Loss is {metrics['loss']} at step {step}; stopping. The last checkpoint (before this "
                "interval) is intact: lower the learning rate or check the data, then rerun to resume.")
        writer.write(step, metrics)
    last_step = pending[-1][0]
    print(progress.line(last_step, float(replication.unreplicate(fetched[-1])["loss"])), flush=True)
