"""How pixels reach the model: uint8 from the host, standardised on the accelerator.

The pretraining input pipeline ends its augmentations with uint8 pixels, as MoCo-v2's PIL pipeline does before
`ToTensor`, and the train step standardises them on the device: a float32 batch is 4x the bytes to copy to the
accelerator every step, which on a fast accelerator costs a large part of the step (README, Performance, measures
it). TensorFlow-free, so the train step does not import TF.
"""

import jax.numpy as jnp

# ImageNet channel statistics (RGB, images scaled to [0, 1]) used by torchvision/MoCo-v2's Normalize. The single
# source of these constants for the whole project.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def standardize(images):
    """uint8 RGB [..., 3] -> (x / 255 - IMAGENET_MEAN) / IMAGENET_STD in float32 (torchvision's ToTensor + Normalize).

    Only uint8 is accepted: a float batch here would be a pipeline that normalised already, and normalising twice
    trains silently on wrong inputs.
    """
    if images.dtype != jnp.uint8:
        raise TypeError(f"standardize expects uint8 pixels from the input pipeline, got {images.dtype}")
    mean, std = jnp.asarray(IMAGENET_MEAN, jnp.float32), jnp.asarray(IMAGENET_STD, jnp.float32)
    return (images.astype(jnp.float32) / 255.0 - mean) / std
