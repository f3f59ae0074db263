"""Networks: the torchvision-layout ResNet backbone and the MoCo encoder and heads built on it."""

from geo_contrast.models.moco import Encoder, GeoHead, ProjectionHead
from geo_contrast.models.resnet import ResNet

__all__ = ["Encoder", "GeoHead", "ProjectionHead", "ResNet"]
