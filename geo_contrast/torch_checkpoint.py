"""Reads files written by ``torch.save`` with numpy alone: no torch, and no pickled code ever runs.

The released weights this project compares against (the authors' MoCo checkpoints, torchgeo's, torchvision's)
are torch pickles. ``pickle.load`` runs whatever callable a pickle names, so a downloaded checkpoint could
execute code; torch's own ``weights_only`` loader needs torch. This reader unpickles with an allowlist that
rebuilds tensors and plain containers, nothing else, and returns the object with every tensor as a numpy array
(``nn.Parameter`` too):

* allowed globals: ``torch._utils._rebuild_tensor_v2`` / ``_rebuild_tensor`` / ``_rebuild_parameter`` (rebuilt
  here from storage, offset, size and stride), the typed storage classes ``torch.FloatStorage`` ... (dtype
  markers only, never called) and ``collections.OrderedDict`` (``state_dict()``'s type). That is every global
  ``torch.save`` writes for state_dicts and optimizer state_dicts (checked on torch 2.13's output, see
  tests/fixtures/torch/make_fixtures.py). Any other (``os.system``, ``builtins.eval``, numpy's
  ``_reconstruct``, a pickled ``nn.Module`` class) fails the load, naming the global.
* formats: the zip archive of torch >= 1.6 (``<prefix>/data.pkl``, each storage raw in ``<prefix>/data/<key>``
  in the byte order of ``<prefix>/byteorder``, little-endian when absent as torch assumes), and the legacy
  stream (``_use_new_zipfile_serialization=False``): the pickles of the magic number, the protocol version and
  a sys_info dict, the object's pickle, the list of storage keys, then per key an int64 element count and the
  raw elements, both little-endian (torch's writer converts on big-endian hosts). Older formats (the tar
  archive, legacy storage views) are refused with a one-line error.

Tensors are read lazily in both formats: unpickling yields `_TensorRef` placeholders, the storages are read
(the legacy stream has them only after the object's pickle), then the placeholders become C-contiguous arrays.
Every problem a file can cause raises `CheckpointFormatError`, one line naming the file and what to do.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import struct
import sys
import zipfile
import zlib

import numpy as np

try:  # numpy has no bfloat16; jax's ml_dtypes adds it. Only bfloat16 tensors need it.
    import ml_dtypes
except ImportError:
    ml_dtypes = None

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C  # torch/serialization.py: the legacy stream's first pickle.
PROTOCOL_VERSION = 1001  # ... and its second.
# What zipfile raises on a damaged archive (a bad CRC, deflate stream, record header, compression method).
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, NotImplementedError, EOFError, OSError)
# torch.<Name>Storage -> numpy dtype (native byte order; the file's is applied when reading).
_STORAGE_DTYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool",
}


class CheckpointFormatError(ValueError):
    """The file is not a torch checkpoint this module reads, or it would run code if unpickled."""


@dataclasses.dataclass(frozen=True)
class _StorageType:
    """What a pickle's ``torch.FloatStorage`` (...) global resolves to: the name, which `_dtype` maps. Pickles
    only pass it to persistent ids; being neither a class nor callable, it cannot be instantiated or called."""
    name: str


@dataclasses.dataclass(eq=False)
class _Storage:
    """One storage of the file: element type and count from the pickle, the elements once read."""
    dtype: np.dtype
    numel: int
    data: np.ndarray | None = None


@dataclasses.dataclass
class _TensorRef:
    """A tensor until its storage has been read. Unhashable (dataclass eq), so no set or dict key can hold it."""
    storage: _Storage
    offset: int
    size: tuple
    stride: tuple
    metadata: dict | None = None  # torch's lazy conj/neg bits; see `_array`.


def _dtype(storage_type, where):
    if not isinstance(storage_type, _StorageType):
        raise CheckpointFormatError(f"{where}: a storage has type {storage_type!r}, not a torch storage class; "
                                    "the file is corrupt or not a torch checkpoint.")
    name = _STORAGE_DTYPES[storage_type.name]
    if name == "bfloat16":
        if ml_dtypes is None:
            raise CheckpointFormatError(f"{where}: holds bfloat16 tensors, which numpy reads only with the "
                                        "ml_dtypes package: pip install ml_dtypes.")
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _TensorRef(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    del requires_grad, backward_hooks  # Autograd state: meaningless for arrays.
    return _TensorRef(storage, storage_offset, tuple(size), tuple(stride), metadata)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    """An nn.Parameter is its data."""
    del requires_grad, backward_hooks
    return data


_ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}


class _Unpickler(pickle.Unpickler):
    """Resolves only `_ALLOWED_GLOBALS`; persistent ids (torch's storages) go to `persistent`."""

    def __init__(self, file, where, persistent=None):
        super().__init__(file, encoding="utf-8")  # torch.load's encoding for Python 2 strings.
        self._where = where
        self._persistent = persistent

    def find_class(self, module, name):
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise CheckpointFormatError(
                f"{self._where}: refused: its pickle names the global {module}.{name}, which is not one that "
                "rebuilds tensors or plain containers, so unpickling the file may execute code. If you trust its "
                "source, load it with torch and save only its tensors (torch.save(ckpt['state_dict'], ...)).")
        return allowed

    def persistent_load(self, pid):
        if self._persistent is None:
            raise CheckpointFormatError(f"{self._where}: a storage reference where torch writes none; the file is "
                                        "corrupt or not a torch checkpoint.")
        return self._persistent(pid)


def _unpickle(file, where, persistent=None):
    """One pickle from `file`; any failure of a corrupt or truncated pickle becomes CheckpointFormatError."""
    try:
        return _Unpickler(file, where, persistent).load()
    except CheckpointFormatError:
        raise
    except Exception as e:  # Malformed pickles fail in every way (EOFError, TypeError, RecursionError, ...).
        raise CheckpointFormatError(f"{where}: its pickle is truncated or corrupt ({_one_line(e)}); download or "
                                    "save it again.") from e


def _one_line(e):
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def _check_nbytes(storage, nbytes, name, where):
    """Before reading: a storage's bytes in the file are exactly what its tensors' storage holds."""
    if nbytes != storage.numel * storage.dtype.itemsize:
        raise CheckpointFormatError(f"{where}: storage {name} has {nbytes} bytes where its tensors need "
                                    f"{storage.numel * storage.dtype.itemsize}; the file is truncated or corrupt.")


def _fill(storage, raw, byteorder):
    """Sets `storage`'s elements from `raw` bytes stored in `byteorder` ("little" / "big")."""
    data = np.frombuffer(raw, storage.dtype)
    if byteorder != sys.byteorder and storage.dtype.itemsize > 1:
        # Via unsigned integers of the same width: byteswap is defined for those, also under ml_dtypes' bfloat16.
        data = data.view(f"u{storage.dtype.itemsize}").byteswap().view(storage.dtype)
    storage.data = data


def _array(ref, where):
    """The C-contiguous array of a tensor: `size` elements at `offset` + sum(index * `stride`) of its storage.
    Bounds are checked first: numpy's as_strided would read past the storage (any memory) if told to. A tensor
    with conj/neg bits (a lazily negated view) is refused: a plain array would have the wrong sign."""
    if ref.metadata:
        raise CheckpointFormatError(f"{where}: a tensor carries view metadata {ref.metadata!r:.80} (a lazily "
                                    "conjugated or negated view); save it after .resolve_conj().resolve_neg().")
    offset, size, stride = ref.offset, ref.size, ref.stride
    numbers = (offset, *size, *stride)
    if (not all(isinstance(n, int) and n >= 0 for n in numbers)) or len(size) != len(stride):
        raise CheckpointFormatError(f"{where}: a tensor has offset {offset!r}, size {size!r}, stride {stride!r}; "
                                    "the file is corrupt.")
    data = ref.storage.data
    if 0 in size:
        return np.zeros(size, data.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= data.size:
        raise CheckpointFormatError(f"{where}: a tensor reaches element {last} of a storage of {data.size}; the "
                                    "file is corrupt.")
    view = np.lib.stride_tricks.as_strided(data[offset:], size, [s * data.itemsize for s in stride],
                                           writeable=False)
    return np.array(view, order="C")


def _materialize(obj, where):
    """`obj` with every _TensorRef replaced by its array: dicts and lists in place, tuples rebuilt."""
    if isinstance(obj, _TensorRef):
        return _array(obj, where)
    if isinstance(obj, dict):
        for key, value in obj.items():
            obj[key] = _materialize(value, where)
    elif isinstance(obj, list):
        obj[:] = [_materialize(value, where) for value in obj]
    elif isinstance(obj, tuple):
        return tuple(_materialize(value, where) for value in obj)
    return obj


def _arrays(obj, where):
    """_materialize, with a crafted self-containing list or dict (torch never writes one) a format error."""
    try:
        return _materialize(obj, where)
    except RecursionError as e:
        raise CheckpointFormatError(f"{where}: its object nests too deep or contains itself; the file is corrupt "
                                    "or crafted.") from e


class _Storages:
    """The persistent-id handler of one file: a `_Storage` per key, the same object for every tensor on it."""

    def __init__(self, where, legacy):
        self.where = where
        self.legacy = legacy
        self.by_key = {}

    def __call__(self, pid):
        # Zip: ("storage", type, key, location, numel); legacy adds view metadata, which current torch leaves None.
        # (A pickled nn.Module's ("module", class, ...) id never gets here: its class is a refused global.)
        fields = 6 if self.legacy else 5
        if not (isinstance(pid, tuple) and len(pid) == fields and pid[0] == "storage"):
            raise CheckpointFormatError(f"{self.where}: holds a persistent id {pid!r:.80} where torch writes its "
                                        "storages; the file is corrupt or not a torch checkpoint.")
        storage_type, key, numel = pid[1], pid[2], pid[4]
        if self.legacy and pid[5] is not None:
            raise CheckpointFormatError(f"{self.where}: uses the storage views of old legacy files; load it with "
                                        "torch and save it again.")
        if not (isinstance(key, str) and isinstance(numel, int) and numel >= 0):
            raise CheckpointFormatError(f"{self.where}: a storage has key {key!r} and size {numel!r}; the file is "
                                        "corrupt.")
        dtype = _dtype(storage_type, self.where)
        storage = self.by_key.setdefault(key, _Storage(dtype, numel))
        if storage.numel != numel or storage.dtype != dtype:
            raise CheckpointFormatError(f"{self.where}: storage {key} is referenced with two types or sizes; the "
                                        "file is corrupt.")
        return storage


def _load_zip(archive, where):
    names = archive.namelist()
    pickles = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
    if len(pickles) != 1:
        hint = (" It looks like TorchScript (torch.jit.save), which this reader does not load."
                if any(n.endswith("/constants.pkl") for n in names) else "")
        raise CheckpointFormatError(f"{where}: a zip archive without exactly one <prefix>/data.pkl record, so not "
                                    f"a torch.save checkpoint.{hint}")
    prefix = pickles[0][:-len("data.pkl")]
    byteorder = "little"  # torch's assumption for files without the record (written before torch 1.12).
    if prefix + "byteorder" in names:
        byteorder = archive.read(prefix + "byteorder").decode("ascii", "replace")
        if byteorder not in ("little", "big"):
            raise CheckpointFormatError(f"{where}: byteorder record {byteorder!r} is neither 'little' nor 'big'; "
                                        "the file is corrupt.")
    storages = _Storages(where, legacy=False)
    obj = _unpickle(io.BytesIO(archive.read(pickles[0])), where, storages)
    for key, storage in storages.by_key.items():
        name = f"{prefix}data/{key}"
        if name not in names:
            raise CheckpointFormatError(f"{where}: the record {name} of a tensor's storage is missing; the file "
                                        "is incomplete, save or download it again.")
        _check_nbytes(storage, archive.getinfo(name).file_size, name, where)
        _fill(storage, archive.read(name), byteorder)
    return _arrays(obj, where)


def _load_legacy(file, where):
    size = os.fstat(file.fileno()).st_size
    magic = _unpickle(file, where)
    if magic != MAGIC_NUMBER:
        raise CheckpointFormatError(f"{where}: a pickle, but not one written by torch.save (no torch magic "
                                    "number); check the path.")
    protocol = _unpickle(file, where)
    if protocol != PROTOCOL_VERSION:
        raise CheckpointFormatError(f"{where}: torch's legacy format of protocol version {protocol!r}, not "
                                    f"{PROTOCOL_VERSION}; load it with torch and save it again.")
    _unpickle(file, where)  # sys_info: the writer's byte order and C type sizes; the data is little-endian.
    storages = _Storages(where, legacy=True)
    obj = _unpickle(file, where, storages)
    keys = _unpickle(file, where)
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)
            and set(keys) == set(storages.by_key)):
        raise CheckpointFormatError(f"{where}: its storage list does not match the tensors' storages; the file is "
                                    "corrupt.")
    for key in keys:
        storage = storages.by_key[key]
        header = file.read(8)
        if len(header) < 8:
            raise CheckpointFormatError(f"{where}: ends before storage {key}; the file is truncated, save or "
                                        "download it again.")
        (numel,) = struct.unpack("<q", header)
        if numel != storage.numel:
            raise CheckpointFormatError(f"{where}: storage {key} has {numel} elements where its tensors say "
                                        f"{storage.numel}; the file is corrupt.")
        nbytes = numel * storage.dtype.itemsize
        if nbytes > size - file.tell():
            raise CheckpointFormatError(f"{where}: ends inside storage {key}; the file is truncated, save or "
                                        "download it again.")
        _fill(storage, file.read(nbytes), "little")
    return _arrays(obj, where)


def load(path: str):
    """The object `torch.save` wrote to `path`, tensors as numpy arrays (native byte order, C-contiguous).

    Raises FileNotFoundError / PermissionError as open() does, and CheckpointFormatError for anything the file
    itself gets wrong: not a torch checkpoint, truncated or corrupt, a refused global, a missing storage.
    """
    with open(path, "rb") as file:
        head = file.read(4)
        is_zip = zipfile.is_zipfile(file)  # Reads the end of the file: seek back after.
        file.seek(0)
        if is_zip:
            try:
                with zipfile.ZipFile(file) as archive:
                    return _load_zip(archive, path)
            except _ZIP_ERRORS as e:
                raise CheckpointFormatError(f"{path}: a corrupt zip archive ({_one_line(e)}); download or save it "
                                            "again.") from e
        if head.startswith(b"PK"):
            raise CheckpointFormatError(f"{path}: starts as a zip archive but has no end (central directory): "
                                        "the file is truncated, e.g. an interrupted download; download it again.")
        if head[:1] == b"\x80":  # Pickle protocol 2+ opcode, as torch's legacy stream begins.
            return _load_legacy(file, path)
    raise CheckpointFormatError(f"{path}: not a file written by torch.save (neither its zip format nor its legacy "
                                "pickle stream); check the path.")
