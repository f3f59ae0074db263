r"""Weights that travel: a pretraining checkpoint's query encoder as a torchvision ResNet state_dict, and back.

    python -m geo_contrast.export --workdir=DIR --out=encoder.safetensors [--heads] [--step=N]

The file is safetensors (no pickle, loads with or without torch) holding the query encoder's backbone under
torchvision's exact ``resnet{depth}`` keys (``conv1.weight``, ``layer3.5.bn2.running_var``, ... ; no ``fc``), in
torch layout (see torchvision_layout.py). The query encoder is the one MoCo evaluates and transfers; the key
encoder is its moving average. ``--heads`` adds the pretraining heads under their own prefixes:

    projection.fc.0.{weight,bias}   Linear(feature_dim, feature_dim)   \  MoCo-v2's MLP on the pooled features;
    projection.fc.2.{weight,bias}   Linear(feature_dim, projection_dim) /  ReLU between, output un-normalised
    geo_head.fc.{weight,bias}       Linear(projection_dim, num_clusters)  ReLU(projection) -> cluster logits

(geo variants only for the geo head; torch's ``[out, in]`` Linear layout). String metadata records what a user
needs to run the encoder: variant, step, architecture, depth/width/feature_dim, the pretraining image size and the
input normalisation (RGB in [0, 1], then ``(x - input_mean) / input_std``), and for the geo head its clusters'
(lat, lon) centres in class order.

`torchvision_layout.load_torchvision_resnet` reads the same format back (an export, or torchvision's / torchgeo's
weights saved with ``safetensors.torch.save_file``) into the Flax ResNet: pretraining's ``config.init_from``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from geo_contrast import pixels
from geo_contrast import safetensors_io
from geo_contrast import torchvision_layout
from geo_contrast import workdir as workdir_lib
from geo_contrast.models import resnet


def encoder_tensors(state, step: int, *, heads: bool) -> dict:
    """The query encoder's backbone (and with `heads` its projection and any geo head) as torch tensors."""
    encoder = state["params"]["encoder"]
    tensors = torchvision_layout.to_torch(encoder["backbone"], state["batch_stats"]["backbone"],
                                          num_batches_tracked=step)
    if heads:
        tensors.update(torchvision_layout.to_torch(encoder["projection"], prefix="projection"))
        if "geo_head" in state["params"]:
            tensors.update(torchvision_layout.to_torch(state["params"]["geo_head"], prefix="geo_head"))
    return tensors


def export_metadata(meta: dict, step: int, *, heads: bool, geo_centroids_latlon=None) -> dict:
    """The file's string metadata (safetensors allows only str -> str) from the checkpoint's metadata."""
    model = meta["config"]["model"]
    depth, width = int(model["depth"]), int(model["width"])
    metadata = {
        "format": safetensors_io.FORMAT,
        "architecture": f"resnet{depth}",
        "depth": str(depth),
        "width": str(width),
        "feature_dim": str(resnet.ResNet(depth=depth, width=width).feature_dim),
        "variant": str(meta["variant"]),
        "step": str(step),
        "total_steps": str(meta.get("total_steps", "")),
        "image_size": str(meta["config"]["input"]["image_size"]),
        "input_mean": json.dumps(list(pixels.IMAGENET_MEAN)),
        "input_std": json.dumps(list(pixels.IMAGENET_STD)),
        "input_normalisation": "RGB scaled to [0, 1], then (x - input_mean) / input_std per channel",
        "num_batches_tracked": "the pretraining step (torch reads it only with BatchNorm momentum=None)",
        "heads": "",
    }
    if heads:
        metadata["heads"] = "projection"
        metadata["projection"] = ("projection.fc.0 -> ReLU -> projection.fc.2 on the pooled features; the output "
                                  "is un-normalised (MoCo L2-normalises it for the contrastive loss)")
        if geo_centroids_latlon is not None:
            metadata["heads"] = "projection,geo_head"
            metadata["geo_head"] = ("ReLU -> geo_head.fc on the projection's output; logits over the geo "
                                    "clusters of geo_centroids_latlon, in class order")
            metadata["geo_centroids_latlon"] = json.dumps(np.round(geo_centroids_latlon, 4).tolist())
    return metadata


def export(workdir: str, out: str, *, heads: bool = False, step: int | None = None) -> dict:
    """Writes the checkpoint's encoder to `out` (safetensors, replaced atomically); returns its metadata."""
    ckpt = workdir_lib.read_run(workdir_lib.checkpoints_dir(workdir), step, with_state=True)
    centroids = None
    if heads and "geo_head" in ckpt.state["params"]:
        _, centroids = workdir_lib.read_clusters(workdir)  # The geo head's classes are the clusters.
    metadata = export_metadata(ckpt.meta, ckpt.step, heads=heads, geo_centroids_latlon=centroids)
    tensors = encoder_tensors(ckpt.state, ckpt.step, heads=heads)
    out = os.path.abspath(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    safetensors_io.save_safetensors(tensors, out, metadata)
    return metadata


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m geo_contrast.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="The pretraining run's workdir (its checkpoints/ is read).")
    parser.add_argument("--out", required=True, help="The .safetensors file to write.")
    parser.add_argument("--heads", action="store_true",
                        help="Also export the projection head and, for geo variants, the geo head.")
    parser.add_argument("--step", type=int, default=None, help="Checkpoint step to export (default: the latest).")
    args = parser.parse_args(argv)
    try:
        metadata = export(args.workdir, args.out, heads=args.heads, step=args.step)
    except workdir_lib.WorkdirError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(1)
    print(f"Wrote {args.out}: {metadata['architecture']} (width {metadata['width']}), variant "
          f"{metadata['variant']}, step {metadata['step']}, heads: {metadata['heads'] or 'none'}.")


if __name__ == "__main__":
    main()
