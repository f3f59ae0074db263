r"""Pretraining (MoCo-v2, MoCo-v2+Geo) and linear evaluation on GeoImageNet.

    python -m geo_contrast.main --config=configs/geo_imagenet.py --workdir=DIR              # MoCo-v2+Geo
    python -m geo_contrast.main --config=configs/geo_imagenet.py:variant=moco --workdir=DIR
    python -m geo_contrast.main --config=configs/geo_imagenet.py:sample --workdir=DIR       # tiny generated tree

GeoImageNet has one image per geotag, no time series, so the temporal-positive variants do not apply and are
refused. Everything else is the fMoW recipe (configs/fmow.py): ResNet-50, MoCo-v2, 100 geo clusters, the
released linear-probe protocol over GeoImageNet's classes (top-1/top-5), model selection on val.
"""

from configs import fmow
from geo_contrast import config_lib


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, variant="geo", sample=False)
    if config_lib.uses_temporal_positives(arg.variant):
        raise ValueError(
            f"variant={arg.variant} needs temporal positives, but GeoImageNet has a single image per "
            "location (no time series); use variant=moco or variant=geo."
        )
    c = fmow.get_config(f"variant={arg.variant}" + (",sample" if arg.sample else ""))
    c.dataset.name = "geo_imagenet/s64" if arg.sample else "geo_imagenet/s256"
    if arg.sample:
        c.geo.num_clusters = 6
        c.input.global_batch = 16
        c.moco.queue_size = 64
        c.linear_eval.global_batch = 16
    return c
