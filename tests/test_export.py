"""Export to / import from the torchvision state_dict layout (safetensors).

The expected layout is written out here from torchvision's ResNet definition (stage sizes, block kinds, the
Bottleneck expansion of 4), not taken from the exporter. Variable trees come from jax.eval_shape filled with
numpy draws: a real init compiles a kernel per shape and would dominate the run time on CPU.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file
from safetensors.numpy import save_file

from configs import fmow
from geo_contrast import checkpointing
from geo_contrast import export
from geo_contrast import geo_clusters
from geo_contrast import train_setup
from geo_contrast import torchvision_layout
from geo_contrast import workdir as workdir_lib
from geo_contrast.models import moco
from geo_contrast.models.resnet import ResNet

# torchvision.models.resnetNN: blocks per stage and block kind (BasicBlock: expansion 1, Bottleneck: 4).
TORCHVISION_STAGES = {18: ((2, 2, 2, 2), "basic"), 34: ((3, 4, 6, 3), "basic"), 50: ((3, 4, 6, 3), "bottleneck")}
# torchvision's documented resnet50 total, 25,557,032, minus fc (2048 * 1000 + 1000).
RESNET50_BACKBONE_PARAMS = 25_557_032 - 2_049_000


def expected_layout(depth, width=64):
    """{key: shape} of torchvision's resnet{depth}(...).state_dict() without fc, channels scaled by width/64."""
    blocks, kind = TORCHVISION_STAGES[depth]
    expansion = 4 if kind == "bottleneck" else 1
    layout = {}

    def conv(name, out, inp, k):
        layout[f"{name}.weight"] = (out, inp, k, k)

    def bn(name, channels):
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            layout[f"{name}.{leaf}"] = (channels,)
        layout[f"{name}.num_batches_tracked"] = ()

    conv("conv1", width, 3, 7)
    bn("bn1", width)
    inplanes = width
    for stage, num_blocks in enumerate(blocks, 1):
        planes = width * 2 ** (stage - 1)
        for b in range(num_blocks):
            p = f"layer{stage}.{b}"
            if kind == "bottleneck":
                conv(f"{p}.conv1", planes, inplanes, 1)
                bn(f"{p}.bn1", planes)
                conv(f"{p}.conv2", planes, planes, 3)
                bn(f"{p}.bn2", planes)
                conv(f"{p}.conv3", planes * expansion, planes, 1)
                bn(f"{p}.bn3", planes * expansion)
            else:
                conv(f"{p}.conv1", planes, inplanes, 3)
                bn(f"{p}.bn1", planes)
                conv(f"{p}.conv2", planes, planes, 3)
                bn(f"{p}.bn2", planes)
            if b == 0 and (stage > 1 or inplanes != planes * expansion):
                conv(f"{p}.downsample.0", planes * expansion, inplanes, 1)
                bn(f"{p}.downsample.1", planes * expansion)
            inplanes = planes * expansion
    return layout


def abstract_variables(depth, width):
    return jax.eval_shape(lambda: ResNet(depth=depth, width=width).init(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))


def fill(tree, seed):
    """Concrete numpy arrays for an abstract tree: distinct random values for every float, zeros otherwise."""
    rng = np.random.default_rng(seed)

    def draw(leaf):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            return rng.normal(size=leaf.shape).astype(leaf.dtype)
        return np.zeros(leaf.shape, leaf.dtype)

    return jax.tree.map(draw, tree)


def torch_layout_from_flax(variables):
    return torchvision_layout.to_torch(variables["params"], variables["batch_stats"], num_batches_tracked=0)


def test_resnet50_keys_and_shapes_are_torchvisions():
    abstract = abstract_variables(50, 64)
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)
    exported = torch_layout_from_flax(zeros)
    expected = expected_layout(50)
    assert len(expected) == 318  # torchvision resnet50's 320 state_dict entries minus fc.weight and fc.bias.
    assert {k: v.shape for k, v in exported.items()} == expected
    learned = sum(v.size for k, v in exported.items() if k.endswith((".weight", ".bias")))
    assert learned == RESNET50_BACKBONE_PARAMS
    assert exported["layer3.5.bn2.num_batches_tracked"].dtype == np.int64


def test_resnet50_imports_a_torchvision_state_dict_with_its_classifier():
    """A torchvision state dict (fc included) loads; kernels land HWIO: kernel[h, w, i, o] = weight[o, i, h, w]."""
    rng = np.random.default_rng(0)
    state_dict = {k: rng.normal(size=shape).astype(np.float32) if shape else np.asarray(7, np.int64)
                  for k, shape in expected_layout(50).items()}
    state_dict["fc.weight"] = np.zeros((1000, 2048), np.float32)
    state_dict["fc.bias"] = np.zeros((1000,), np.float32)
    abstract = abstract_variables(50, 64)
    params, batch_stats = torchvision_layout.from_torch(state_dict, abstract["params"], abstract["batch_stats"])
    assert jax.tree.map(np.shape, params) == jax.tree.map(lambda s: s.shape, abstract["params"])
    kernel, weight = params["layer2_0"]["conv2"]["kernel"], state_dict["layer2.0.conv2.weight"]
    assert kernel[0, 2, 5, 7] == weight[7, 5, 0, 2]
    assert kernel[2, 1, 100, 3] == weight[3, 100, 2, 1]
    np.testing.assert_array_equal(params["layer4_0"]["downsample_1"]["scale"],
                                  state_dict["layer4.0.downsample.1.weight"])
    np.testing.assert_array_equal(batch_stats["bn1"]["var"], state_dict["bn1.running_var"])
    np.testing.assert_array_equal(batch_stats["layer1_2"]["bn3"]["mean"], state_dict["layer1.2.bn3.running_mean"])


# ---------------------------------------------------------------------------------------------------------------
# The CLI on a checkpoint


@pytest.fixture(scope="module")
def geo_workdir(tmp_path_factory):
    """A workdir with a geo_tp checkpoint (ResNet-18 width 4, random values everywhere) and its clusters."""
    workdir = str(tmp_path_factory.mktemp("export"))
    config = fmow.get_config("sample")
    config.model.width = 4
    config.moco.queue_size = 128
    config.input.image_size = 32
    encoder = train_setup.build_encoder(config.model)
    geo_head = moco.GeoHead(config.geo.num_clusters)
    tx = train_setup.optimizer(config, train_setup.learning_rate_schedule(config, steps_per_epoch=1))
    state = fill(jax.eval_shape(lambda: train_setup.init_state(config, encoder, geo_head, tx, 32, 0)), seed=1)
    state = state.replace(step=np.int32(12))
    mngr = checkpointing.manager(workdir_lib.checkpoints_dir(workdir), keep=2)
    checkpointing.save(mngr, 12, state, {"variant": config.variant, "config": json.loads(config.to_json()),
                                         "total_steps": 30})
    checkpointing.wait(mngr)
    centroids = geo_clusters.fit(np.random.default_rng(0).uniform([-60, -180], [60, 180], (50, 2)),
                                 config.geo.num_clusters, seed=0)
    np.savez(workdir_lib.clusters_path(workdir), centroids=centroids,
             centroids_latlon=geo_clusters.centroids_latlon(centroids))
    return workdir, state


def test_cli_export_then_import_is_the_identity(geo_workdir, tmp_path):
    workdir, state = geo_workdir
    out = str(tmp_path / "encoder.safetensors")
    export.main([f"--workdir={workdir}", f"--out={out}"])
    tensors = load_file(out)
    assert {k: v.shape for k, v in tensors.items()} == expected_layout(18, width=4)
    assert tensors["bn1.num_batches_tracked"] == 12 and tensors["bn1.num_batches_tracked"].dtype == np.int64

    backbone = state.params["encoder"]["backbone"], state.batch_stats["backbone"]
    params, batch_stats = torchvision_layout.load_torchvision_resnet(out, *backbone)
    for original, loaded in zip(backbone, (params, batch_stats), strict=True):
        assert jax.tree.structure(original) == jax.tree.structure(loaded)
        for a, b in zip(jax.tree.leaves(original), jax.tree.leaves(loaded), strict=True):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_the_exported_file_follows_the_umask_like_every_other_output(geo_workdir, tmp_path, umask):
    workdir, _ = geo_workdir
    out = tmp_path / "encoder.safetensors"
    previous = os.umask(umask)
    try:
        export.export(workdir, str(out))
    finally:
        os.umask(previous)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["encoder.safetensors"]  # No temporary file left behind.


def test_a_workdir_without_checkpoints_is_one_error_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export.main([f"--workdir={tmp_path}", f"--out={tmp_path / 'out.safetensors'}"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "holds no finished pretraining checkpoint" in err


def test_metadata_names_what_a_user_needs(geo_workdir, tmp_path):
    workdir, _ = geo_workdir
    out = str(tmp_path / "encoder.safetensors")
    export.export(workdir, out)
    with safe_open(out, "np") as f:
        meta = f.metadata()
    assert meta["architecture"] == "resnet18" and meta["depth"] == "18" and meta["width"] == "4"
    assert meta["feature_dim"] == "32"  # width 4 * 8 channels at stage 4, BasicBlock expansion 1.
    assert meta["variant"] == "geo_tp" and meta["step"] == "12" and meta["image_size"] == "32"
    np.testing.assert_allclose(json.loads(meta["input_mean"]), [0.485, 0.456, 0.406])
    np.testing.assert_allclose(json.loads(meta["input_std"]), [0.229, 0.224, 0.225])
    assert meta["heads"] == ""


def test_heads_in_torch_linear_layout(geo_workdir, tmp_path):
    workdir, state = geo_workdir
    out = str(tmp_path / "heads.safetensors")
    export.export(workdir, out, heads=True)
    tensors = load_file(out)
    projection = state.params["encoder"]["projection"]
    geo = state.params["geo_head"]["fc"]
    heads = {k: tensors[k].shape for k in set(tensors) - set(expected_layout(18, width=4))}
    assert heads == {
        "projection.fc.0.weight": (32, 32), "projection.fc.0.bias": (32,),
        "projection.fc.2.weight": (128, 32), "projection.fc.2.bias": (128,),
        "geo_head.fc.weight": (10, 128), "geo_head.fc.bias": (10,)}
    # torch's Linear computes x @ weight.T + bias, Flax's Dense x @ kernel + bias: same outputs.
    x = np.random.default_rng(2).normal(size=(3, 32)).astype(np.float32)
    np.testing.assert_allclose(x @ tensors["projection.fc.0.weight"].T + tensors["projection.fc.0.bias"],
                               x @ projection["fc_0"]["kernel"] + projection["fc_0"]["bias"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(tensors["geo_head.fc.weight"], geo["kernel"].T)
    with safe_open(out, "np") as f:
        meta = f.metadata()
    assert meta["heads"] == "projection,geo_head"
    with np.load(workdir_lib.clusters_path(workdir)) as f:
        np.testing.assert_allclose(json.loads(meta["geo_centroids_latlon"]), f["centroids_latlon"], atol=1e-4)
    # The heads do not disturb the backbone import.
    params, _ = torchvision_layout.load_torchvision_resnet(out, state.params["encoder"]["backbone"],
                                               state.batch_stats["backbone"])
    np.testing.assert_array_equal(params["conv1"]["kernel"], state.params["encoder"]["backbone"]["conv1"]["kernel"])


def test_wrong_architecture_is_refused_with_the_keys(tmp_path):
    path = str(tmp_path / "resnet34.safetensors")
    save_file(torch_layout_from_flax(fill(abstract_variables(34, 4), seed=0)), path)
    like18 = abstract_variables(18, 4)
    with pytest.raises(ValueError, match=r"unexpected key\(s\) \(first: layer1\.2\.bn1\.bias"):
        torchvision_layout.load_torchvision_resnet(path, like18["params"], like18["batch_stats"])
    like_wide = abstract_variables(34, 8)
    with pytest.raises(ValueError, match=r"shape mismatch\(es\) \(first: bn1\.bias is \[4\], the model needs \[8\]"):
        torchvision_layout.load_torchvision_resnet(path, like_wide["params"], like_wide["batch_stats"])
    like50 = abstract_variables(50, 4)
    with pytest.raises(ValueError, match=r"missing key\(s\) \(first: layer1\.0\.bn3\.bias"):
        torchvision_layout.load_torchvision_resnet(path, like50["params"], like50["batch_stats"])


@pytest.mark.parametrize("dtype", [np.float16, jnp.bfloat16])
def test_half_precision_files_import_as_float32(tmp_path, dtype):
    """Hub weights are often stored in float16/bfloat16; they widen exactly to the model's float32."""
    like = abstract_variables(18, 4)
    state_dict = {k: v.astype(dtype) if v.dtype == np.float32 else v
                  for k, v in torch_layout_from_flax(fill(like, seed=4)).items()}
    path = str(tmp_path / "half.safetensors")
    save_file(state_dict, path)
    params, batch_stats = torchvision_layout.load_torchvision_resnet(path, like["params"], like["batch_stats"])
    assert params["layer2_1"]["conv1"]["kernel"].dtype == np.float32
    np.testing.assert_array_equal(batch_stats["layer4_0"]["downsample_1"]["var"],
                                  state_dict["layer4.0.downsample.1.running_var"].astype(np.float32))


def test_unreadable_inputs_are_clear_errors(tmp_path):
    like = abstract_variables(18, 4)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        torchvision_layout.load_torchvision_resnet(str(tmp_path / "none.safetensors"), like["params"],
                                                   like["batch_stats"])
    pickle = tmp_path / "resnet50.pth"
    pickle.write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        torchvision_layout.load_torchvision_resnet(str(pickle), like["params"], like["batch_stats"])
    with pytest.raises(workdir_lib.WorkdirError, match="holds no finished pretraining checkpoint"):
        export.export(str(tmp_path), str(tmp_path / "out.safetensors"))


# ---------------------------------------------------------------------------------------------------------------
# torchvision itself (only where torch is installed; the project does not depend on it)


def test_torchvision_resnet50_computes_the_same_features(tmp_path):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    model = ResNet(depth=50, width=64)
    rng = np.random.default_rng(3)

    def draw(path, leaf):
        """He-scaled kernels, BN statistics away from their defaults, and residual branches ending in a small
        BN scale (as torchvision's zero_init_residual, but not zero): 16 blocks then keep the features O(1),
        so the absolute tolerance below means float32 agreement rather than 1e-4 of a feature of size 1e4."""
        name = path[-1].key
        if name == "kernel":
            return rng.normal(scale=np.sqrt(2.0 / np.prod(leaf.shape[:-1])), size=leaf.shape).astype(np.float32)
        if name == "scale" and path[-2].key == "bn3":
            return rng.uniform(0.05, 0.15, size=leaf.shape).astype(np.float32)
        if name in ("scale", "var"):
            return rng.uniform(0.5, 1.5, size=leaf.shape).astype(np.float32)
        return rng.normal(scale=0.1, size=leaf.shape).astype(np.float32)

    variables = jax.tree_util.tree_map_with_path(draw, abstract_variables(50, 64))
    path = str(tmp_path / "resnet50.safetensors")
    save_file(torch_layout_from_flax(variables), path)
    images = rng.uniform(-2, 2, size=(2, 64, 64, 3)).astype(np.float32)
    flax_features = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images))

    from safetensors.torch import load_file as load_torch

    net = torchvision.models.resnet50()
    net.fc = torch.nn.Identity()
    net.load_state_dict(load_torch(path))  # strict: every key present, none left over.
    net.eval()
    with torch.no_grad():
        torch_features = net(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    assert torch_features.shape == flax_features.shape == (2, 2048)
    assert 0.1 < np.abs(flax_features).mean() < 10  # O(1) features, and not all zero after the last ReLU.
    assert np.max(np.abs(torch_features - flax_features)) <= 1e-4
