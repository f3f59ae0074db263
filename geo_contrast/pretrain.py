"""The pretraining loop: data, state, pmapped MoCo step, checkpoints, metrics, signals.

Reads a built fMoW(-format) TFDS dataset, fits (or reloads) the geo clusters, and runs `train_step.train_step`
under `jax.pmap` until `config.optim.num_epochs` epochs of images are done. Everything the run needs to
resume exactly (state, queue, RNG, data position = step) is in the checkpoint; the clusters are in
`WORKDIR/geo_clusters.npz`.

Several processes (distributed.py): pmap spans every device of every process, so the step's collectives
(gradient mean, shuffle BN, the enqueued keys) are global and the state stays identical on every process. Each
process feeds its local devices its own block of every global batch (input_pipeline.HostSlice), and the global
batches do not depend on the process count. Process 0 alone writes the metrics and the clusters; every process
takes part in each checkpoint save and restore.

Faults:
- Killed at any point (SIGKILL, a crash), the run restarts with the same command from its latest finished
  checkpoint, rebuilds the data stream at that step and, from there, repeats the losses of a run that was never
  interrupted. The metric rows the killed run wrote after that checkpoint are dropped at start-up. A checkpoint
  damaged since it was written is set aside for an older one (checkpointing.restore_latest); a config that
  differs from the checkpoint's in a field that shapes the run is refused (config_lib.check_resume).
- SIGTERM/SIGINT (preemption.StopRequest): the step carries each process's stop vote and sums it over all
  devices, so every process learns of a request from any of them at the same step; the loop then checkpoints
  and returns, and the process exits 0. The vote is read one step late (so reading it never stalls the device
  queue): the checkpoint is of the step after the one during which the signal arrived.
- A non-finite loss stops the run with the last checkpoint before it intact.
"""

import dataclasses
import json
import os

import jax
from absl import logging
from jax.experimental import multihost_utils

from geo_contrast import checkpointing
from geo_contrast import config_lib
from geo_contrast import devices
from geo_contrast import evaluation
from geo_contrast import geo_clusters
from geo_contrast import input_pipeline
from geo_contrast import metric_writer
from geo_contrast import preemption
from geo_contrast import records
from geo_contrast import train_loop
from geo_contrast import train_setup
from geo_contrast import workdir as workdir_lib


def fit_or_load_clusters(config, workdir, train_index):
    """K-means centroids of the training images' coordinates, fitted once per run and then reloaded.

    Process 0 fits and writes them; every process then reads the file (after a barrier when there are several),
    so all label pairs with exactly the same float64 centroids.
    """
    path = workdir_lib.clusters_path(workdir)
    if jax.process_index() == 0 and not os.path.exists(path):
        centroids = geo_clusters.fit(train_index.image_coordinates, config.geo.num_clusters, seed=config.seed)
        workdir_lib.write_clusters(workdir, centroids, geo_clusters.centroids_latlon(centroids))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("geo clusters written")
    centroids, _ = workdir_lib.read_clusters(workdir)
    if len(centroids) != config.geo.num_clusters:
        raise config_lib.ConfigError(
            f"{path} holds {len(centroids)} clusters but config.geo.num_clusters={config.geo.num_clusters}; use "
            "a new --workdir or the same value.")
    return centroids


@dataclasses.dataclass(frozen=True)
class Outcome:
    step: int  # The last step done (and checkpointed).
    total_steps: int
    stopped_by: str | None  # Why the run stopped before total_steps (a signal), or None.


def pretrain(config, workdir):
    """Runs (or resumes) pretraining; returns its Outcome."""
    stop = preemption.StopRequest()  # First of all: a SIGTERM during start-up stops the run after two steps.
    try:
        return _pretrain(config, workdir, stop)
    finally:
        stop.restore()


def _pretrain(config, workdir, stop):
    # Checks: the data against the (validated) config, the workdir; all before any model exists.
    builder = records.load_builder(config.dataset.name, config.dataset.data_dir)
    train_index = records.read_location_index(builder, config.dataset.train_split)
    total_images = int(train_index.num_images.sum())
    config_lib.validate_against_data(config, num_images=total_images,
                                     num_distinct_locations=train_index.num_distinct_locations)
    mngr = checkpointing.manager(workdir_lib.checkpoints_dir(workdir), keep=config.keep_checkpoints)
    global_batch = config.input.global_batch
    steps_per_epoch = total_images // global_batch
    total_steps = steps_per_epoch * config.optim.num_epochs

    # State: the newest checkpoint that restores, if its recorded config allows this one, or the initial one.
    model = train_setup.build_model(config, steps_per_epoch, train_setup.compute_dtype(config.model.compute_dtype))
    resumed = checkpointing.restore_latest(
        mngr, train_setup.abstract_state(config, model),
        check=lambda step, meta: config_lib.check_resume(meta["config"], config, stage="pretrain",
                                                         checkpoint=f"{mngr.directory}/{step}"))
    if resumed is None:
        start_step, state = 0, train_setup.initial_state(config, model)
        if config.init_from:
            state = train_setup.with_torchvision_backbone(state, config.init_from)
            logging.info("Initialised both encoders' backbones from %s.", config.init_from)
    else:
        start_step, state, _ = resumed
        logging.info("Resumed from %s at step %d.", mngr.directory, start_step)
    use_geo = config_lib.uses_geo_loss(config.variant)
    centroids = fit_or_load_clusters(config, workdir, train_index) if use_geo else None
    p_step = train_setup.pmapped_step(config, model)

    # Data: this process's block of every global batch, from the start step on.
    host = input_pipeline.HostSlice.of_this_process()
    data = input_pipeline.pretrain_dataset(
        builder, config.dataset.train_split, train_index,
        temporal=config_lib.uses_temporal_positives(config.variant), views=input_pipeline.Views.of_config(config),
        global_batch=global_batch, host=host, seed=config.seed, start_step=start_step,
        keys=config_lib.uses_contrastive_loss(config.variant))
    batches = devices.shard(input_pipeline.with_geo_labels(data.as_numpy_iterator(), centroids),
                            config.input.prefetch_batches)

    meta = {"variant": config.variant, "config": json.loads(config.to_json()), "total_steps": total_steps,
            "steps_per_epoch": steps_per_epoch, "train_images": total_images}
    writer = metric_writer.MetricWriter(workdir, resume_step=start_step)
    progress = metric_writer.Progress(total_steps, global_batch, start_step)
    after_step = _knn_monitor(config, builder, model, train_index, writer, total_steps)
    logging.info("Pretraining %s: %d images, %d steps/epoch, %d steps, global batch %d on %d devices of %d "
                 "processes.", config.variant, total_images, steps_per_epoch, total_steps, global_batch,
                 jax.device_count(), jax.process_count())
    step, stopped_by = train_loop.train(
        p_step, devices.replicate(state), batches, mngr=mngr, writer=writer, start_step=start_step,
        end_step=total_steps, stop=stop, progress=progress, log_every=config.log_every_steps,
        checkpoint_every=config.checkpoint_every_steps, after_step=after_step,
        save=lambda step, state: checkpointing.save(mngr, step, devices.unreplicate(state), meta))
    return Outcome(step, total_steps, stopped_by)


def _knn_monitor(config, builder, model, train_index, writer, total_steps):
    """The loop's after-step hook that reads the kNN monitor every config.knn.every_steps and at the end (a no-op
    when every_steps is 0), writing `knn_top1` to the metrics and the console."""
    every = config.knn.every_steps
    if every <= 0:
        return lambda step, state: None
    monitor = evaluation.KnnMonitor(config, builder, model.encoder.backbone, train_index,
                                    builder.info.splits[config.dataset.val_split].num_examples)

    def read(step, state):
        if step % every and step != total_steps:
            return
        top1 = monitor(state)
        writer.write(step, {"knn_top1": top1})
        if jax.process_index() == 0:
            print(f"step {step}/{total_steps}  kNN top-1 {100 * top1:.2f} (val, k={config.knn.k})", flush=True)

    return read
