"""On-device standardisation against torchvision's ToTensor + Normalize formula."""

import jax.numpy as jnp
import numpy as np
import pytest

from geo_contrast import pixels


def test_standardize_is_totensor_then_normalize():
    images = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3), np.uint8)
    expected = (images / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    out = pixels.standardize(jnp.asarray(images))
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)


def test_standardize_refuses_float_pixels():
    with pytest.raises(TypeError, match="uint8"):
        pixels.standardize(jnp.zeros((2, 4, 4, 3), jnp.float32))
