r"""Released PyTorch weights -> the torchvision-layout safetensors file this project reads. No torch needed.

    python -m geo_contrast.convert SRC --out OUT.safetensors

SRC is read by torch_checkpoint.py (numpy only; a pickle that names anything but tensors and plain containers
is refused unrun). OUT holds what export.py writes, so `torchvision_layout.load_torchvision_resnet` reads it
(``config.init_from``). Recognised SRC layouts:

* ``moco_checkpoint``: the authors' MoCo(-v2) checkpoints (``moco_geo+tp.pth.tar``, ...) and facebookresearch/
  moco's ``moco_v2_800ep_pretrain.pth.tar``: a dict with ``state_dict`` keyed ``module.encoder_q.*``,
  ``module.encoder_k.*``, ``module.queue``, ``module.queue_ptr``; the authors' geo variants add ``geo_dict``
  (their ``Sequential(ReLU, Linear(128, clusters))`` as ``module.layers.1.{weight,bias}``); ``epoch``,
  ``arch``, ``optimizer`` beside. The query encoder is kept (the one MoCo transfers; the key encoder is its
  moving average): its backbone under torchvision's bare keys, its MLP ``fc.0`` / ``fc.2`` as
  ``projection.fc.0`` / ``projection.fc.2`` and the geo head's Linear as ``geo_head.fc``, export.py's names.
* ``torchvision_state_dict``: a ResNet ``state_dict`` (torchgeo's ``ResNet50_Weights.FMOW_RGB_GASSL``,
  torchvision's ImageNet weights, whose ``fc`` classifier is dropped), also with DDP's ``module.`` prefix or
  inside a dict under ``state_dict`` / ``model`` (``source_key`` then says which).

Tensors keep their dtype (``num_batches_tracked`` stays int64). String metadata: ``format`` (as export.py's),
``source`` (SRC's file name), ``source_format``, ``kept`` / ``dropped`` (comma-separated parts), and ``epoch`` /
``arch`` when SRC has them. Mistakes (a missing or unreadable SRC, an unknown layout, an unwritable --out) print
``error: ...`` on one line and exit 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import numpy as np

from geo_contrast import safetensors_io
from geo_contrast import torch_checkpoint

# A torchvision ResNet's modules before the classifier: the backbone's top-level names.
BACKBONE_ROOTS = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")
MLP_KEYS = ("fc.0.weight", "fc.0.bias", "fc.2.weight", "fc.2.bias")  # MoCo-v2's projection head on encoder_q.
CLASSIFIER_KEYS = ("fc.weight", "fc.bias")  # torchvision's ImageNet classifier.
LAYOUTS = ("recognised: the authors' / MoCo-v2 checkpoint (a dict whose 'state_dict' has module.encoder_q.*), a "
           "torchvision ResNet state_dict (conv1.weight, bn1.*, layer1.* ... layer4.*, optional fc.*; a module. "
           "prefix allowed), or a dict holding one under 'state_dict' or 'model'")


class ConvertError(ValueError):
    """A user's mistake other than an unreadable file: no such SRC, a layout not recognised, --out unwritable."""


@dataclasses.dataclass(frozen=True)
class Converted:
    tensors: dict  # torch key -> array, export.py's names.
    metadata: dict  # str -> str.


def _preview(keys, n=5):
    keys = list(keys)
    more = f", ... ({len(keys)} in all)" if len(keys) > n else ""
    return ", ".join(str(k) for k in keys[:n]) + more


def _describe(obj):
    return f"keys {_preview(obj)}" if isinstance(obj, dict) else f"a {type(obj).__name__}"


def is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items())


def without_ddp(state_dict: dict) -> dict:
    """The state_dict without DistributedDataParallel's ``module.`` prefix, when every key has it."""
    if all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def _backbone(state_dict, where):
    """(backbone keys and arrays, the other keys) of a ResNet state_dict; an error if it has no ResNet stem."""
    backbone = {k: v for k, v in state_dict.items() if k.split(".")[0] in BACKBONE_ROOTS}
    if "conv1.weight" not in backbone:
        raise ConvertError(f"{where} has no conv1.weight, so it is not a torchvision ResNet (keys "
                           f"{_preview(state_dict)}); {LAYOUTS}.")
    return backbone, [k for k in state_dict if k not in backbone]


def _geo_head(geo_dict, where):
    """The authors' geo head (one Linear, ``module.layers.1.*``) as ``geo_head.fc.{weight,bias}``."""
    if not is_state_dict(geo_dict):
        raise ConvertError(f"{where}: geo_dict is {_describe(geo_dict)}, not a state_dict.")
    linear = without_ddp(geo_dict)
    prefixes = {k.rsplit(".", 1)[0] for k in linear}
    prefix = prefixes.pop() if len(prefixes) == 1 else None
    if prefix is None or set(linear) != {f"{prefix}.weight", f"{prefix}.bias"}:
        raise ConvertError(f"{where}: geo_dict should hold one Linear layer (a weight and a bias), it has keys "
                           f"{_preview(geo_dict)}.")
    return {"geo_head.fc.weight": linear[f"{prefix}.weight"], "geo_head.fc.bias": linear[f"{prefix}.bias"]}


def _moco(checkpoint, where):
    """(tensors, kept, dropped) of a MoCo checkpoint: the query encoder with its heads."""
    state_dict = without_ddp(checkpoint["state_dict"])
    prefix = "encoder_q."
    query = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    tensors, rest = _backbone(query, f"{where}: encoder_q")
    kept, dropped = ["backbone"], []
    if sorted(rest) == sorted(MLP_KEYS):
        tensors.update({f"projection.{k}": query[k] for k in MLP_KEYS})
        kept.append("projection")
    elif any(not k.startswith("fc.") for k in rest):
        raise ConvertError(f"{where}: encoder_q has {_preview(rest)} beside the backbone and its fc head; "
                           f"{LAYOUTS}.")
    elif rest:  # MoCo-v1's single Linear head: the project's projection is v2's MLP, so it has no slot.
        dropped.append("encoder_q.fc")
    if "geo_dict" in checkpoint:
        tensors.update(_geo_head(checkpoint["geo_dict"], where))
        kept.append("geo_head")
    for key in state_dict:  # encoder_k, queue, queue_ptr: what MoCo needs to train on, not to transfer.
        part = key.split(".")[0]
        if part != "encoder_q" and part not in dropped:
            dropped.append(part)
    dropped += [k for k in checkpoint if k not in ("state_dict", "geo_dict", "epoch", "arch")]
    return tensors, kept, dropped


def _torchvision(state_dict, where):
    """(tensors, kept, dropped) of a ResNet state_dict: the backbone; torchvision's classifier ``fc`` dropped."""
    tensors, rest = _backbone(without_ddp(state_dict), where)
    unknown = [k for k in rest if k not in CLASSIFIER_KEYS]
    if unknown:
        raise ConvertError(f"{where}: {_preview(unknown)} belong neither to a ResNet backbone nor to its fc "
                           f"classifier; {LAYOUTS}.")
    return tensors, ["backbone"], ["fc"] if rest else []


def convert_object(obj, source: str) -> Converted:
    """The torchvision-layout tensors and metadata of a loaded checkpoint `obj` read from the file `source`."""
    metadata = {"format": safetensors_io.FORMAT, "source": os.path.basename(source)}
    if isinstance(obj, dict) and is_state_dict(obj.get("state_dict")) and any(
            k.removeprefix("module.").startswith("encoder_q.") for k in obj["state_dict"]):
        metadata["source_format"] = "moco_checkpoint"
        tensors, kept, dropped = _moco(obj, source)
    elif is_state_dict(obj):
        metadata["source_format"] = "torchvision_state_dict"
        tensors, kept, dropped = _torchvision(obj, source)
    elif isinstance(obj, dict) and any(is_state_dict(obj.get(k)) for k in ("state_dict", "model")):
        key = "state_dict" if is_state_dict(obj.get("state_dict")) else "model"
        metadata.update(source_format="torchvision_state_dict", source_key=key)
        tensors, kept, dropped = _torchvision(obj[key], f"{source}['{key}']")
        dropped += [k for k in obj if k not in (key, "epoch", "arch")]
    else:
        raise ConvertError(f"{source}: not a layout this converter knows (it holds {_describe(obj)}); {LAYOUTS}.")
    metadata.update(kept=",".join(kept), dropped=",".join(str(k) for k in dropped))
    if isinstance(obj, dict):
        metadata.update({k: str(obj[k]) for k in ("epoch", "arch") if k in obj})
    return Converted(tensors, metadata)


def convert(src: str, out: str) -> Converted:
    """Reads the checkpoint `src`, writes its torchvision-layout safetensors file to `out` (atomically)."""
    if not os.path.isfile(src):
        raise ConvertError(f"{src} does not exist (or is not a file); give the path of a PyTorch checkpoint.")
    converted = convert_object(torch_checkpoint.load(src), src)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        safetensors_io.save_safetensors(converted.tensors, out, converted.metadata)
    except OSError as e:
        raise ConvertError(f"cannot write --out={out}: {e.strerror or e}: {e.filename}.") from e
    return converted


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m geo_contrast.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="The PyTorch checkpoint (.pth, .pth.tar, .pt) to convert.")
    parser.add_argument("--out", required=True, help="The .safetensors file to write.")
    args = parser.parse_args(argv)
    try:
        converted = convert(args.src, args.out)
    except (ConvertError, torch_checkpoint.CheckpointFormatError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    meta = converted.metadata
    print(f"Wrote {args.out}: {meta['kept']} ({len(converted.tensors)} tensors) from {meta['source']} "
          f"({meta['source_format']}); dropped: {meta['dropped'] or 'nothing'}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
