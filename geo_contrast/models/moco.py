"""The MoCo-v2 encoder (backbone + projection MLP) and the geo-location classification head.

``Encoder`` is the one module both MoCo encoders run: the query encoder's variables are trained, the key
encoder's are an EMA copy of the same tree applied through the same module. ``GeoHead`` is separate because
only the query feeds it (the released code puts no geo loss on the key), so the key tree never carries it.

Dense layers start as ``torch.nn.Linear``'s default (weight and bias uniform in +-1/sqrt(fan_in)), as in the
released code, and are named after the torch ``nn.Sequential`` indices they replace (``fc.0``, ReLU at
``fc.1``, ``fc.2``) with the same "``.`` becomes ``_``" rule as ``resnet.py``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from geo_contrast.models.resnet import ResNet

# torch.nn.Linear's default weight init, kaiming_uniform(a=sqrt(5)), is U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
_linear_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _linear(features: int, fan_in: int, dtype: Any, name: str) -> nn.Dense:
    """A Dense layer initialised as torch.nn.Linear(fan_in, features)."""
    bound = fan_in**-0.5

    def bias_init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=_linear_kernel_init,
        bias_init=bias_init,
        name=name,
    )


class ProjectionHead(nn.Module):
    """MoCo-v2's projection MLP: Dense(hidden) -> ReLU -> Dense(embed_dim); 2048 -> 2048 -> 128 for ResNet-50.

    Returns the UN-normalised projection: the contrastive loss L2-normalises it, the geo head must not.
    """

    hidden: int
    embed_dim: int = 128
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features):
        h = nn.relu(_linear(self.hidden, features.shape[-1], self.dtype, "fc_0")(features))
        return _linear(self.embed_dim, self.hidden, self.dtype, "fc_2")(h)


class GeoHead(nn.Module):
    """Geo-location classifier: ReLU -> Dense(num_clusters) on the query's un-normalised projection.

    Follows the released code (Linear(128, 100) after a ReLU on the projection output); returns logits.
    """

    num_clusters: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, projection):
        return _linear(self.num_clusters, projection.shape[-1], self.dtype, "fc")(nn.relu(projection))


class Encoder(nn.Module):
    """Backbone + projection head: images -> (pooled features [B, F], un-normalised projection [B, embed_dim]).

    The projection's hidden width equals the backbone's feature dimension (MoCo-v2) and it computes in the
    backbone's dtype. Variables: ``backbone/...`` (torchvision layout, see resnet.py) and ``projection/...``.
    """

    backbone: ResNet
    embed_dim: int = 128

    @nn.compact
    def __call__(self, images, train: bool):
        features = self.backbone(images, train=train)
        head = ProjectionHead(self.backbone.feature_dim, self.embed_dim, self.backbone.dtype, name="projection")
        return features, head(features)
