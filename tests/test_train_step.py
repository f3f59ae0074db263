"""The MoCo step's pieces against independent computations, and its device-count invariance."""

import collections
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from geo_contrast import train_step as ts


def test_ema_update_is_exact():
    rng = np.random.default_rng(0)
    ema = {"a": rng.normal(size=(3, 4)), "b": {"c": rng.normal(size=5)}}
    new = {"a": rng.normal(size=(3, 4)), "b": {"c": rng.normal(size=5)}}
    out = ts.ema_update(ema, new, 0.999)
    np.testing.assert_allclose(out["a"], 0.999 * ema["a"] + 0.001 * new["a"], rtol=1e-12)
    np.testing.assert_allclose(out["b"]["c"], 0.999 * ema["b"]["c"] + 0.001 * new["b"]["c"], rtol=1e-12)


def test_enqueue_is_a_fifo_with_wrap_around():
    size, dim, batch = 12, 3, 4
    queue = jnp.zeros((size, dim))
    ptr = jnp.zeros((), jnp.int32)
    reference = collections.deque([np.zeros(dim)] * size, maxlen=size)  # Oldest first.
    rng = np.random.default_rng(1)
    for _ in range(7):  # 28 keys through a 12-slot queue: wraps around twice.
        keys = rng.normal(size=(batch, dim)).astype(np.float32)
        queue, ptr = ts.enqueue(queue, ptr, jnp.asarray(keys))
        reference.extend(keys)
        # Read the ring from the pointer (oldest) onwards: it must equal the deque.
        ring = np.roll(np.asarray(queue), -int(ptr), axis=0)
        np.testing.assert_array_equal(ring, np.stack(reference))


def _identity_encoder(variables, x, train, mutable):
    """Stands in for an encoder: the 'projection' is the flattened image, BN statistics are the batch mean."""
    flat = x.reshape(x.shape[0], -1)
    return (flat, flat), {"batch_stats": {"mean": flat.mean(axis=0)}}


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_shuffle_bn_keys_unshuffles_to_the_original_order(groups):
    rng = np.random.default_rng(2)
    images = rng.normal(size=(1, 8, 2, 2, 3)).astype(np.float32)
    perm = jax.random.permutation(jax.random.PRNGKey(3), 8)

    def run(x):
        own, everyone, _ = ts.shuffle_bn_keys(_identity_encoder, None, x, perm, groups)
        return own, everyone

    own, everyone = jax.pmap(run, axis_name=ts.AXIS)(images)
    flat = images[0].reshape(8, -1)
    expected = flat / np.linalg.norm(flat, axis=1, keepdims=True)
    np.testing.assert_allclose(own[0], expected, rtol=1e-6)
    np.testing.assert_allclose(everyone[0], expected, rtol=1e-6)


def test_apply_in_groups_normalises_each_group_with_its_own_statistics():
    """A BN-like encoder (x minus its batch mean) must see each contiguous group as its own batch."""

    def centre(variables, x, train, mutable):
        flat = x.reshape(x.shape[0], -1)
        return (flat, flat - flat.mean(axis=0)), {"batch_stats": {"mean": flat.mean(axis=0)}}

    x = np.random.default_rng(5).normal(size=(8, 2, 2, 3)).astype(np.float32)
    (_, out), stats = ts.apply_in_groups(centre, None, jnp.asarray(x), 4)
    groups = x.reshape(4, 2, -1)
    expected = (groups - groups.mean(axis=1, keepdims=True)).reshape(8, -1)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["mean"], groups.mean(axis=1).mean(axis=0), rtol=1e-5, atol=1e-6)


_EQUIVALENCE_SCRIPT = textwrap.dedent("""
    import functools, json
    import jax, numpy as np
    from configs import fmow
    from geo_contrast import devices as devices_lib, train_setup, train_step as ts
    from geo_contrast.models import moco

    c = fmow.get_config("sample")
    c.model.width = 4
    c.input.global_batch = 16
    c.moco.queue_size = 32
    c.optim.base_lr = 0.03  # MoCo-v2's: the tolerance below is for its step sizes, whatever the sample uses.
    encoder = train_setup.build_encoder(c.model)
    geo_head = moco.GeoHead(5)
    lr_fn = train_setup.learning_rate_schedule(c, steps_per_epoch=2)
    tx = train_setup.optimizer(c, lr_fn)
    state = jax.device_get(train_setup.init_state(c, encoder, geo_head, tx, 32, seed=0))
    rng = np.random.default_rng(0)
    batches = [{"query": rng.integers(0, 256, (16, 32, 32, 3), np.uint8),
                "key": rng.integers(0, 256, (16, 32, 32, 3), np.uint8),
                "geo_label": rng.integers(0, 5, 16).astype(np.int32)} for _ in range(3)]

    def run(devices, groups):
        cfg = ts.StepConfig(temperature=0.2, momentum=0.9, bn_groups=groups, infonce_weight=1.0, geo_weight=1.0)
        step = jax.pmap(functools.partial(ts.train_step, encoder=encoder, geo_head=geo_head, tx=tx, lr_fn=lr_fn,
                                          cfg=cfg), axis_name=ts.AXIS, devices=devices)
        st = devices_lib.replicate(state, devices=devices)
        losses = []
        for b in batches:
            b = jax.tree.map(lambda x: x.reshape((len(devices), -1) + x.shape[1:]), b)
            st, m = step(st, b)
            losses.append(float(jax.device_get(m["loss"])[0]))
        final = devices_lib.unreplicate(st)
        return losses, final

    four, s4 = run(jax.devices()[:4], 1)
    one, s1 = run(jax.devices()[:1], 4)
    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.max(np.abs(a - b)) / (np.max(np.abs(a)) + 1e-2))  # Floor: leaves that start at 0.
    # Everything the run carries forward except the optimizer's momentum (gradients of BN scales are sums that
    # nearly cancel, so their float rounding differs by more, relatively, than the parameters they move).
    fields = lambda s: {"params": s.params, "batch_stats": s.batch_stats, "key_params": s.key_params,
                        "key_batch_stats": s.key_batch_stats, "queue": s.queue}
    diffs = jax.tree_util.tree_flatten_with_path(jax.tree.map(rel, fields(s4), fields(s1)))[0]
    worst = max(diffs, key=lambda kv: kv[1])
    print(json.dumps({"four": four, "one": one, "max_state_diff": worst[1], "worst": jax.tree_util.keystr(worst[0]),
                      "queue_ptr": [int(s4.queue_ptr), int(s1.queue_ptr)]}))
""")


def test_four_devices_equal_one_device_with_four_bn_groups(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", _EQUIVALENCE_SCRIPT], env=env, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)), timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    import json
    result = json.loads(out.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(result["four"], result["one"], rtol=2e-5, atol=2e-5)
    assert result["max_state_diff"] < 1e-4, result["worst"]
    assert result["queue_ptr"] == [16, 16]  # 3 batches of 16 keys in a 32-slot queue.


def test_the_lr_is_set_once_per_epoch_by_the_released_cosine():
    """adjust_learning_rate (main_moco_geo+tp.py) at the start of each epoch: peak (1 + cos(pi e / E)) / 2."""
    from configs import fmow
    from geo_contrast import train_setup
    c = fmow.get_config()
    c.optim.num_epochs = 4
    lr_fn = train_setup.learning_rate_schedule(c, steps_per_epoch=10)
    got = [float(lr_fn(step)) for step in range(40)]
    expected = [0.03 * 0.5 * (1 + np.cos(np.pi * (step // 10) / 4)) for step in range(40)]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert got[9] == got[0] and got[10] < got[9] and got[39] > 0
