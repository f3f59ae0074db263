"""ResNet backbones (18/34/50/101/152) in the torchvision layout, in flax.linen.

The paper's backbone is torchvision's ResNet-50, and its results (and any detection fine-tuning) come from
torchvision weights, so this module reproduces torchvision's computation exactly and names its variables so
that weights exchange 1:1:

* Bottleneck v1.5: the stride sits on the 3x3 conv (``conv2``), not on the first 1x1 as in the original paper.
* Convolutions use torch's symmetric explicit padding (``kernel // 2`` on every side), never ``"SAME"``: for a
  stride-2 conv on an even-sized input ``"SAME"`` pads (0, 1) and would shift every feature by a pixel
  against the exported weights. The stem max-pool likewise pads 1 on every side with -inf.
* No conv biases; BatchNorm (`BatchNorm` below) as torch's: eps 1e-5, running-average momentum 0.9 (torch's
  ``momentum=0.1`` counts the other way), normalisation with the biased batch variance and the running variance
  updated with the unbiased one (x n/(n-1)), so exported running statistics are what torchvision would hold.
* Init as torchvision: convs kaiming-normal (fan_out, ReLU gain, untruncated), BN scale 1 and bias 0.
* BatchNorm has no ``axis_name``: statistics are per device, which MoCo's shuffle-BN relies on.

Naming rule (flax path -> torchvision state-dict key). Module names are torchvision's with every ``.``
replaced by ``_`` (flax module names cannot contain dots), so the map is "replace ``_`` by ``.``" on
each module name and join the path with ``.``:

    conv1, bn1                         -> conv1, bn1                  (stem)
    layer{s}_{b}/conv{i}, bn{i}        -> layer{s}.{b}.conv{i}, bn{i}  (stage s = 1..4, block b from 0)
    layer{s}_{b}/downsample_0          -> layer{s}.{b}.downsample.0   (1x1 shortcut conv)
    layer{s}_{b}/downsample_1          -> layer{s}.{b}.downsample.1   (shortcut BN)

Leaves: conv ``kernel`` [kh, kw, in, out] -> ``weight`` [out, in, kh, kw] (transpose 3, 2, 0, 1);
BN ``params/scale`` -> ``weight``, ``params/bias`` -> ``bias``, ``batch_stats/mean`` -> ``running_mean``,
``batch_stats/var`` -> ``running_var`` (torch's ``num_batches_tracked`` has no counterpart). There is no
``fc``: the module returns globally average-pooled features.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# depth -> (block kind, blocks per stage), as torchvision's resnet18 ... resnet152.
_STAGES = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
_EXPANSION = {"basic": 1, "bottleneck": 4}

# torchvision: nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu") -> N(0, 2 / (kh * kw * out)).
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(features: int, kernel: int, stride: int, dtype: Any, name: str) -> nn.Conv:
    """A bias-free conv with torch's symmetric padding of kernel // 2 on every side."""
    pad = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=_conv_init,
        name=name,
    )


class BatchNorm(nn.Module):
    """torch.nn.BatchNorm2d over the last axis: in training, normalise with the batch's mean and biased variance
    and update the running statistics with the mean and the *unbiased* variance (x n / (n - 1), n the values per
    channel); in inference, normalise with the running statistics.

    Flax's own BatchNorm updates the running variance with the biased one. The running statistics are exported to
    torchvision (and used by the frozen probe), so they follow torch. Statistics are computed in at least float32
    (E[x^2] - E[x]^2, clipped at 0, one fused pass, as flax does) whatever the compute dtype. Variables keep
    flax's names (``params/scale``, ``params/bias``, ``batch_stats/mean``, ``batch_stats/var``).
    """

    use_running_average: bool
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
        if self.use_running_average:
            mean, var = running_mean.value, running_var.value
        else:
            axes = tuple(range(x.ndim - 1))
            wide = x.astype(jnp.promote_types(x.dtype, jnp.float32))
            mean = jnp.mean(wide, axes)
            var = jnp.maximum(jnp.mean(jnp.square(wide), axes) - jnp.square(mean), 0.0)
            if not self.is_initializing():
                n = x.size // features
                unbiased = var * (n / max(n - 1, 1))
                running_mean.value = self.momentum * running_mean.value + (1.0 - self.momentum) * mean
                running_var.value = self.momentum * running_var.value + (1.0 - self.momentum) * unbiased
        y = (x - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
        return jnp.asarray(y, self.dtype)


def _bn(train: bool, dtype: Any, name: str) -> BatchNorm:
    """Torch-equivalent BatchNorm; the batch statistics are computed in at least float32 even for bf16."""
    return BatchNorm(use_running_average=not train, dtype=dtype, name=name)


class _Block(nn.Module):
    """One residual block: torchvision's BasicBlock (kind "basic") or Bottleneck v1.5 (kind "bottleneck").

    ``planes`` is the block's inner width; the output has ``planes * expansion`` channels. The shortcut gets a
    1x1 conv + BN (``downsample_0/1``) exactly when torchvision adds one: stride != 1 or a channel change.
    """

    kind: str
    planes: int
    stride: int
    dtype: Any

    @nn.compact
    def __call__(self, x, train: bool):
        out_channels = self.planes * _EXPANSION[self.kind]
        if self.kind == "basic":
            y = nn.relu(_bn(train, self.dtype, "bn1")(_conv(self.planes, 3, self.stride, self.dtype, "conv1")(x)))
            y = _bn(train, self.dtype, "bn2")(_conv(out_channels, 3, 1, self.dtype, "conv2")(y))
        else:
            y = nn.relu(_bn(train, self.dtype, "bn1")(_conv(self.planes, 1, 1, self.dtype, "conv1")(x)))
            y = nn.relu(_bn(train, self.dtype, "bn2")(_conv(self.planes, 3, self.stride, self.dtype, "conv2")(y)))
            y = _bn(train, self.dtype, "bn3")(_conv(out_channels, 1, 1, self.dtype, "conv3")(y))
        shortcut = x
        if self.stride != 1 or x.shape[-1] != out_channels:
            shortcut = _conv(out_channels, 1, self.stride, self.dtype, "downsample_0")(x)
            shortcut = _bn(train, self.dtype, "downsample_1")(shortcut)
        return nn.relu(y + shortcut)


class ResNet(nn.Module):
    """torchvision ResNet without its classifier: NHWC images [B, H, W, 3] -> pooled features [B, feature_dim].

    Attributes:
      depth: 18, 34, 50, 101 or 152.
      width: channels of the stem and of stage 1's blocks (torchvision's 64); stages double it. Small widths
        keep tests cheap; only 64 has a torchvision counterpart.
      dtype: compute dtype of activations (bfloat16 on accelerators). Parameters and BN statistics stay
        float32 whatever it is.
    """

    depth: int = 50
    width: int = 64
    dtype: Any = jnp.float32

    def __post_init__(self):
        if self.depth not in _STAGES:
            raise ValueError(f"ResNet depth must be one of {sorted(_STAGES)}, got {self.depth!r}")
        if not isinstance(self.width, int) or self.width < 1:
            raise ValueError(f"ResNet width must be a positive int, got {self.width!r}")
        super().__post_init__()

    @property
    def feature_dim(self) -> int:
        """Channels of the pooled output: 512 for ResNet-18/34, 2048 for 50/101/152 at width 64."""
        kind, _ = _STAGES[self.depth]
        return self.width * 8 * _EXPANSION[kind]

    @nn.compact
    def __call__(self, x, train: bool):
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"ResNet expects NHWC images [B, H, W, 3], got shape {x.shape}")
        kind, blocks_per_stage = _STAGES[self.depth]
        x = jnp.asarray(x, self.dtype)
        x = nn.relu(_bn(train, self.dtype, "bn1")(_conv(self.width, 7, 2, self.dtype, "conv1")(x)))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage, num_blocks in enumerate(blocks_per_stage):
            planes = self.width * 2**stage
            for block in range(num_blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                x = _Block(kind, planes, stride, self.dtype, name=f"layer{stage + 1}_{block}")(x, train)
        return jnp.mean(x, axis=(1, 2))
