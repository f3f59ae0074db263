"""A model run over every image of a split under the evaluation view, on this process's devices: the probe's
features, fine-tuning's scores on val and test.

Every process runs the whole split on its own devices (`devices.pmap(local=True)`, each batch split over them):
evaluation is small next to training and needs no cross-host traffic; the outputs are identical everywhere.
"""

import dataclasses
import time

import jax
import numpy as np
from absl import logging

from geo_contrast import classification
from geo_contrast import devices
from geo_contrast import input_pipeline


@dataclasses.dataclass(frozen=True)
class SplitOutputs(classification.Split):
    outputs: np.ndarray  # [N, ...] float32: one row per image, in the split's stored order.


def forward_split(p_apply, variables, builder, split, views):
    """`p_apply(variables, images)` (pmapped over local devices, images [devices, per_device, S, S, 3]) on every
    image of `split` under the eval view `views` describes (a config section with image_size, resize_size,
    global_batch, region, box_context); `variables` already replicated."""
    start = time.monotonic()
    outputs, labels, locations = [], [], []

    def collect(pending):
        out, batch = pending
        n = int(batch["weight"].sum())  # Padding is only ever at the end of a batch.
        outputs.append(np.asarray(out).reshape((-1,) + out.shape[2:])[:n])
        labels.append(batch["label"][:n])
        locations.append(batch["location"][:n])

    pending = None
    batches = input_pipeline.eval_batches(builder, split, image_size=views.image_size,
                                          resize_size=views.resize_size, batch_size=views.global_batch,
                                          region=views.region, box_context=views.box_context)
    for batch in batches:
        out = p_apply(variables, devices.split_rows(batch["image"], jax.local_device_count()))
        if pending is not None:  # Fetch the previous batch while this one computes.
            collect(pending)
        pending = (out, batch)
    if pending is None:
        raise ValueError(f"Split {split!r} of {builder.info.full_name} has no images.")
    collect(pending)
    result = SplitOutputs(split, labels=np.concatenate(labels).astype(np.int64),
                          locations=np.concatenate(locations).astype(np.int64), outputs=np.concatenate(outputs))
    logging.info("Ran %d %s images in %.0f s.", len(result.labels), split, time.monotonic() - start)
    return result
