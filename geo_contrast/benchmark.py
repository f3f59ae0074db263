r"""Throughput of the code the training runs, never a copy of it.

    python -m geo_contrast.benchmark --config=configs/fmow.py --what=step [--steps=20] [--feed=host] [--nodonate]
    python -m geo_contrast.benchmark --config=configs/fmow.py:sample --what=input --workdir=/tmp/bench
    python -m geo_contrast.benchmark --config=configs/fmow.py:sample --what=build

- `step`: pretraining's pmapped step (`train_setup.pmapped_step`) on synthetic device-resident batches (no input
  pipeline). Compile time is reported apart; FLOPs per step come from XLA's cost analysis of the compiled step,
  and MFU is achieved FLOP/s over the devices' peak where the device kind is known. `--feed=host` adds the
  per-step host-to-device copy (through the training loop's prefetch); `--nodonate` and
  `--config.model.compute_dtype=float32` take away buffer donation and bf16: each optimisation can be measured on
  its own.
- `input`: the real tf.data pretraining stream (decode only the pair, temporal sampling, MoCo-v2 augmentations,
  batching) over a built TFDS dataset, no model: pairs/s for this host.
- `build`: the fMoW builder on the bundled sample (or `--manual_dir`): images/s.
Each prints one JSON line at the end. Timings are for people, never for pass/fail tests.
"""

import itertools
import json
import os
import tempfile
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from geo_contrast import config_lib
from geo_contrast import devices
from geo_contrast import train_setup

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/fmow.py:sample.", lock_config=True)
flags.DEFINE_enum("what", "step", ["step", "input", "build"], "What to time.")
flags.DEFINE_integer("steps", 20, "Timed steps (step) or batches (input).")
flags.DEFINE_enum("feed", "device", ["device", "host"],
                  "step: 'device' reuses one device-resident batch (the step alone); 'host' copies a host batch "
                  "to the devices every step through prefetch_to_device(config.input.prefetch_batches), as "
                  "training does.")
flags.DEFINE_bool("donate", True, "step: donate the state's buffers to the step (--nodonate to measure the cost).")
flags.DEFINE_integer("warmup", 3, "Untimed steps/batches first.")
flags.DEFINE_string("workdir", None, "Where a `sample` config builds its data (input); a temporary dir if unset.")
flags.DEFINE_string("manual_dir", None, "build: an fMoW-format tree to build (default: a freshly generated sample).")
flags.mark_flags_as_required(["config"])

# Dense bf16 peak FLOP/s per chip from the vendors' datasheets (the issue's measured H100 figure is ~800 TFLOP/s).
PEAK_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12, "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
}


def peak_flops(device_kind):
    """The bf16 peak of a device kind, matched by prefix ("NVIDIA H100 80GB HBM3" -> H100), or None."""
    for kind, peak in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if device_kind.startswith(kind):
            return peak
    return None


def encoder_forward_flops(encoder, state, size, batch=8):
    """XLA's FLOP count of one image through the encoder (backbone + projection), from a jitted forward pass.

    A pair costs 4 of these (query forward + backward ~ 3, key forward 1): the model FLOPs that MFU is defined
    on. Counted on a plain jit compiled for the host CPU: XLA's cost analysis of the pmapped step does not see
    inside it, and on GPU convolutions are library calls that it does not count at all.
    """
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    on_cpu = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=cpu)
    variables = jax.tree.map(lambda x: on_cpu(x.shape[1:], x.dtype),
                             {"params": state.params["encoder"], "batch_stats": state.batch_stats})
    forward = jax.jit(lambda v, x: encoder.apply(v, x, train=False))
    cost = forward.lower(variables, on_cpu((batch, size, size, 3), jnp.float32)).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) / batch


def bench_step(config, steps, warmup, feed="device", donate=True):
    """pairs/s of the pmapped train step on synthetic batches, device-resident or fed from the host (`feed`)."""
    n = jax.device_count()
    config_lib.validate(config, num_devices=n, num_local_devices=jax.local_device_count(), stages=("pretrain",))
    size, per_device = config.input.image_size, config.input.global_batch // n
    dtype = train_setup.compute_dtype(config.model.compute_dtype)
    model = train_setup.build_model(config, steps + warmup, dtype)
    p_step = train_setup.pmapped_step(config, model, donate=donate)  # What pretraining runs, stop vote included.
    state = devices.replicate(train_setup.initial_state(config, model))
    rng = np.random.default_rng(0)
    local = jax.local_device_count()
    host_batch = {
        "query": rng.integers(0, 256, (local, per_device, size, size, 3), np.uint8),
        "geo_label": rng.integers(0, config.geo.num_clusters, (local, per_device)).astype(np.int32)}
    if config_lib.uses_contrastive_loss(config.variant):
        host_batch["key"] = rng.integers(0, 256, (local, per_device, size, size, 3), np.uint8)
    no_stop = np.zeros(local, np.int32)
    if feed == "host":  # A fresh host-to-device copy per step, overlapped as the training loop overlaps it.
        batches = devices.shard(itertools.repeat(host_batch), config.input.prefetch_batches)
    else:
        batches = itertools.repeat(next(devices.shard(iter([host_batch]), 1)))
    t0 = time.perf_counter()
    compiled = p_step.lower(state, next(batches), no_stop).compile()
    compile_s = time.perf_counter() - t0
    # Query forward + backward ~ 3 forwards, and the key's forward where there is a key encoder.
    passes = 4 if config_lib.uses_contrastive_loss(config.variant) else 3
    flops_per_pair = passes * encoder_forward_flops(model.encoder, state, size)
    for _ in range(warmup):
        state, _, _ = compiled(state, next(batches), no_stop)
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics, _ = compiled(state, next(batches), no_stop)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - t0) / steps
    kind = jax.devices()[0].device_kind
    peak = peak_flops(kind)
    return {
        "what": "step", "pairs_per_s": config.input.global_batch / seconds, "step_s": seconds,
        "compile_s": compile_s, "flops_per_step": flops_per_pair * config.input.global_batch,
        "gflop_per_pair": flops_per_pair / 1e9,
        "mfu": (flops_per_pair * config.input.global_batch / n / seconds / peak) if peak else None,
        "peak_flops_per_device": peak, "dtype": jnp.dtype(dtype).name, "feed": feed, "donate": donate,
        "prefetch": config.input.prefetch_batches if feed == "host" else None,
        **_common(config, kind)}


def bench_input(config, steps, warmup, workdir):
    """pairs/s of this host's tf.data pretraining stream, no model."""
    from geo_contrast import input_pipeline  # TensorFlow: imported only by the targets that time it.
    from geo_contrast import records
    from geo_contrast import sample_dataset
    workdir = workdir or tempfile.mkdtemp(prefix="bench_input_")
    sample_dataset.prepare_if_sample(config, workdir)
    builder = records.load_builder(config.dataset.name, config.dataset.data_dir)
    index = records.read_location_index(builder, config.dataset.train_split)
    ds = input_pipeline.pretrain_dataset(
        builder, config.dataset.train_split, index, temporal=config_lib.uses_temporal_positives(config.variant),
        views=input_pipeline.Views.of_config(config), global_batch=config.input.global_batch,
        host=input_pipeline.HostSlice.of_this_process(), seed=config.seed, start_step=0,
        keys=config_lib.uses_contrastive_loss(config.variant))
    it = ds.as_numpy_iterator()
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    for _ in range(steps):
        batch = next(it)
    seconds = time.perf_counter() - t0
    pairs = steps * batch["query"].shape[0] * batch["query"].shape[1]
    # Decoding cost grows with the JPEGs' size: the figure is comparable only between datasets of similar size.
    first = range(min(256, len(index.num_images)))
    sizes = [len(jpeg) for _, ex in records.locations(builder, config.dataset.train_split, first)
             .as_numpy_iterator() for jpeg in ex["images"]]
    return {"what": "input", "pairs_per_s": pairs / seconds, "cpus": os.cpu_count(),
            "mean_jpeg_kb": float(np.mean(sizes)) / 1e3, "region": config.input.region,
            "crop_scale": list(config.input.crop_scale), **_common(config, "host")}


def bench_build(manual_dir):
    """images/s of the fMoW builder over a generated sample or a given tree, and the bytes it stores."""
    import tensorflow_datasets as tfds  # TensorFlow: imported only by the targets that time it.
    from geo_contrast import records
    from tfds_builders.fmow import fmow_dataset_builder
    from tfds_builders.fmow import sample as sample_data
    root = tempfile.mkdtemp(prefix="bench_build_")
    if manual_dir is None:
        manual_dir = os.path.join(root, "sample")
        sample_data.generate(manual_dir)
    builder = fmow_dataset_builder.Builder(data_dir=os.path.join(root, "data"))
    t0 = time.perf_counter()
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    seconds = time.perf_counter() - t0
    images = sum(int(n) for split in builder.info.splits
                 for n in records.read_location_index(builder, split).num_images)
    stored = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(builder.data_dir) for f in files)
    return {"what": "build", "images_per_s": images / seconds, "images": images, "seconds": seconds,
            "stored_mb": stored / 1e6, "stored_kb_per_image": stored / 1e3 / images, "cpus": os.cpu_count(),
            "dataset": builder.info.full_name}


def _common(config, device_kind):
    return {"model": f"resnet{config.model.depth}" + (f"_w{config.model.width}" if config.model.width != 64 else ""),
            "image_size": config.input.image_size, "batch": config.input.global_batch,
            "devices": jax.device_count(), "device_kind": device_kind, "variant": config.variant}


def main(argv):
    del argv
    if FLAGS.what == "step":
        result = bench_step(FLAGS.config, FLAGS.steps, FLAGS.warmup, FLAGS.feed, FLAGS.donate)
    elif FLAGS.what == "input":
        result = bench_input(FLAGS.config, FLAGS.steps, FLAGS.warmup, FLAGS.workdir)
    else:
        result = bench_build(FLAGS.manual_dir)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    app.run(main)
