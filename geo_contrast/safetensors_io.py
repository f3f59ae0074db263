"""Writes safetensors files atomically, with the permissions of every other output, and reads their metadata.
numpy and safetensors only.

A module of its own so that tools which only write weights (convert.py) do not import JAX: the torchvision
layout's own module (torchvision_layout.py, which re-exports `save_safetensors`) needs flax for its trees.
"""

from __future__ import annotations

import os
import secrets

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save

# The "format" metadata of every file this project writes (export.py, convert.py): what a reader needs to know.
FORMAT = "torchvision ResNet state_dict without fc (conv weights OIHW, Linear weights [out, in])"


def save_safetensors(tensors: dict, path: str, metadata: dict | None = None) -> None:
    """Writes {name: array} and string `metadata` to `path` as safetensors, replacing any file there atomically.

    A reader never sees a partial file: the bytes go to a temporary file beside `path` (the same filesystem),
    flushed to disk, then os.replace'd over it; on failure the temporary file is removed. The file is created
    by os.open with mode 0o666, so the kernel applies the umask (and any default ACL) as for any other output:
    safetensors' own save_file creates 0600 files, and mkstemp does too. Arrays are written C-contiguous
    (safetensors copies raw memory and would scramble a strided view), 0-d arrays stay 0-d.
    """
    data = save({name: np.asarray(array, order="C") for name, array in tensors.items()}, metadata=metadata)
    directory, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_metadata(path: str) -> dict:
    """The string metadata of a safetensors file (its header only: cheap), or a ValueError that names the file
    and says what is expected."""
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist or is not a file (expected a torchvision-layout .safetensors "
                         "file: python -m geo_contrast.convert turns a PyTorch checkpoint into one).")
    try:
        with safe_open(path, "np") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}); python -m geo_contrast.convert "
                         "turns a PyTorch checkpoint into one.") from e
