"""What a config's pretraining is made of: modules, optimizer, schedule, the first TrainState, the step's numbers.

Kept apart from the loop (pretrain.py) and free of TensorFlow, so that linear evaluation, export and the step
benchmark build exactly the model pretraining trains, also on accelerator hosts that have no TensorFlow.
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from geo_contrast import config_lib
from geo_contrast import devices
from geo_contrast import torchvision_layout
from geo_contrast import train_loop
from geo_contrast import train_step as ts
from geo_contrast.models import moco
from geo_contrast.models import resnet


def compute_dtype(name):
    """"auto" means bfloat16 where matrix units want it (TPU/GPU) and float32 on CPU."""
    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return jnp.dtype(name)


def build_encoder(model_config, dtype=jnp.float32):
    """The query/key encoder (backbone + projection head) a config describes."""
    return moco.Encoder(resnet.ResNet(depth=model_config.depth, width=model_config.width, dtype=dtype),
                        embed_dim=model_config.projection_dim)


def learning_rate_schedule(config, steps_per_epoch):
    """SGD lr 0.03 x global_batch / 256 with the released code's cosine decay: set once per epoch, lr = peak x
    (1 + cos(pi x epoch / epochs)) / 2 (adjust_learning_rate, main_moco_geo+tp.py:508-516, called at the start
    of each epoch), so it is constant within an epoch and never quite reaches 0."""
    peak = config_lib.scaled_lr(config.optim.base_lr, config.input.global_batch)
    epochs = config.optim.num_epochs

    def schedule(step):
        epoch = step // max(steps_per_epoch, 1)
        return peak * 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / epochs))

    return schedule


def optimizer(config, lr_fn):
    """torch.optim.SGD(momentum, weight_decay) as the authors ran it: decay added to the gradient of every
    parameter before the momentum buffer."""
    return optax.chain(optax.add_decayed_weights(config.optim.weight_decay),
                       optax.sgd(lr_fn, momentum=config.optim.momentum))


@dataclasses.dataclass(frozen=True)
class Model:
    """The modules and the optimizer of a config's pretraining."""
    encoder: moco.Encoder
    geo_head: Any  # moco.GeoHead for the geo variants, else None.
    lr_fn: optax.Schedule
    tx: optax.GradientTransformation


def build_model(config, steps_per_epoch, dtype=jnp.float32):
    """Encoder, geo head, lr schedule and optimizer for `config`; `steps_per_epoch` only shapes the schedule."""
    geo_head = moco.GeoHead(config.geo.num_clusters, dtype=dtype) if config_lib.uses_geo_loss(config.variant) \
        else None
    lr_fn = learning_rate_schedule(config, steps_per_epoch)
    return Model(build_encoder(config.model, dtype), geo_head, lr_fn, optimizer(config, lr_fn))


def init_state(config, encoder, geo_head, tx, image_size, seed):
    """A fresh TrainState: key encoder = query encoder, queue = random unit vectors (none of the two without
    the contrastive loss)."""
    init_key, queue_key, step_key = jax.random.split(jax.random.PRNGKey(seed), 3)
    dummy = jnp.zeros((2, image_size, image_size, 3), jnp.float32)
    variables = encoder.init(init_key, dummy, train=False)
    params = {"encoder": variables["params"]}
    if geo_head is not None:
        params["geo_head"] = geo_head.init(init_key, jnp.zeros((1, config.model.projection_dim)))["params"]
    state = ts.TrainState(
        step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables["batch_stats"], key_params=None,
        key_batch_stats=None, opt_state=tx.init(params), queue=None, queue_ptr=None, rng=step_key)
    if not config_lib.uses_contrastive_loss(config.variant):
        return state
    queue = jax.random.normal(queue_key, (config.moco.queue_size, config.model.projection_dim))
    return state.replace(key_params=variables["params"], key_batch_stats=variables["batch_stats"],
                         queue=queue / jnp.linalg.norm(queue, axis=1, keepdims=True),
                         queue_ptr=jnp.zeros((), jnp.int32))


def _init_fn(config, model):
    return functools.partial(init_state, config, model.encoder, model.geo_head, model.tx, config.input.image_size,
                             config.seed)


def abstract_state(config, model):
    """The TrainState's shapes and dtypes (what a checkpoint is restored into), without computing it."""
    return jax.eval_shape(_init_fn(config, model))


def with_torchvision_backbone(state, path):
    """`state` with both encoders' backbones (parameters and BN statistics) loaded from a torchvision-layout
    safetensors file (`config.init_from`: ImageNet weights for the paper's "IN init", or a released encoder).
    The optimizer state needs no change: SGD's momentum starts at zero whatever the parameters are."""
    backbone, stats = torchvision_layout.load_torchvision_resnet(
        path, state.params["encoder"]["backbone"], state.batch_stats["backbone"])
    encoder = {**state.params["encoder"], "backbone": backbone}
    batch_stats = {**state.batch_stats, "backbone": stats}
    state = state.replace(params={**state.params, "encoder": encoder}, batch_stats=batch_stats)
    if state.key_params is None:  # No key encoder (geo-location classification only).
        return state
    return state.replace(key_params=encoder, key_batch_stats=batch_stats)


def initial_state(config, model=None):
    """Pretraining's first TrainState for `config` (its seed and image size), as host numpy arrays.

    The one definition of it: pretraining starts from it, and linear evaluation restores checkpoints into its
    shape and uses it as the "random" baseline. `model` defaults to `build_model(config, 1)`; the state does not
    depend on the schedule or the compute dtype. Compiled as one program, unoptimised on CPU: it is a long chain
    of random-number kernels, run once in milliseconds, which XLA's CPU optimiser takes ~10x longer to compile
    (about 20 s against 2 s for a ResNet-18 on two cores).
    """
    model = model or build_model(config, steps_per_epoch=1)
    options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    return jax.device_get(jax.jit(_init_fn(config, model)).lower().compile(compiler_options=options)())


def pmapped_step(config, model, *, donate=True):
    """The step pretraining runs, pmapped: p_step(state, batch, stop_vote) -> (state, metrics, votes).

    `train_step` plus the number of devices whose process asked to stop (the same on every device), so that all
    processes stop after the same step. The state's buffers are donated (`donate=False` only to measure that).
    """

    step = functools.partial(ts.train_step, encoder=model.encoder, geo_head=model.geo_head, tx=model.tx,
                             lr_fn=model.lr_fn, cfg=step_config(config))
    return devices.pmap(train_loop.with_stop_vote(step), donate_argnums=(0,) if donate else ())


def step_config(config):
    return ts.StepConfig(temperature=config.moco.temperature, momentum=config.moco.momentum,
                         bn_groups=config.moco.bn_groups, infonce_weight=config.moco.infonce_weight,
                         geo_weight=config.geo.loss_weight if config_lib.uses_geo_loss(config.variant) else 0.0,
                         contrastive=config_lib.uses_contrastive_loss(config.variant))
