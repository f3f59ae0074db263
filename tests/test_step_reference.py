"""The whole pretraining step against an independent statement of MoCo-v2's update, in numpy float64.

`test_train_step.py` checks the step's pieces (EMA, FIFO, shuffle/unshuffle, grouped BN) and that 4 devices equal
1 device with 4 BN groups. Neither catches a step that is wrong as a whole while every piece is right: the EMA
taken from the parameters after the update, keys encoded without shuffling, the queue written before the loss
reads it, a misconfigured optimizer. Here `train_step` runs two consecutive steps of a tiny encoder (2x2x3
pixels -> Dense -> `resnet.BatchNorm` -> ReLU -> Dense -> ReLU -> Dense, and a `moco.GeoHead`) under `jax.pmap`
in two layouts with the same 2 BN groups over the same global batch of 8 (1 device x 2 groups, 2 devices x 1
group), and every replica of everything the step returns must equal the reference `_reference_step`: the loss
and its parts, the lr, the query and key parameters, the SGD momentum buffers, both encoders' BN running
statistics, the queue and its pointer.

The reference states the update from MoCo-v2 (torch semantics) without the project's code: ImageNet
standardisation; key parameters <- m * key + (1 - m) * query before the update; shuffle BN (the global key batch
permuted, each contiguous group normalised with its own batch statistics, un-permuted, L2-normalised); queries
per group; InfoNCE against [own key, queue] plus the geo cross-entropy on the un-normalised projection; torch
BN running statistics (momentum 0.9, unbiased variance, averaged over groups); torch SGD (weight decay on every
parameter added to the gradient, buffer = momentum * buffer + gradient, lr of the released per-epoch cosine); the
keys enqueued FIFO after the loss. Only the shuffle permutation is taken from JAX (it is the step's random draw);
it is checked to move images across BN groups, since a permutation that keeps the groups would hide shuffle BN.

Gradients are central finite differences of the float64 loss over every parameter (267 of them, step 1e-6):
their error, ~1e-9 (truncation ~h^2, rounding ~1e-16 / h), is far below float32's, and they share nothing with
JAX's autodiff. The keys and the queue are constants of the loss, as MoCo's stopped gradients make them.

Tolerances: the step computes in float32 (BN statistics as E[x^2] - E[x]^2), so it drifts from the float64
reference: the largest difference observed after two steps is 3.3e-7 (a momentum buffer; loss and its parts
<= 3e-7, parameters <= 1.2e-7). ATOL = 5e-6 with RTOL = 2e-5 leaves a margin of more than 10x for other CPUs
and XLA versions, while each mutation tried (no shuffle, EMA after the update, queue written before the loss,
no weight decay on BN, Nesterov or a reset momentum buffer, summed gradients, one group's BN statistics) moves
some leaf by more than 1e-2. The hyperparameters are chosen so that every mechanism shows: lr 0.3 decaying to
0.15, SGD and key momentum 0.9 (with 0.999 the EMA's mistakes would be 100x smaller), weight decay 0.05,
temperature 0.2, key parameters and running statistics that differ from the query encoder's, and a queue
pointer that wraps around in the first step.
"""

import copy
import math
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from geo_contrast import pixels

BATCH = 8  # Global batch.
GROUPS = 2  # BN groups in total, in both layouts.
LAYOUTS = [(1, 2), (2, 1)]  # (devices, bn_groups per device).
IMAGE = (2, 2, 3)
HIDDEN, DIM, CLUSTERS = 8, 6, 3
QUEUE, QUEUE_PTR = 24, 16  # The first step's keys fill rows 16..23 and the pointer wraps to 0.
STEPS = 2
HP = {"temperature": 0.2, "key_momentum": 0.9, "infonce_weight": 1.0, "geo_weight": 0.5, "peak_lr": 0.3,
      "total_steps": 2, "sgd_momentum": 0.9, "weight_decay": 0.05}
BN_EPS, BN_MOMENTUM = 1e-5, 0.9
FD_STEP = 1e-6
ATOL, RTOL = 5e-6, 2e-5

# Runs `train_step` with 2 CPU devices (XLA_FLAGS must precede jax's import, hence a subprocess): reads the
# pickled setup (argv[1]), writes each layout's state and metrics after every step (argv[2]), device axis kept.
_SCRIPT = textwrap.dedent("""
    import functools, pickle, sys, types
    import flax.linen as nn
    import jax, jax.numpy as jnp, numpy as np
    from geo_contrast import devices, train_setup, train_step as ts
    from geo_contrast.models import moco, resnet

    with open(sys.argv[1], "rb") as f:
        setup = pickle.load(f)
    hp, init = setup["hp"], setup["state"]

    class TinyEncoder(nn.Module):
        hidden: int
        dim: int

        @nn.compact
        def __call__(self, images, train):
            x = nn.Dense(self.hidden, name="fc1")(images.reshape(images.shape[0], -1))
            features = nn.relu(resnet.BatchNorm(use_running_average=not train, name="bn")(x))
            h = nn.relu(nn.Dense(self.hidden, name="fc2")(features))
            return features, nn.Dense(self.dim, name="fc3")(h)

    encoder, geo_head = TinyEncoder(setup["hidden"], setup["dim"]), moco.GeoHead(setup["clusters"])
    config = types.SimpleNamespace(
        input=types.SimpleNamespace(global_batch=setup["batch"]),
        optim=types.SimpleNamespace(base_lr=hp["peak_lr"] * 256 / setup["batch"], momentum=hp["sgd_momentum"],
                                    weight_decay=hp["weight_decay"], num_epochs=hp["total_steps"]))
    lr_fn = train_setup.learning_rate_schedule(config, steps_per_epoch=1)
    tx = train_setup.optimizer(config, lr_fn)
    state = ts.TrainState(
        step=jnp.zeros((), jnp.int32), params=init["params"], batch_stats=init["batch_stats"],
        key_params=init["key_params"], key_batch_stats=init["key_batch_stats"], opt_state=tx.init(init["params"]),
        queue=init["queue"], queue_ptr=jnp.asarray(init["queue_ptr"], jnp.int32), rng=jax.random.PRNGKey(0))
    out = {"perms": [np.asarray(jax.random.permutation(jax.random.fold_in(state.rng, t), setup["batch"]))
                     for t in range(len(setup["batches"]))]}
    for num_devices, groups in setup["layouts"]:
        cfg = ts.StepConfig(temperature=hp["temperature"], momentum=hp["key_momentum"], bn_groups=groups,
                            infonce_weight=hp["infonce_weight"], geo_weight=hp["geo_weight"])
        on = jax.devices()[:num_devices]
        step = jax.pmap(functools.partial(ts.train_step, encoder=encoder, geo_head=geo_head, tx=tx, lr_fn=lr_fn,
                                          cfg=cfg), axis_name=devices.AXIS, devices=on)
        st, trajectory = devices.replicate(state, devices=on), []
        for batch in setup["batches"]:
            st, metrics = step(st, devices.split_rows(batch, num_devices))
            (_, (trace, schedule)) = st.opt_state
            trajectory.append(jax.device_get(dict(
                metrics={k: metrics[k] for k in ("loss", "info_nce", "geo_ce", "lr")}, step=st.step,
                params=st.params, momentum_buffer=trace.trace, lr_schedule_count=schedule.count,
                batch_stats=st.batch_stats, key_params=st.key_params, key_batch_stats=st.key_batch_stats,
                queue=st.queue, queue_ptr=st.queue_ptr)))
        out[(num_devices, groups)] = trajectory
    with open(sys.argv[2], "wb") as f:
        pickle.dump(out, f)
""")


def _dense(rng, fan_in, fan_out):
    return {"kernel": rng.normal(size=(fan_in, fan_out)) / math.sqrt(fan_in),
            "bias": 0.1 * rng.normal(size=fan_out)}


def _bn_stats(rng):
    return {"bn": {"mean": 0.2 * rng.normal(size=HIDDEN), "var": rng.uniform(0.5, 1.5, size=HIDDEN)}}


def _initial_setup():
    """Float32 state and batches (what the step receives), generic: no bias is 0, no BN scale 1, the key encoder
    and its running statistics differ from the query encoder's."""
    rng = np.random.default_rng(0)
    encoder = {"fc1": _dense(rng, int(np.prod(IMAGE)), HIDDEN),
               "bn": {"scale": 1.0 + 0.2 * rng.normal(size=HIDDEN), "bias": 0.2 * rng.normal(size=HIDDEN)},
               "fc2": _dense(rng, HIDDEN, HIDDEN), "fc3": _dense(rng, HIDDEN, DIM)}
    key_encoder = _map(lambda p: p + 0.1 * rng.normal(size=p.shape), encoder)
    queue = rng.normal(size=(QUEUE, DIM))
    state = {"params": {"encoder": encoder, "geo_head": {"fc": _dense(rng, DIM, CLUSTERS)}},
             "batch_stats": _bn_stats(rng), "key_params": key_encoder, "key_batch_stats": _bn_stats(rng),
             "queue": queue / np.linalg.norm(queue, axis=1, keepdims=True)}
    state = _map(lambda x: x.astype(np.float32), state)
    state["queue_ptr"] = QUEUE_PTR
    batches = [{"query": rng.integers(0, 256, (BATCH,) + IMAGE, np.uint8),
                "key": rng.integers(0, 256, (BATCH,) + IMAGE, np.uint8),
                "geo_label": rng.integers(0, CLUSTERS, BATCH).astype(np.int32)} for _ in range(STEPS)]
    return {"hp": HP, "state": state, "batches": batches, "layouts": LAYOUTS, "batch": BATCH, "hidden": HIDDEN,
            "dim": DIM, "clusters": CLUSTERS}


def _map(fn, *trees):
    """fn over the leaves of nested dicts."""
    if isinstance(trees[0], dict):
        return {k: _map(fn, *(t[k] for t in trees)) for k in trees[0]}
    return fn(*trees)


def _leaves(tree, prefix=""):
    """(path, array) for every leaf of nested dicts."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(v, f"{prefix}/{k}" if prefix else k)
    else:
        yield prefix, np.asarray(tree)


# ---- The reference, float64. ----

def _standardize(images):
    return (images / 255.0 - np.asarray(pixels.IMAGENET_MEAN)) / np.asarray(pixels.IMAGENET_STD)


def _relu(x):
    return np.maximum(x, 0.0)


def _logsumexp(x):
    m = x.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=1, keepdims=True)))[:, 0]


def _l2_normalize(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _encode(p, stats, images):
    """The tiny encoder in train mode (torch BN) on `images` cut into GROUPS contiguous groups, each normalised
    with its own batch statistics: (un-normalised projections, running statistics = mean over groups of each
    group's update with momentum 0.9 and the unbiased variance)."""
    projections, means, variances = [], [], []
    for x in np.split(images.reshape(len(images), -1), GROUPS):
        a = x @ p["fc1"]["kernel"] + p["fc1"]["bias"]
        mean, var = a.mean(axis=0), a.var(axis=0)
        features = _relu((a - mean) / np.sqrt(var + BN_EPS) * p["bn"]["scale"] + p["bn"]["bias"])
        h = _relu(features @ p["fc2"]["kernel"] + p["fc2"]["bias"])
        projections.append(h @ p["fc3"]["kernel"] + p["fc3"]["bias"])
        n = len(x)
        means.append(BN_MOMENTUM * stats["bn"]["mean"] + (1 - BN_MOMENTUM) * mean)
        variances.append(BN_MOMENTUM * stats["bn"]["var"] + (1 - BN_MOMENTUM) * var * n / (n - 1))
    return np.concatenate(projections), {"bn": {"mean": np.mean(means, axis=0), "var": np.mean(variances, axis=0)}}


def _losses(params, stats, queries, keys, queue, geo_labels):
    """(loss, InfoNCE, geo cross-entropy), global batch means."""
    z, _ = _encode(params["encoder"], stats, queries)
    q = _l2_normalize(z)
    logits = np.concatenate([np.sum(q * keys, axis=1, keepdims=True), q @ queue.T], axis=1) / HP["temperature"]
    nce = np.mean(_logsumexp(logits) - logits[:, 0])
    geo_logits = _relu(z) @ params["geo_head"]["fc"]["kernel"] + params["geo_head"]["fc"]["bias"]
    geo_ce = np.mean(_logsumexp(geo_logits) - geo_logits[np.arange(len(z)), geo_labels])
    return HP["infonce_weight"] * nce + HP["geo_weight"] * geo_ce, nce, geo_ce


def _finite_difference_grad(fn, params):
    """Central differences of the scalar fn(params) w.r.t. every element of every leaf."""
    params = copy.deepcopy(params)
    grads = _map(np.zeros_like, params)
    for (_, p), (_, g) in zip(_leaves(params), _leaves(grads)):
        for i in np.ndindex(p.shape):
            original = p[i]
            p[i] = original + FD_STEP
            up = fn(params)
            p[i] = original - FD_STEP
            down = fn(params)
            p[i] = original
            g[i] = (up - down) / (2 * FD_STEP)
    return grads


def _reference_step(state, batch, perm):
    """One MoCo-v2 step on the global batch; returns (new state, metrics)."""
    queries, key_images = _standardize(batch["query"]), _standardize(batch["key"])
    m = HP["key_momentum"]
    key_params = _map(lambda k, q: m * k + (1 - m) * q, state["key_params"], state["params"]["encoder"])
    shuffled, key_batch_stats = _encode(key_params, state["key_batch_stats"], key_images[perm])
    keys = np.empty_like(shuffled)
    keys[perm] = _l2_normalize(shuffled)  # Shuffled row j is image perm[j].

    def loss(params):
        return _losses(params, state["batch_stats"], queries, keys, state["queue"], batch["geo_label"])

    total, nce, geo_ce = loss(state["params"])
    grads = _finite_difference_grad(lambda p: loss(p)[0], state["params"])
    step = state["step"]  # optax's schedule counter ("lr_schedule_count") must follow it: the lr comes from there.
    # The released cosine schedule, set per epoch: lr_e = peak * (1 + cos(pi * e / E)) / 2 (one step an epoch).
    lr = HP["peak_lr"] * 0.5 * (1 + math.cos(math.pi * min(step, HP["total_steps"]) / HP["total_steps"]))
    # torch.optim.SGD: weight decay added to the gradient of every parameter, then buffer = momentum * buffer + g.
    buffer = _map(lambda b, g, p: HP["sgd_momentum"] * b + g + HP["weight_decay"] * p, state["momentum_buffer"],
                  grads, state["params"])
    queue = state["queue"].copy()
    queue[state["queue_ptr"]:state["queue_ptr"] + BATCH] = keys
    new_state = {
        "step": step + 1,
        "params": _map(lambda p, b: p - lr * b, state["params"], buffer),
        "momentum_buffer": buffer,
        "lr_schedule_count": step + 1,
        "batch_stats": _encode(state["params"]["encoder"], state["batch_stats"], queries)[1],
        "key_params": key_params,
        "key_batch_stats": key_batch_stats,
        "queue": queue,
        "queue_ptr": (state["queue_ptr"] + BATCH) % QUEUE,
    }
    return new_state, {"loss": total, "info_nce": nce, "geo_ce": geo_ce, "lr": lr}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(the JAX step's results per layout and step, the reference's states and metrics after each step)."""
    tmp = tmp_path_factory.mktemp("step_reference")
    setup = _initial_setup()
    with open(tmp / "setup.pkl", "wb") as f:
        pickle.dump(setup, f)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", _SCRIPT, str(tmp / "setup.pkl"), str(tmp / "out.pkl")],
                         check=False, env=env, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    with open(tmp / "out.pkl", "rb") as f:
        jax_runs = pickle.load(f)

    state = _map(lambda x: x.astype(np.float64) if isinstance(x, np.ndarray) else x, setup["state"])
    state.update(step=0, momentum_buffer=_map(np.zeros_like, state["params"]))
    reference = []
    for batch, perm in zip(setup["batches"], jax_runs["perms"]):
        # The draw must move images across BN groups: a permutation within (or of whole) groups encodes every
        # key with the same batch statistics as no shuffle at all.
        original_groups = {frozenset(g) for g in np.split(np.arange(BATCH), GROUPS)}
        assert {frozenset(g) for g in np.split(perm, GROUPS)}.isdisjoint(original_groups), perm
        state, metrics = _reference_step(state, batch, perm)
        reference.append((state, metrics))
    return jax_runs, reference


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: "{}dev_x_{}groups".format(*layout))
def test_two_steps_match_the_float64_reference(runs, layout):
    """Every replica of every leaf after each step equals the reference (the counters exactly); the replicas are
    bitwise equal (the state stays replicated without a broadcast). Lists every mismatch, not only the first."""
    jax_runs, reference = runs
    mismatches = []
    for t, (got, (expected_state, expected_metrics)) in enumerate(zip(jax_runs[layout], reference), start=1):
        have_leaves = dict(_leaves(got))
        for name, want in _leaves({"metrics": expected_metrics, **expected_state}):
            have = have_leaves[name]
            if not np.array_equal(have, np.broadcast_to(have[0], have.shape)):
                mismatches.append(f"after step {t}: {name}: the replicas differ")
            exact = name in ("step", "lr_schedule_count", "queue_ptr")
            if not np.allclose(have, want, rtol=0 if exact else RTOL, atol=0 if exact else ATOL):
                diff = np.max(np.abs(have - want))
                mismatches.append(f"after step {t}: {name}: max |step - reference| {diff:.2e}")
    assert not mismatches, f"{layout[0]} device(s) x {layout[1]} BN group(s):\n" + "\n".join(mismatches)
