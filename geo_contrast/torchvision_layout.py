"""The one map between this project's Flax variables and torch ``state_dict`` tensors, both directions.

Exported weights must load into torchvision's ``resnet50`` (and timm's, which uses the same names) without any
renaming, and torchvision's ImageNet weights must load back into the Flax ResNet for the paper's "IN init"
baselines; one table drives both directions, so they cannot drift apart.

Names. Flax module names are torch's with every ``.`` written as ``_`` (see models/resnet.py and moco.py), so a
torch key is the Flax module path with ``_`` turned back into ``.``, joined by ``.``, plus the torch leaf name:
``layer3_5/conv2/kernel`` -> ``layer3.5.conv2.weight``, ``projection/fc_0/kernel`` -> ``projection.fc.0.weight``.
Leaf names (``running_mean``) keep their underscores.

Leaves (``_LEAVES``):
* conv ``params/kernel`` [kh, kw, in, out] (HWIO) -> ``weight`` [out, in, kh, kw] (OIHW);
* dense ``params/kernel`` [in, out] -> ``weight`` [out, in] (``torch.nn.Linear``);
* ``params/scale`` -> ``weight``; ``params/bias`` -> ``bias``;
* ``batch_stats/mean`` -> ``running_mean``; ``batch_stats/var`` -> ``running_var``.

``num_batches_tracked``: torch's BatchNorm2d carries this int64 scalar beside its running statistics. Flax has
no counterpart; the export writes the caller's count (the pretraining step: how many updates the statistics
have seen) and the import ignores it. torch reads it only with ``momentum=None``, which torchvision never
uses, so its value does not change any output.

`to_torch` / `from_torch` are pure array code; `load_torchvision_resnet` reads a safetensors file through
`from_torch` (pretraining's ``config.init_from``); `save_safetensors` (from safetensors_io.py, which imports no
JAX so that convert.py does not) writes one. Writing a checkpoint out is export.py's job.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import flax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file

from geo_contrast.safetensors_io import save_safetensors  # noqa: F401 - re-exported: the layout's writer.

# (collection, Flax leaf name, rank) -> torch leaf name, the Flax -> torch axis permutation. rank None: any.
_LEAVES = {
    ("params", "kernel", 4): ("weight", (3, 2, 0, 1)),  # HWIO -> OIHW.
    ("params", "kernel", 2): ("weight", (1, 0)),  # [in, out] -> torch.nn.Linear's [out, in].
    ("params", "scale", None): ("weight", None),
    ("params", "bias", None): ("bias", None),
    ("batch_stats", "mean", None): ("running_mean", None),
    ("batch_stats", "var", None): ("running_var", None),
}
NUM_BATCHES_TRACKED = "num_batches_tracked"


def module_key(module_path) -> str:
    """Flax module path (tuple of names) -> the torch module name: ``("layer1_0", "downsample_1")`` ->
    ``"layer1.0.downsample.1"``."""
    return ".".join(name.replace("_", ".") for name in module_path)


def _leaf_rule(collection, path, ndim):
    """(torch key, permutation) of the Flax leaf at `path` (module names + leaf name) of `collection`."""
    leaf = path[-1]
    rule = _LEAVES.get((collection, leaf, ndim)) or _LEAVES.get((collection, leaf, None))
    if rule is None:
        raise ValueError(f"torchvision_layout: no torch counterpart for {collection}/{'/'.join(path)} "
                         f"(rank {ndim}); known leaves: {sorted({(c, n) for c, n, _ in _LEAVES})}.")
    torch_leaf, permutation = rule
    return f"{module_key(path[:-1])}.{torch_leaf}", permutation


def _inverse(permutation):
    return None if permutation is None else tuple(int(i) for i in np.argsort(permutation))


def _permute(array, permutation):
    return array if permutation is None else np.transpose(array, permutation)


def to_torch(params, batch_stats=None, *, prefix: str = "", num_batches_tracked: int | None = None) -> dict:
    """Flax variables -> {torch key: numpy array} in torch layout (C-contiguous, as safetensors needs).

    Args:
      params: a Flax ``params`` tree (the ResNet backbone, the projection head, the geo head, ...).
      batch_stats: the matching ``batch_stats`` tree, or None for modules without BatchNorm.
      prefix: prepended to every key with a ``.`` (e.g. ``"projection"``); "" for the backbone, whose keys
        must be torchvision's bare names.
      num_batches_tracked: the int64 scalar written for every BatchNorm (see the module docstring); None
        writes none (modules without BatchNorm).
    """
    if batch_stats is not None and num_batches_tracked is None:
        raise ValueError("to_torch: batch_stats given without num_batches_tracked; torchvision's BatchNorm "
                         "state has it (pass the training step, or 0).")
    lead = f"{prefix}." if prefix else ""
    out = {}
    collections = {"params": params, "batch_stats": batch_stats or {}}
    for collection, tree in collections.items():
        for path, value in flax.traverse_util.flatten_dict(tree).items():
            value = np.asarray(value)
            key, permutation = _leaf_rule(collection, path, value.ndim)
            out[lead + key] = np.ascontiguousarray(_permute(value, permutation))
            if collection == "batch_stats" and path[-1] == "mean":
                out[f"{lead}{module_key(path[:-1])}.{NUM_BATCHES_TRACKED}"] = np.asarray(num_batches_tracked,
                                                                                        np.int64)
    return out


def from_torch(state_dict: Mapping[str, Any], like_params, like_batch_stats, *, where: str = "state_dict"):
    """{torch key: array} -> (params, batch_stats) shaped and typed like the given Flax trees.

    Every leaf of the like-trees must find its key with the matching shape. Keys outside the model's
    top-level torch modules are ignored (torchvision's classifier ``fc.*``, exported ``projection.*`` /
    ``geo_head.*`` heads), as is every ``num_batches_tracked``; an unused key *inside* them (``layer3.6.*``
    from a deeper ResNet) is an error, so a wrong architecture never loads partially. `where` names the
    source in error messages.
    """
    used, missing, mismatched = set(), [], []

    def convert(collection, tree):
        flat = {}
        for path, like in flax.traverse_util.flatten_dict(tree).items():
            key, permutation = _leaf_rule(collection, path, len(like.shape))
            if key not in state_dict:
                missing.append(key)
                continue
            value = np.asarray(state_dict[key])
            expected = like.shape if permutation is None else tuple(like.shape[i] for i in permutation)
            if value.shape != expected:
                mismatched.append(f"{key} is {list(value.shape)}, the model needs {list(expected)}")
                continue
            if not jnp.issubdtype(value.dtype, jnp.floating):  # jnp's: bfloat16 (ml_dtypes) counts, widened here.
                raise ValueError(f"{where}: {key} has dtype {value.dtype}; a floating-point array is needed.")
            used.add(key)
            flat[path] = _permute(value, _inverse(permutation)).astype(like.dtype)
        return flax.traverse_util.unflatten_dict(flat)

    params = convert("params", like_params)
    batch_stats = convert("batch_stats", like_batch_stats)
    # Top-level torch modules of the model ("layer1" for Flax's "layer1_0"): keys under them must all be used.
    roots = {module_key(path[:1]).split(".")[0] for path in flax.traverse_util.flatten_dict(like_params)}
    unexpected = sorted(k for k in state_dict if k not in used and k.split(".")[0] in roots
                        and not k.endswith("." + NUM_BATCHES_TRACKED))
    missing.sort()
    mismatched.sort()
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s) (first: {', '.join(missing[:3])})")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es) (first: {'; '.join(mismatched[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) (first: {', '.join(unexpected[:3])})")
    if problems:
        raise ValueError(f"{where} does not fit the model: {'; '.join(problems)}. Is it a ResNet of the "
                         "configured depth and width (config.model.depth, config.model.width; torchvision's width is "
                         "64)?")
    return params, batch_stats


def load_torchvision_resnet(path: str, like_params, like_batch_stats):
    """(params, batch_stats) of the Flax ResNet from a torchvision-layout safetensors file at `path`.

    `like_params` / `like_batch_stats` are the ResNet's variable trees (arrays or jax.ShapeDtypeStruct); the
    result has their structure, shapes and dtypes. torchvision's ``fc``, exported heads and every
    ``num_batches_tracked`` are ignored; anything else that does not fit is an error naming the keys.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist (expected a torchvision-layout .safetensors file).")
    try:
        state_dict = load_file(path)
    except SafetensorError as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}). Save a torch state_dict with "
                         "safetensors.torch.save_file(state_dict, path).") from e
    return from_torch(state_dict, like_params, like_batch_stats, where=path)
