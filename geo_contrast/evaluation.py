"""A model run over every image of a split under the evaluation view, on this process's devices: the probe's
features, fine-tuning's scores on val and test, pretraining's kNN monitor.

Every process runs the whole split on its own devices (`devices.pmap(local=True)`, each batch split over them):
evaluation is small next to training and needs no cross-host traffic; the outputs are identical everywhere.
"""

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from geo_contrast import classification
from geo_contrast import devices
from geo_contrast import input_pipeline
from geo_contrast import knn


def backbone_features(module, variables, images):
    """Pooled features of the backbone in inference mode (BN running statistics, nothing updated), float32."""
    return module.apply(variables, images, train=False).astype(jnp.float32)


_p_features = devices.pmap(backbone_features, local=True, static_broadcasted_argnums=(0,))


def features_of(module):
    """The `p_apply` of `forward_split` that gives a ResNet's pooled features."""
    return functools.partial(_p_features, module)


@dataclasses.dataclass(frozen=True)
class SplitOutputs(classification.Split):
    outputs: np.ndarray  # [N, ...] float32: one row per image, in the split's stored order.


def forward_split(p_apply, variables, builder, split, views, locations=None):
    """`p_apply(variables, images)` (pmapped over local devices, images [devices, per_device, S, S, 3]) on every
    image of `split` (or of its `locations`, indices in the split) under the eval view `views` describes (a
    config section with image_size, resize_size, global_batch, region, box_context); `variables` replicated."""
    start = time.monotonic()
    outputs, labels, location_ids = [], [], []

    def collect(pending):
        out, batch = pending
        n = int(batch["weight"].sum())  # Padding is only ever at the end of a batch.
        outputs.append(np.asarray(out).reshape((-1,) + out.shape[2:])[:n])
        labels.append(batch["label"][:n])
        location_ids.append(batch["location"][:n])

    pending = None
    batches = input_pipeline.eval_batches(builder, split, image_size=views.image_size,
                                          resize_size=views.resize_size, batch_size=views.global_batch,
                                          region=views.region, box_context=views.box_context, locations=locations)
    for batch in batches:
        out = p_apply(variables, devices.split_rows(batch["image"], jax.local_device_count()))
        if pending is not None:  # Fetch the previous batch while this one computes.
            collect(pending)
        pending = (out, batch)
    if pending is None:
        raise ValueError(f"Split {split!r} of {builder.info.full_name} has no images.")
    collect(pending)
    result = SplitOutputs(split, labels=np.concatenate(labels).astype(np.int64),
                          locations=np.concatenate(location_ids).astype(np.int64), outputs=np.concatenate(outputs))
    logging.info("Ran %d %s images in %.0f s.", len(result.labels), split, time.monotonic() - start)
    return result


class KnnMonitor:
    """Pretraining's kNN monitor (`config.knn`): weighted kNN top-1 of val images against training images, both
    as features of the current query encoder's backbone under the probe's eval view (config.linear_eval).

    A fixed random subset of locations of each split (`train_locations`, `val_locations`; 0: all of them) keeps
    its cost bounded; the subsets are drawn once, from seed 0, so every reading of a run (and of every run) uses
    the same images.
    """

    def __init__(self, config, builder, module, train_index, num_val_locations):
        kc = config.knn
        rng = np.random.default_rng(0)
        self._k, self._temperature = kc.k, kc.temperature
        self._config, self._builder, self._module = config, builder, module
        self._num_classes = builder.info.features["label"].num_classes
        self._train = _subset(rng, len(train_index.num_images), kc.train_locations)
        self._val = _subset(rng, num_val_locations, kc.val_locations)

    def __call__(self, state):
        """kNN top-1 of the replicated pretraining `state`'s query encoder."""
        variables = {"params": state.params["encoder"]["backbone"], "batch_stats": state.batch_stats["backbone"]}
        p_apply, dataset = features_of(self._module), self._config.dataset
        train = forward_split(p_apply, variables, self._builder, dataset.train_split, self._config.linear_eval,
                              self._train)
        val = forward_split(p_apply, variables, self._builder, dataset.val_split, self._config.linear_eval,
                            self._val)
        return knn.top1(train.outputs, train.labels, val.outputs, val.labels, self._num_classes, self._k,
                        self._temperature)


def _subset(rng, total, size):
    """`size` location indices of `total` drawn without replacement (sorted), or all of them for size 0."""
    if not 0 < size < total:
        return np.arange(total)
    return np.sort(rng.choice(total, size, replace=False))
