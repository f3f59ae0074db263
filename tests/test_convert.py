"""PyTorch checkpoints -> torchvision-layout safetensors (convert.py), read without torch (torch_checkpoint.py).

The fixtures in tests/fixtures/torch/ were written by torch 2.13.0+cpu running make_fixtures.py there (the one
file here that needs torch; these tests do not): real torch modules (torchvision's resnet18 layout at width 2,
MoCo-v2's encoders and queue, the authors' geo head, an SGD optimizer) saved with torch.save in the zip and the
legacy format. Every tensor's value is a function of its key in the file (`value`, `count`, as in
make_fixtures.py), so the expected arrays are recomputed here with numpy, and the expected keys come from the
project's Flax ResNet through torchvision_layout.to_torch: nothing is compared against the converter's own output.
"""

import os
import pickle
import re
import struct
import subprocess
import sys
import zipfile
import zlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from geo_contrast import convert
from geo_contrast import safetensors_io
from geo_contrast import torch_checkpoint
from geo_contrast import torchvision_layout
from geo_contrast.models.resnet import ResNet

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "torch")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTH = 2  # make_fixtures.WIDTH.
MOCO_FILES = ["moco_geo.pth.tar", "moco_geo_legacy.pth.tar"]
TENSOR_FILES = ["tensors.pth", "tensors_legacy.pth", "tensors_big_endian.pth"]
MLP = ["fc.0.weight", "fc.0.bias", "fc.2.weight", "fc.2.bias"]
FORMAT = "torchvision ResNet state_dict without fc (conv weights OIHW, Linear weights [out, in])"


def fixture(name):
    return os.path.join(FIXTURES, name)


def value(key, shape):
    return np.random.default_rng(zlib.crc32(key.encode())).standard_normal(shape).astype(np.float32)


def count(key):
    return np.asarray(zlib.crc32(key.encode()) % 1000, np.int64)


def expected(key, shape):
    """What make_fixtures.py stored under `key` (its full name in the file)."""
    return count(key) if key.endswith("num_batches_tracked") else value(key, shape)


@pytest.fixture(scope="module")
def resnet():
    """(abstract variables, {torch key: shape}) of the Flax ResNet-18 at the fixtures' width."""
    abstract = jax.eval_shape(lambda: ResNet(depth=18, width=WIDTH).init(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)
    layout = torchvision_layout.to_torch(zeros["params"], zeros["batch_stats"], num_batches_tracked=0)
    return abstract, {k: v.shape for k, v in layout.items()}


def assert_bitwise(actual, wanted, name):
    assert actual.dtype == wanted.dtype, (name, actual.dtype, wanted.dtype)
    assert actual.shape == wanted.shape, (name, actual.shape, wanted.shape)
    assert actual.tobytes() == wanted.tobytes(), name


# ---------------------------------------------------------------------------------------------------------------
# Reading torch.save's formats


@pytest.mark.parametrize("name", TENSOR_FILES)
def test_reads_views_offsets_parameters_and_every_dtype(name):
    """Shared storages, offsets and strides, an nn.Parameter, 0-d and empty tensors, both byte orders."""
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    wanted = {
        "base": base, "transposed": base.T, "corner": base[1:, 2:5], "every_other": base[:, ::2],
        "parameter": np.arange(6, dtype=np.float32).reshape(2, 3) / 4,
        "scalar": np.asarray(2.5, np.float64), "empty": np.zeros((0, 3), np.float32),
        "float16": np.arange(5, dtype=np.float16) / 8,
        "bfloat16": (np.arange(5) / 8).astype(ml_dtypes.bfloat16),
        "int64": np.arange(-2, 3, dtype=np.int64) * 2**40, "int32": np.arange(-2, 3, dtype=np.int32),
        "int16": np.arange(-2, 3, dtype=np.int16), "int8": np.arange(-2, 3, dtype=np.int8),
        "uint8": np.arange(250, 255, dtype=np.uint8), "bool": np.array([True, False, True]),
    }
    loaded = torch_checkpoint.load(fixture(name))
    assert list(loaded) == [*wanted, "plain"]
    for key, array in wanted.items():
        assert isinstance(loaded[key], np.ndarray) and loaded[key].flags.c_contiguous, key
        assert_bitwise(loaded[key], array, key)
    assert loaded["plain"] == {"lr": 0.1, "name": "x", "steps": [1, 2], "pair": (3, None)}


@pytest.mark.parametrize("name", MOCO_FILES)
def test_reads_the_authors_checkpoint_whole(name, resnet):
    _, layout = resnet
    loaded = torch_checkpoint.load(fixture(name))
    assert list(loaded) == ["epoch", "arch", "state_dict", "geo_dict", "optimizer"]
    assert loaded["epoch"] == 200 and loaded["arch"] == "resnet18"
    shapes = {"module.queue": (128, 16), "module.queue_ptr": (1,)}
    for encoder in ("encoder_q", "encoder_k"):
        shapes.update({f"module.{encoder}.{k}": s for k, s in layout.items()})
        shapes.update({f"module.{encoder}.fc.0.weight": (16, 16), f"module.{encoder}.fc.0.bias": (16,),
                       f"module.{encoder}.fc.2.weight": (128, 16), f"module.{encoder}.fc.2.bias": (128,)})
    state_dict = loaded["state_dict"]
    assert set(state_dict) == set(shapes)
    for key, shape in shapes.items():
        wanted = np.zeros(1, np.int64) if key == "module.queue_ptr" else expected(key, shape)
        assert_bitwise(state_dict[key], wanted, key)
    assert set(loaded["geo_dict"]) == {"module.layers.1.weight", "module.layers.1.bias"}
    assert_bitwise(loaded["geo_dict"]["module.layers.1.weight"], value("module.layers.1.weight", (10, 128)), "geo")
    (group,) = loaded["optimizer"]["param_groups"]
    assert group["lr"] == 0.03 and group["momentum"] == 0.9 and group["nesterov"] is False
    state = loaded["optimizer"]["state"]
    assert len(group["params"]) == 2 * 64 + 2  # Both encoders' parameters (backbone 60, MLP 4), the geo head's.
    assert len(state) == 64 + 2  # Momentum buffers for encoder_q and the geo head only.
    for index, entry in state.items():
        buffer = entry["momentum_buffer"]
        assert_bitwise(buffer, value(f"momentum.{index}", buffer.shape), f"momentum.{index}")


def test_both_formats_agree_and_state_dicts_keep_their_order():
    zip_format, legacy = (torch_checkpoint.load(fixture(n)) for n in MOCO_FILES)
    assert list(zip_format["state_dict"]) == list(legacy["state_dict"])
    assert list(zip_format["state_dict"])[:3] == ["module.queue", "module.queue_ptr",
                                                   "module.encoder_q.conv1.weight"]


# ---------------------------------------------------------------------------------------------------------------
# Refusing what would run code, and broken files


def os_system(command):
    """A pickle that calls os.system(command) when unpickled (protocol 2 header, protocol 0 opcodes)."""
    return b"\x80\x02cos\nsystem\n(X" + struct.pack("<I", len(command)) + command.encode() + b"tR."


def builtins_eval(expression):
    return b"\x80\x02cbuiltins\neval\n(X" + struct.pack("<I", len(expression)) + expression.encode() + b"tR."


def as_zip(pickled, path):
    """`pickled` as the data.pkl of a torch zip archive, which is where a crafted checkpoint would put it."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickled)
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/version", "3\n")


def as_legacy(pickled, path):
    header = [torch_checkpoint.MAGIC_NUMBER, torch_checkpoint.PROTOCOL_VERSION, {"little_endian": True}]
    with open(path, "wb") as f:
        for item in header:
            pickle.dump(item, f, protocol=2)
        f.write(pickled)
        pickle.dump([], f, protocol=2)


@pytest.mark.parametrize("container", [as_zip, as_legacy])
@pytest.mark.parametrize("payload, refused", [(os_system, "os.system"), (builtins_eval, "builtins.eval")])
def test_code_in_a_pickle_is_refused_unrun(tmp_path, container, payload, refused):
    marker = tmp_path / "ran"
    if payload is os_system:
        pickled = payload(f"touch {marker}")
    else:
        pickled = payload(f"__import__('pathlib').Path({str(marker)!r}).touch()")
    path = str(tmp_path / "evil.pth")
    container(pickled, path)
    with pytest.raises(torch_checkpoint.CheckpointFormatError) as error:
        torch_checkpoint.load(path)
    message = str(error.value)
    assert refused in message and "execute code" in message and path in message and "\n" not in message
    assert not marker.exists()
    pickle.loads(pickled)  # The control: the same bytes, unpickled as usual, do run the payload.
    assert marker.exists()


@pytest.mark.parametrize("module, name", [("posix", "system"), ("subprocess", "Popen"),
                                          ("numpy.core.multiarray", "_reconstruct"), ("torch", "load")])
def test_every_other_global_is_refused(tmp_path, module, name):
    path = str(tmp_path / "other.pth")
    as_zip(b"\x80\x02" + f"c{module}\n{name}\n.".encode(), path)
    with pytest.raises(torch_checkpoint.CheckpointFormatError, match=f"global {module}.{name},"):
        torch_checkpoint.load(path)


def crafted_tensor(path, stride, metadata=b""):
    """A zip checkpoint of one float32 tensor of size (2, 2) on the storage [0, 1, 2, 3], with the given stride
    (and optional pickled metadata argument), written opcode by opcode as torch.save would pickle it."""
    pickled = (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n("  # The callable, then its arguments:
               b"(Vstorage\nctorch\nFloatStorage\nV0\nVcpu\nI4\ntQ"  # the storage's persistent id,
               b"I0\n(I2\nI2\nt(I%d\nI%d\nt"  # the offset, size, stride,
               b"I00\nccollections\nOrderedDict\n)R%stR." % (*stride, metadata))  # requires_grad, hooks.
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickled)
        archive.writestr("archive/data/0", np.arange(4, dtype="<f4").tobytes())


def test_strides_beyond_the_storage_and_lazy_views_are_refused(tmp_path):
    """numpy's as_strided reads any memory it is pointed at; a crafted stride must not get there."""
    path = str(tmp_path / "crafted.pth")
    crafted_tensor(path, (1, 2))
    assert_bitwise(torch_checkpoint.load(path), np.array([[0, 2], [1, 3]], np.float32), "transposed")
    crafted_tensor(path, (3, 1))
    one_line_error(path, "reaches element 4 of a storage of 4")
    crafted_tensor(path, (2, 1), metadata=b"}(Vneg\nI01\nu")
    one_line_error(path, "view metadata")


def one_line_error(path, match):
    """load(path) fails with one line: the path, then a message with `match` (a regex; the path itself, named
    after the test, could match a word)."""
    with pytest.raises(torch_checkpoint.CheckpointFormatError) as error:
        torch_checkpoint.load(path)
    message = str(error.value)
    assert message.startswith(path) and "\n" not in message
    assert re.search(match, message[len(path):]), message


def test_truncated_and_random_files_are_one_line_errors(tmp_path):
    data = open(fixture("moco_geo.pth.tar"), "rb").read()
    (tmp_path / "half.pth.tar").write_bytes(data[: len(data) // 2])
    one_line_error(str(tmp_path / "half.pth.tar"), r"has no end \(central directory\): the file is truncated")
    legacy = open(fixture("moco_geo_legacy.pth.tar"), "rb").read()
    (tmp_path / "half_legacy.pth.tar").write_bytes(legacy[:-4])  # Inside the last storage (>= 8 bytes).
    one_line_error(str(tmp_path / "half_legacy.pth.tar"), "ends inside storage .*; the file is truncated")
    (tmp_path / "short_pickle.pth").write_bytes(legacy[:3000])  # Inside the object's pickle.
    one_line_error(str(tmp_path / "short_pickle.pth"), "truncated or corrupt")
    (tmp_path / "random.pth").write_bytes(b"\x13" + np.random.default_rng(0).bytes(999))
    one_line_error(str(tmp_path / "random.pth"), "not a file written by torch.save")
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"a": 1}, protocol=2))
    one_line_error(str(tmp_path / "plain.pkl"), "no torch magic number")


def test_a_missing_storage_record_is_named(tmp_path):
    path = str(tmp_path / "incomplete.pth")
    with zipfile.ZipFile(fixture("torchgeo_gassl.pth")) as source, zipfile.ZipFile(path, "w") as archive:
        for name in source.namelist():
            if name != "torchgeo_gassl/data/7":
                archive.writestr(name, source.read(name))
    one_line_error(path, "record torchgeo_gassl/data/7 of a tensor's storage is missing")


# ---------------------------------------------------------------------------------------------------------------
# Converting


def converted(name, tmp_path):
    out = str(tmp_path / f"{name}.safetensors")
    convert.convert(fixture(name), out)
    with safe_open(out, "np") as f:
        metadata = f.metadata()
    return out, load_file(out), metadata


@pytest.mark.parametrize("name", MOCO_FILES)
def test_moco_checkpoint_keeps_the_query_encoder_and_its_heads(name, resnet, tmp_path):
    _, layout = resnet
    out, tensors, metadata = converted(name, tmp_path)
    source_key = {f"projection.{k}": f"module.encoder_q.{k}" for k in MLP}
    source_key.update({"geo_head.fc.weight": "module.layers.1.weight", "geo_head.fc.bias": "module.layers.1.bias"})
    source_key.update({k: f"module.encoder_q.{k}" for k in layout})
    shapes = {**layout, "projection.fc.0.weight": (16, 16), "projection.fc.0.bias": (16,),
              "projection.fc.2.weight": (128, 16), "projection.fc.2.bias": (128,),
              "geo_head.fc.weight": (10, 128), "geo_head.fc.bias": (10,)}
    assert set(tensors) == set(shapes)
    for key, shape in shapes.items():
        assert_bitwise(tensors[key], expected(source_key[key], shape), key)
    assert tensors["layer3.0.downsample.1.num_batches_tracked"].dtype == np.int64
    assert metadata == {"format": FORMAT, "source": name, "source_format": "moco_checkpoint",
                        "kept": "backbone,projection,geo_head", "dropped": "queue,queue_ptr,encoder_k,optimizer",
                        "epoch": "200", "arch": "resnet18"}


@pytest.mark.parametrize("name, dropped", [("torchgeo_gassl.pth", ""), ("torchvision.pth", "fc")])
def test_torchvision_state_dicts_keep_the_backbone(name, dropped, resnet, tmp_path):
    _, layout = resnet
    _, tensors, metadata = converted(name, tmp_path)
    assert set(tensors) == set(layout)
    for key, shape in layout.items():
        assert_bitwise(tensors[key], expected(key, shape), key)
    assert metadata == {"format": FORMAT, "source": name, "source_format": "torchvision_state_dict",
                        "kept": "backbone", "dropped": dropped}


def test_the_converted_file_loads_into_the_flax_resnet(resnet, tmp_path):
    abstract, _ = resnet
    out, _, _ = converted("moco_geo.pth.tar", tmp_path)
    params, batch_stats = torchvision_layout.load_torchvision_resnet(out, abstract["params"],
                                                                     abstract["batch_stats"])
    assert jax.tree.map(np.shape, (params, batch_stats)) == jax.tree.map(lambda s: s.shape, (
        abstract["params"], abstract["batch_stats"]))
    kernel = value("module.encoder_q.layer2.0.conv2.weight", (4, 4, 3, 3))
    np.testing.assert_array_equal(params["layer2_0"]["conv2"]["kernel"], kernel.transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["layer4_0"]["downsample_1"]["scale"],
                                  value("module.encoder_q.layer4.0.downsample.1.weight", (16,)))
    np.testing.assert_array_equal(batch_stats["bn1"]["var"], value("module.encoder_q.bn1.running_var", (2,)))


def test_other_recognised_layouts(tmp_path):
    """The official MoCo-v2 checkpoint (no geo_dict), a DDP state_dict, state_dicts wrapped in a checkpoint."""
    checkpoint = torch_checkpoint.load(fixture("moco_geo.pth.tar"))
    del checkpoint["geo_dict"]
    moco = convert.convert_object(checkpoint, "moco_v2_800ep_pretrain.pth.tar")
    assert moco.metadata["kept"] == "backbone,projection" and "geo_head.fc.weight" not in moco.tensors
    assert moco.metadata["dropped"] == "queue,queue_ptr,encoder_k,optimizer"
    state_dict = checkpoint["state_dict"]
    for key in MLP:  # MoCo-v1: a single Linear as encoder_q.fc, which has no counterpart here.
        del state_dict[f"module.encoder_q.{key}"]
    v1 = convert.convert_object({"state_dict": state_dict}, "moco_v1.pth.tar")
    assert v1.metadata["kept"] == "backbone" and v1.metadata["dropped"] == "queue,queue_ptr,encoder_k"
    state_dict["module.encoder_q.fc.weight"] = np.zeros((128, 16), np.float32)
    v1 = convert.convert_object({"state_dict": state_dict}, "moco_v1.pth.tar")
    assert v1.metadata["dropped"] == "encoder_q.fc,queue,queue_ptr,encoder_k"
    assert set(v1.tensors) == set(moco.tensors) - {f"projection.{k}" for k in MLP}
    plain = torch_checkpoint.load(fixture("torchvision.pth"))
    ddp = convert.convert_object({f"module.{k}": v for k, v in plain.items()}, "ddp.pth")
    assert set(ddp.tensors) == set(plain) - {"fc.weight", "fc.bias"} and ddp.metadata["dropped"] == "fc"
    for key in ("state_dict", "model"):
        wrapped = convert.convert_object({key: plain, "epoch": 7, "optimizer": {}}, "wrapped.pth")
        assert set(wrapped.tensors) == set(ddp.tensors)
        assert wrapped.metadata["source_key"] == key and wrapped.metadata["epoch"] == "7"
        assert wrapped.metadata["dropped"] == "fc,optimizer"


@pytest.mark.parametrize("obj, match", [
    ([1, 2], "holds a list"),
    ({"weights": {"a": np.zeros(1)}}, "holds keys weights"),
    ({"encoder.conv1.weight": np.zeros(1)}, "has no conv1.weight"),
    ({"conv1.weight": np.zeros(1), "head.weight": np.zeros(1)}, "head.weight belong neither"),
])
def test_unknown_layouts_name_the_keys_and_the_known_layouts(obj, match):
    with pytest.raises(convert.ConvertError, match=match) as error:
        convert.convert_object(obj, "x.pth")
    assert "recognised: the authors' / MoCo-v2 checkpoint" in str(error.value)


# ---------------------------------------------------------------------------------------------------------------
# The file written, and the command line


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_output_mode_follows_the_umask_and_replaces_atomically(tmp_path, umask):
    path = tmp_path / "out.safetensors"
    path.write_text("old")
    previous = os.umask(umask)
    try:
        safetensors_io.save_safetensors({"a": np.arange(6.0).reshape(2, 3).T, "n": np.asarray(3)}, str(path),
                                        {"k": "v"})
    finally:
        os.umask(previous)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask
    assert os.listdir(tmp_path) == ["out.safetensors"]  # No temporary file left beside it.
    tensors = load_file(str(path))
    np.testing.assert_array_equal(tensors["a"], np.arange(6.0).reshape(2, 3).T)  # Strided input, right values.
    assert tensors["n"].shape == ()
    assert torchvision_layout.save_safetensors is safetensors_io.save_safetensors


def test_a_failed_write_leaves_no_temporary_file(tmp_path):
    (tmp_path / "out.safetensors").mkdir()  # os.replace cannot put a file over a directory.
    with pytest.raises(OSError):
        safetensors_io.save_safetensors({"a": np.zeros(2)}, str(tmp_path / "out.safetensors"))
    assert os.listdir(tmp_path) == ["out.safetensors"]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "geo_contrast.convert", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60)


def test_cli_success_is_one_line(tmp_path):
    out = str(tmp_path / "gassl.safetensors")
    result = run_cli(fixture("moco_geo.pth.tar"), "--out", out)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (f"Wrote {out}: backbone,projection,geo_head (126 tensors) from moco_geo.pth.tar "
                             "(moco_checkpoint); dropped: queue,queue_ptr,encoder_k,optimizer.\n")
    assert os.path.isfile(out)


def test_cli_mistakes_are_one_line_errors(tmp_path):
    evil = str(tmp_path / "evil.pth")
    as_zip(os_system("true"), evil)
    (tmp_path / "a_file").write_text("")
    cases = [
        ([str(tmp_path / "missing.pth"), "--out", str(tmp_path / "o.safetensors")], "does not exist"),
        ([evil, "--out", str(tmp_path / "o.safetensors")], "names the global os.system"),
        ([fixture("tensors.pth"), "--out", str(tmp_path / "o.safetensors")], "not a layout this converter knows"),
        ([fixture("torchvision.pth"), "--out", str(tmp_path / "a_file" / "o.safetensors")], "cannot write --out"),
    ]
    for args, match in cases:
        result = run_cli(*args)
        assert result.returncode == 1 and result.stdout == "", (args, result)
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], result.stderr
    assert not os.path.exists(tmp_path / "o.safetensors")


def test_cli_imports_neither_tensorflow_nor_jax(tmp_path):
    code = ("import sys; from geo_contrast import convert; "
            f"assert convert.main([{fixture('moco_geo.pth.tar')!r}, '--out', {str(tmp_path / 'o.safetensors')!r}]) "
            "== 0; print(' '.join(sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    modules = {name.split(".")[0] for name in result.stdout.splitlines()[-1].split()}
    assert "numpy" in modules and "safetensors" in modules  # The probe sees the conversion's imports.
    assert not modules & {"tensorflow", "jax", "jaxlib", "flax", "torch"}
