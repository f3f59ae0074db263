"""What every supervised evaluation of an encoder shares: the new classifier, its learning-rate schedule, the
scores of a split, the selection of the best epoch on val, and the results entry.

The released main_lincls.py defines the protocol: a new Linear(feature_dim, classes) initialised N(0, 0.01) with
zero bias, SGD whose lr is constant within an epoch (x0.1 at milestones, or a half-cosine over the epochs), and
every epoch scored. We select the epoch on val (the released script selected on test) and evaluate test once.
"""

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax

from geo_contrast import eval_metrics

# One initializer object for every head, so heads over the same classes are equal (hashable static args of jit).
_HEAD_KERNEL_INIT = nn.initializers.normal(stddev=0.01)


def head(num_classes):
    """main_lincls.py's new fc: Linear(feature_dim, num_classes), weight N(0, 0.01), bias 0."""
    return nn.Dense(num_classes, kernel_init=_HEAD_KERNEL_INIT, bias_init=nn.initializers.zeros, name="fc")


def sgd_direction(momentum, weight_decay):
    """torch.optim.SGD without the lr: decay added to the gradient, then the momentum buffer. The step multiplies
    by the lr itself, so the lr can change per epoch (epoch_learning_rate) without recompiling the step."""
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.trace(decay=momentum))


def epoch_learning_rate(epoch, *, peak, num_epochs, schedule, decay_epochs):
    """main_lincls.py's adjust_learning_rate for 0-based `epoch`: x0.1 per passed milestone, or half-cosine."""
    if schedule == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * epoch / num_epochs))
    return peak * 0.1 ** sum(epoch >= milestone for milestone in decay_epochs)


@dataclasses.dataclass(frozen=True)
class Split:
    """The labelled images of an evaluated split, in a fixed order: what its scores are compared with."""

    name: str
    labels: np.ndarray  # [N] int64.
    locations: np.ndarray  # [N] int64, the location's index in the split (images of one place share it).


@functools.partial(jax.jit, static_argnums=0)
def head_logits(head_module, params, features):
    return head_module.apply({"params": params}, features)


def report(logits, split, class_names):
    """Every reported metric (eval_metrics.classification_report) of a classifier's logits on `split`."""
    probs = eval_metrics.softmax(np.asarray(logits))
    return eval_metrics.classification_report(probs, split.labels, split.locations, class_names)


@dataclasses.dataclass(frozen=True)
class Selection:
    epoch: int  # 1-based.
    params: Any  # The classifier (or the whole model) after that epoch, host arrays.
    val: dict  # Its val report.


def select(best, epoch, params, val_report):
    """The better of `best` and this epoch: the highest val top-1, the earliest epoch on ties."""
    if best is None or val_report["top1"] > best.val["top1"]:
        return Selection(epoch, params, val_report)
    return best


def backbone_name(module):
    return f"ResNet-{module.depth}" + ("" if module.width == 64 else f" (width {module.width})")


def results_entry(*, source, init, backbone_module, dataset, selected, protocol, splits):
    """The JSON entry results.py stores for one evaluation of one init. `selected` says what was chosen on val:
    {"selected_epoch", "num_epochs"} for an epoch, {"selected_l2"} for a regularisation strength."""
    return {
        **source,
        "init": init,
        "backbone": backbone_name(backbone_module),
        "dataset": dataset,
        **selected,
        "selection": "best val top-1",
        "protocol": protocol,
        "splits": splits,
    }
