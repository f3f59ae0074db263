"""ResNet backbone and MoCo heads: torchvision's sizes, names and arithmetic, checked against numpy.

Most tests fill the variable tree (shapes from jax.eval_shape) with numpy draws instead of calling
``init``: on CPU a real init compiles a random-number kernel per parameter shape and would dominate the
file's run time. ``test_init_matches_torchvision`` covers ``init`` itself.
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from geo_contrast.models.moco import Encoder, GeoHead, ProjectionHead
from geo_contrast.models.resnet import ResNet

# torchvision's documented totals (resnetNN(num_classes=1000)) minus the fc layer (feature_dim * 1000 + 1000).
TORCHVISION_BACKBONE_PARAMS = {18: 11_689_512 - (512 * 1000 + 1000), 50: 25_557_032 - (2048 * 1000 + 1000)}
EPS = 1e-5


def _abstract_variables(module, image_size=32):
    return jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)),
                                              train=False))


def _random_variables(module, seed):
    """A concrete variable tree for `module` with non-trivial values everywhere: He-scaled kernels (so
    activations stay O(1) through the net) and BN scale/bias/running stats away from their 1/0 defaults."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "kernel":
            value = rng.normal(scale=np.sqrt(2.0 / np.prod(shape[:-1])), size=shape)
        elif name in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, size=shape)
        else:  # bias, mean
            value = rng.normal(scale=0.1, size=shape)
        return jnp.asarray(value, jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, _abstract_variables(module))


@pytest.fixture(scope="module")
def resnet18():
    model = ResNet(depth=18, width=8)
    return model, _random_variables(model, seed=0)


@pytest.fixture(scope="module")
def resnet50():
    model = ResNet(depth=50, width=8)
    return model, _random_variables(model, seed=1)


def _module_paths(params):
    """'/'-joined paths of the modules that own parameters (leaf names dropped)."""
    return {"/".join(path[:-1]) for path in flax.traverse_util.flatten_dict(params)}


def _expected_paths(blocks_per_stage, bottleneck, downsampled):
    paths = {"conv1", "bn1"}
    for stage, num_blocks in enumerate(blocks_per_stage, start=1):
        for block in range(num_blocks):
            name = f"layer{stage}_{block}"
            layers = 3 if bottleneck else 2
            paths |= {f"{name}/conv{i}" for i in range(1, layers + 1)}
            paths |= {f"{name}/bn{i}" for i in range(1, layers + 1)}
            if name in downsampled:
                paths |= {f"{name}/downsample_0", f"{name}/downsample_1"}
    return paths


def _np_conv(x, kernel, stride, pad):
    """Torch Conv2d semantics (symmetric zero padding, no bias) on NHWC / HWIO arrays, float64."""
    x = np.pad(np.asarray(x, np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    kh, kw = kernel.shape[:2]
    out_h = (x.shape[1] - kh) // stride + 1
    out_w = (x.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], out_h, out_w, kernel.shape[3]))
    for i in range(kh):
        for j in range(kw):
            patch = x[:, i:i + stride * out_h:stride, j:j + stride * out_w:stride, :]
            out += np.einsum("bhwc,co->bhwo", patch, np.asarray(kernel[i, j], np.float64))
    return out


def _np_maxpool_3x3_s2_p1(x):
    """Torch MaxPool2d(3, stride=2, padding=1): pads with -inf."""
    x = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    out_h, out_w = (x.shape[1] - 3) // 2 + 1, (x.shape[2] - 3) // 2 + 1
    windows = [x[:, i:i + 2 * out_h:2, j:j + 2 * out_w:2, :] for i in range(3) for j in range(3)]
    return np.max(np.stack(windows), axis=0)


def _np_bn(x, mean, var, scale, bias):
    return (x - np.asarray(mean)) / np.sqrt(np.asarray(var, np.float64) + EPS) * np.asarray(scale) + np.asarray(bias)


def _intermediate(state, *path):
    node = state["intermediates"]
    for name in path:
        node = node[name]
    return np.asarray(node["__call__"][0], np.float64)


@pytest.mark.parametrize("depth", [18, 50])
def test_parameter_count_matches_torchvision(depth):
    params = _abstract_variables(ResNet(depth=depth))["params"]
    assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)) == TORCHVISION_BACKBONE_PARAMS[depth]


@pytest.mark.parametrize("depth,width,expected", [(18, 64, 512), (34, 64, 512), (50, 64, 2048),
                                                  (101, 64, 2048), (152, 64, 2048), (18, 8, 64), (50, 16, 512)])
def test_feature_dim(depth, width, expected):
    assert ResNet(depth=depth, width=width).feature_dim == expected


def test_module_names_follow_torchvision_layout():
    params18 = _abstract_variables(ResNet(depth=18, width=8))["params"]
    assert _module_paths(params18) == _expected_paths((2, 2, 2, 2), False, {"layer2_0", "layer3_0", "layer4_0"})
    params50 = _abstract_variables(ResNet(depth=50, width=8))["params"]
    assert _module_paths(params50) == _expected_paths(
        (3, 4, 6, 3), True, {"layer1_0", "layer2_0", "layer3_0", "layer4_0"})
    # Bottleneck widths as torchvision's resnet50 (scaled by 8/64): 1x1 reduce, 3x3, 1x1 expand x4.
    assert params50["layer2_0"]["conv1"]["kernel"].shape == (1, 1, 32, 16)
    assert params50["layer2_0"]["conv2"]["kernel"].shape == (3, 3, 16, 16)
    assert params50["layer2_0"]["conv3"]["kernel"].shape == (1, 1, 16, 64)
    assert params50["layer2_0"]["downsample_0"]["kernel"].shape == (1, 1, 32, 64)


def test_forward_matches_torch_arithmetic(resnet50):
    """Stem conv and BN, -inf max-pool padding, the stride on the 3x3 conv (v1.5), torch's padding of a
    stride-2 3x3 conv, and the final average pool, each recomputed in numpy from the captured input of that
    step. Eval mode: BN uses the (random) running statistics."""
    model, variables = resnet50
    p, stats = variables["params"], variables["batch_stats"]
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    out, state = model.apply(variables, x, train=False, capture_intermediates=True, mutable=["intermediates"])

    conv = _np_conv(x, p["conv1"]["kernel"], 2, 3)
    np.testing.assert_allclose(_intermediate(state, "conv1"), conv, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(_intermediate(state, "bn1"), _np_bn(conv, **stats["bn1"], **p["bn1"]),
                               rtol=1e-4, atol=1e-4)
    pooled = _np_maxpool_3x3_s2_p1(np.maximum(_intermediate(state, "bn1"), 0))
    assert pooled.shape[1:3] == (8, 8)
    np.testing.assert_allclose(_intermediate(state, "layer1_0", "conv1"),
                               _np_conv(pooled, p["layer1_0"]["conv1"]["kernel"], 1, 0), rtol=1e-4, atol=1e-4)
    # v1.5: layer2_0's 1x1 conv keeps the resolution, its 3x3 conv halves it.
    assert _intermediate(state, "layer2_0", "conv1").shape[1:3] == (8, 8)
    expected = _np_conv(np.maximum(_intermediate(state, "layer2_0", "bn1"), 0), p["layer2_0"]["conv2"]["kernel"],
                        2, 1)
    assert expected.shape[1:3] == (4, 4)
    np.testing.assert_allclose(_intermediate(state, "layer2_0", "conv2"), expected, rtol=1e-4, atol=1e-4)
    assert out.shape == (2, model.feature_dim)
    np.testing.assert_allclose(out, _intermediate(state, "layer4_2").mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)


def test_batchnorm_train_uses_batch_stats_and_updates_running_average(resnet18):
    model, variables = resnet18
    p, old = variables["params"]["bn1"], variables["batch_stats"]["bn1"]
    x = jax.random.normal(jax.random.key(1), (3, 16, 16, 3))
    out, state = model.apply(variables, x, train=True, capture_intermediates=True,
                             mutable=["batch_stats", "intermediates"])
    assert out.shape == (3, model.feature_dim)
    conv = _np_conv(x, variables["params"]["conv1"]["kernel"], 2, 3)
    mean, var = conv.mean(axis=(0, 1, 2)), conv.var(axis=(0, 1, 2))
    np.testing.assert_allclose(_intermediate(state, "bn1"), _np_bn(conv, mean, var, **p), rtol=1e-3, atol=1e-3)
    new = state["batch_stats"]["bn1"]
    np.testing.assert_allclose(new["mean"], 0.9 * np.asarray(old["mean"]) + 0.1 * mean, rtol=1e-4, atol=1e-6)
    # torch's running_var takes the unbiased variance (n = 3 * 8 * 8 values per channel: a 0.5 % difference).
    unbiased = conv.var(axis=(0, 1, 2), ddof=1)
    np.testing.assert_allclose(new["var"], 0.9 * np.asarray(old["var"]) + 0.1 * unbiased, rtol=1e-4, atol=1e-6)


def test_batchnorm_eval_is_per_example_and_train_is_not(resnet18):
    model, variables = resnet18
    x = jax.random.normal(jax.random.key(1), (3, 16, 16, 3))
    np.testing.assert_allclose(model.apply(variables, x[:1], train=False),
                               model.apply(variables, x, train=False)[:1], rtol=1e-5, atol=1e-6)
    alone, _ = model.apply(variables, x[:1], train=True, mutable=["batch_stats"])
    in_batch, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert not np.allclose(alone, in_batch[:1], atol=1e-3)


def test_bfloat16_compute_keeps_float32_variables(resnet18):
    model = ResNet(depth=18, width=8, dtype=jnp.bfloat16)
    assert {leaf.dtype for leaf in jax.tree.leaves(_abstract_variables(model))} == {jnp.dtype(jnp.float32)}
    reference_model, variables = resnet18
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    out, state = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert out.dtype == jnp.bfloat16
    assert {leaf.dtype for leaf in jax.tree.leaves(state)} == {jnp.dtype(jnp.float32)}
    # Same variables, same function up to bf16 rounding (eval mode: train-mode BN over a 2x1x1 batch in the
    # last stage would amplify rounding into sign flips).
    low = np.asarray(model.apply(variables, x, train=False), np.float64)
    reference = np.asarray(reference_model.apply(variables, x, train=False), np.float64)
    assert np.linalg.norm(low - reference) < 0.05 * np.linalg.norm(reference)


def test_init_matches_torchvision():
    params = ResNet(depth=18, width=8).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)["params"]
    params = flax.traverse_util.flatten_dict(params)
    # Kaiming normal, fan_out, ReLU gain: kernel [kh, kw, in, out] ~ N(0, 2 / (kh * kw * out)). Pool every conv
    # kernel, scaled to unit expected std, for a precise estimate.
    z = np.concatenate([np.ravel(v) / np.sqrt(2.0 / (v.shape[0] * v.shape[1] * v.shape[3]))
                        for path, v in params.items() if path[-1] == "kernel"])
    assert z.size > 150_000
    assert abs(z.mean()) < 0.01
    assert z.std() == pytest.approx(1.0, rel=0.01)
    # Untruncated normal: about 4.55% of draws lie beyond 2 sigma (a 2-sigma truncated normal has none).
    assert np.mean(np.abs(z) > 2) == pytest.approx(0.0455, abs=0.002)
    for path, v in params.items():
        if path[-1] in ("scale", "bias"):
            np.testing.assert_array_equal(v, 1.0 if path[-1] == "scale" else 0.0)


def test_rejects_bad_configuration_and_input():
    with pytest.raises(ValueError, match="depth must be one of"):
        ResNet(depth=26)
    with pytest.raises(ValueError, match="width"):
        ResNet(depth=18, width=0)
    with pytest.raises(ValueError, match=r"NHWC images \[B, H, W, 3\]"):
        jax.eval_shape(lambda: ResNet(depth=18, width=8).init(jax.random.key(0), jnp.zeros((1, 3, 32, 32)),
                                                              train=False))


# --- MoCo encoder and heads built on the backbone ---

def test_encoder_is_backbone_then_mocov2_mlp(resnet18):
    shapes = _abstract_variables(Encoder(ResNet(depth=50)))["params"]["projection"]
    assert shapes["fc_0"]["kernel"].shape == (2048, 2048)
    assert shapes["fc_2"]["kernel"].shape == (2048, 128)

    backbone, backbone_variables = resnet18
    encoder = Encoder(backbone)
    variables = _random_variables(encoder, seed=2)
    variables["params"]["backbone"] = backbone_variables["params"]
    variables["batch_stats"]["backbone"] = backbone_variables["batch_stats"]
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    features, projection = encoder.apply(variables, x, train=False)
    np.testing.assert_allclose(features, backbone.apply(backbone_variables, x, train=False), rtol=1e-6)
    p = variables["params"]["projection"]
    hidden = np.maximum(np.asarray(features, np.float64) @ p["fc_0"]["kernel"] + p["fc_0"]["bias"], 0)
    np.testing.assert_allclose(projection, hidden @ p["fc_2"]["kernel"] + p["fc_2"]["bias"], rtol=1e-4, atol=1e-5)
    assert projection.shape == (2, 128)


def test_geo_head_is_relu_then_linear():
    projection = jax.random.normal(jax.random.key(1), (4, 128))
    head = GeoHead(num_clusters=100)
    params = head.init(jax.random.key(0), projection)["params"]["fc"]
    assert params["kernel"].shape == (128, 100)
    expected = np.maximum(np.asarray(projection, np.float64), 0) @ params["kernel"] + params["bias"]
    np.testing.assert_allclose(head.apply({"params": {"fc": params}}, projection), expected, rtol=1e-4, atol=1e-5)


def test_heads_initialise_like_torch_linear():
    params = ProjectionHead(hidden=512).init(jax.random.key(0), jnp.zeros((1, 2048)))["params"]
    for layer, fan_in in (("fc_0", 2048), ("fc_2", 512)):
        bound = fan_in**-0.5
        kernel, bias = np.asarray(params[layer]["kernel"]), np.asarray(params[layer]["bias"])
        assert np.abs(kernel).max() <= bound and np.abs(bias).max() <= bound
        assert kernel.std() == pytest.approx(bound / np.sqrt(3), rel=0.02)  # uniform(-b, b) has std b / sqrt(3)
        assert bias.std() == pytest.approx(bound / np.sqrt(3), rel=0.25)
