r"""Pretraining (MoCo-v2, +TP, +Geo, +Geo+TP) and linear evaluation on fMoW-rgb.

    python -m geo_contrast.main --config=configs/fmow.py --workdir=DIR                  # MoCo-v2+Geo+TP
    python -m geo_contrast.main --config=configs/fmow.py:variant=tp --workdir=DIR       # MoCo-v2+TP
    python -m geo_contrast.main --config=configs/fmow.py:variant=geo_only --workdir=DIR # geo classification only
    python -m geo_contrast.main --config=configs/fmow.py:sample --workdir=DIR           # bundled sample, CPU

Arguments (after the colon, comma separated): `variant=moco|tp|geo|geo_tp|geo_only` (default geo_tp; geo_only is
Table 1's "geo-location classification only": the query encoder and the geo head, no InfoNCE, no key encoder, no
queue), `recipe=released|
square` (default released) and `sample`. Every field can be overridden: `--config.moco.temperature=0.2`
(MoCo-v2's value; the authors' released commands use 0.02, our default). Give the variant in the path, not as
`--config.variant`: the variant also picks its crops.
Hyperparameters follow ../shared/reference/paper.md: ResNet-50, 2048-2048-128 projection, queue 65536,
momentum 0.999, SGD lr 0.03 x batch/256, momentum 0.9, weight decay 1e-4, cosine schedule, 200 epochs,
global batch 256, 224 px, 100 geo clusters; linear probe as the released main_lincls.py.

Crops (`recipe=released`, each variant's row of Table 1 as the released scripts cut it, from the whole image the
authors' loader opens, fmow_dataloader.py:36): the temporal variants (tp, geo_tp) take the centre square and a
RandomResizedCrop with torchvision's default scale (0.08, 1) (main_moco_tp.py:288-290, main_moco_geo+tp.py:
311-313: Resize(448), CenterCrop(448), RandomResizedCrop(224)); the others a RandomResizedCrop of scale (0.2, 1)
of the whole image (main_moco_tp.py:265-266, main_moco_geo+tp.py:288-289: Resize(448), RandomResizedCrop(224,
scale=(0.2, 1))). `recipe=square`: MoCo-v2's RandomResizedCrop(scale 0.2-1) of a square around the labelled box
(twice its longer side) for every variant, and the probe on that square too.
"""

import ml_collections

from geo_contrast import config_lib


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, variant="geo_tp", recipe="released", sample=False)
    config_lib.uses_geo_loss(arg.variant)  # Refuses an unknown variant with the list of known ones.
    c = ml_collections.ConfigDict()
    c.variant = arg.variant
    c.stages = "pretrain,linear_eval"
    c.seed = 0
    # A torchvision-layout ResNet in safetensors to start both encoders from (e.g. ImageNet weights, the paper's
    # "IN init"); "" starts from random. See geo_contrast/export.py.
    c.init_from = ""

    c.dataset = ml_collections.ConfigDict()
    c.dataset.name = "fmow"
    c.dataset.data_dir = ml_collections.FieldReference(None, field_type=str)  # None: TFDS's default.
    # True for `sample`: generate the fMoW-format sample and build it into WORKDIR/data when missing, from
    # `sample_seed` (not config.seed, which draws the training only: every seed trains on the same data).
    c.dataset.generate_sample = False
    c.dataset.sample_seed = 0
    c.dataset.train_split = "train"
    c.dataset.val_split = "val"
    c.dataset.test_split = "test"  # Evaluated only when the built dataset has it.

    c.input = ml_collections.ConfigDict()
    c.input.global_batch = 256
    c.input.image_size = 224
    # The crop of each view: a RandomResizedCrop of `crop_scale` of the image's `region` (augment.REGIONS);
    # set from the variant and the recipe below.
    c.input.region = "whole"
    c.input.crop_scale = (0.2, 1.0)
    c.input.box_context = 2.0  # "box_square": the square's side over the labelled box's longer side.
    c.input.prefetch_batches = 2

    c.model = ml_collections.ConfigDict()
    c.model.depth = 50
    c.model.width = 64
    c.model.projection_dim = 128
    c.model.compute_dtype = "auto"  # bfloat16 on TPU/GPU, float32 on CPU; parameters stay float32.

    c.moco = ml_collections.ConfigDict()
    c.moco.queue_size = 65_536
    c.moco.momentum = 0.999
    c.moco.temperature = 0.02
    c.moco.bn_groups = 1  # BN groups per device; >= 2 on a single device (shuffle BN needs two).
    c.moco.infonce_weight = 1.0

    c.geo = ml_collections.ConfigDict()
    c.geo.num_clusters = 100
    c.geo.loss_weight = 1.0

    c.optim = ml_collections.ConfigDict()
    c.optim.base_lr = 0.03  # For a global batch of 256, scaled linearly.
    c.optim.momentum = 0.9
    c.optim.weight_decay = 1e-4
    c.optim.num_epochs = 200

    # The kNN monitor of pretraining: weighted kNN top-1 (k 20, cosine, exp(sim / 0.07)) of val images against
    # training images, read off the query encoder every `every_steps` (0: never) and at the end, on fixed random
    # subsets of locations (0: all) so that it costs a few percent of the run.
    c.knn = ml_collections.ConfigDict()
    c.knn.every_steps = 5_000
    c.knn.k = 20
    c.knn.temperature = 0.07
    c.knn.train_locations = 5_000
    c.knn.val_locations = 1_000

    c.log_every_steps = 50
    c.checkpoint_every_steps = 1_000
    c.keep_checkpoints = 3

    c.linear_eval = ml_collections.ConfigDict()
    c.linear_eval.init = (
        "pretrained"  # "pretrained" (the workdir's latest checkpoint), a checkpoint path, or "random".
    )
    c.linear_eval.global_batch = 256
    c.linear_eval.num_epochs = 100
    # "sgd": the released protocol below (epochs of SGD, the best epoch on val); "logistic": L2 logistic regression
    # on standardised features fitted to convergence, its strength chosen on val (geo_contrast/logistic.py).
    c.linear_eval.readout = "sgd"
    c.linear_eval.base_lr = 30.0  # main_lincls.py's default (its README uses 1).
    c.linear_eval.momentum = 0.9
    c.linear_eval.weight_decay = 0.0
    c.linear_eval.schedule = "step"  # "step" (x0.1 at the epochs below) or "cosine".
    c.linear_eval.decay_epochs = (60, 80)
    # main_lincls.py's views (Scale(224) + RandomCrop / CenterCrop(224)) of the image's `region`: on the whole,
    # non-square image the random crop's place along the longer side is the probe's only augmentation.
    c.linear_eval.region = "whole"
    c.linear_eval.box_context = 2.0
    c.linear_eval.image_size = 224
    c.linear_eval.resize_size = 224
    c.linear_eval.cache_features = False

    # Fine-tuning (config.stages=...,finetune): the encoder and a new classifier trained together. Our recipe (the
    # released code has none): torchvision's classification reference (RandomResizedCrop(224) + flip, SGD with
    # momentum 0.9 and weight decay 1e-4), a cosine lr set per epoch from a fine-tuning peak, the probe's views to
    # evaluate; geo_contrast/finetune.py says why.
    c.finetune = ml_collections.ConfigDict()
    c.finetune.init = "pretrained"  # As linear_eval.init; "random" is Table 1's "supervised, scratch".
    c.finetune.global_batch = 256
    c.finetune.num_epochs = 30
    c.finetune.base_lr = 0.05  # For a global batch of 256, scaled linearly.
    c.finetune.momentum = 0.9
    c.finetune.weight_decay = 1e-4
    c.finetune.crop_scale = (0.08, 1.0)  # torchvision's RandomResizedCrop default.
    c.finetune.region = "whole"
    c.finetune.box_context = 2.0
    c.finetune.image_size = 224
    c.finetune.resize_size = 224

    # Also evaluate the random-init encoder (the probe's floor, fine-tuning's "supervised, scratch") after each
    # evaluation stage: results.md then shows every init's margin over it.
    c.compare_random = False

    _set_crops(c, arg.recipe)
    if arg.sample:
        _scale_to_sample(c)
    return c


def _set_crops(c, recipe):
    """Each variant's crops under `recipe` (see the module docstring)."""
    if recipe == "released":
        temporal = config_lib.uses_temporal_positives(c.variant)
        c.input.region = "center_square" if temporal else "whole"
        c.input.crop_scale = (0.08, 1.0) if temporal else (0.2, 1.0)
    elif recipe == "square":
        c.input.region = c.linear_eval.region = c.finetune.region = "box_square"
        c.input.crop_scale = (0.2, 1.0)
    else:
        raise config_lib.ConfigError(f"recipe={recipe!r} is not a recipe; choose 'released' or 'square' "
                                     "(configs/fmow.py:recipe=...).")


def _scale_to_sample(c):
    """The bundled sample on 2 CPU cores: the same code paths, a narrow ResNet-18 at 64 px, a few minutes.

    Why each value (the README's quick start reports the outcome): the sample has ~1,000 images, so a queue of
    65,536 keys (or any queue of a sizeable share of the images) would hold many keys of the query's own
    location, hard false negatives at temperature 0.02: a 128-key queue and MoCo-v2's temperature 0.2 instead.
    A run of a few hundred steps needs a key encoder that follows faster (momentum 0.99) and a larger learning
    rate; crops of at least half the whole image keep the object in view at 64 px. Every variant cuts the same
    crops, so the sample compares the losses, not the crops. The frozen encoder is read by the converged logistic
    readout (geo_contrast/logistic.py), not 60 SGD epochs selected on a few hundred images, and the sample's data
    come from `dataset.sample_seed`: `config.seed` draws the training only, so seeds compare like with like.
    """
    c.dataset.generate_sample = True
    c.input.global_batch = 64
    c.input.image_size = 64
    c.input.region = c.linear_eval.region = c.finetune.region = "whole"
    c.input.crop_scale = (0.5, 1.0)
    c.model.depth = 18
    c.model.width = 16
    c.moco.queue_size = 128
    c.moco.momentum = 0.99
    c.moco.bn_groups = 2
    c.moco.temperature = 0.2
    c.geo.num_clusters = 10
    c.optim.base_lr = 0.12
    c.optim.num_epochs = 40
    c.log_every_steps = 10
    c.checkpoint_every_steps = 100
    c.knn.every_steps = 160
    c.knn.train_locations = c.knn.val_locations = 150  # Half of each split: ~6 % of the pretraining time.
    c.linear_eval.global_batch = 64
    c.linear_eval.base_lr = 4.0  # lr 1.0 at batch 64.
    c.linear_eval.num_epochs = 60
    c.linear_eval.decay_epochs = (36, 48)
    c.linear_eval.image_size = 64
    c.linear_eval.resize_size = 64
    c.linear_eval.cache_features = True
    c.linear_eval.readout = "logistic"
    c.finetune.global_batch = 64
    c.finetune.num_epochs = 10
    c.finetune.base_lr = 0.2  # lr 0.05 at batch 64.
    c.finetune.crop_scale = (0.5, 1.0)
    c.finetune.image_size = 64
    c.finetune.resize_size = 64
    c.compare_random = True
