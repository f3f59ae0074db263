"""Linear evaluation on a tiny built fMoW sample (ResNet-18 width 8, 32 px): extraction, frozen backbone,
cached vs uncached training, val selection with a single test evaluation, checkpoints and results files."""

import json
import os

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import fmow
from geo_contrast import augment
from geo_contrast import backbones
from geo_contrast import checkpointing
from geo_contrast import classification
from geo_contrast import devices
from geo_contrast import input_pipeline
from geo_contrast import linear_eval
from geo_contrast import logistic
from geo_contrast import metric_writer
from geo_contrast import records
from geo_contrast import results
from geo_contrast import train_setup
from geo_contrast import workdir as workdir_lib


@pytest.fixture(scope="module")
def data_dir(tiny_fmow):
    return tiny_fmow[0]


def _config(data_dir, **linear_eval):
    c = fmow.get_config("sample")
    c.dataset.data_dir = data_dir
    c.dataset.generate_sample = False
    c.model.width = 8
    c.moco.queue_size = 128
    c.linear_eval.update(dict(init="random", global_batch=16, num_epochs=3, decay_epochs=(2,), base_lr=4.0,
                              image_size=32, resize_size=32, cache_features=True, readout="sgd"))
    c.linear_eval.update(linear_eval)
    return c


def _builder(config):
    return records.load_builder(config.dataset.name, config.dataset.data_dir)


def _examples(builder, split):
    """The split's locations in stored order, decoded by TFDS (not by the pipeline under test)."""
    source = builder.as_data_source(split)
    return [source[i] for i in range(len(source))]


def _leaves_equal(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_extracted_features_match_a_direct_forward_pass(data_dir, tmp_path):
    config = _config(data_dir, global_batch=8)  # Val has more than 8 images: several batches, the last padded.
    backbone = backbones.load(config, str(tmp_path), "random")
    variables = devices.replicate(backbone.variables)
    data = linear_eval.extract_split(backbone.module, variables, _builder(config), "val", config.linear_eval)
    images, labels, locations = [], [], []
    source = _builder(config).as_data_source("val", deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
    for index in range(len(source)):  # The stored records, parsed here without the pipeline under test.
        features = tf.train.Example.FromString(source[index]).features.feature
        for jpeg in features["images"].bytes_list.value:
            images.append(augment.eval_view(jpeg, 32, 32).numpy())
            labels.append(features["label"].int64_list.value[0])
            locations.append(index)
    expected = backbone.module.apply(backbone.variables, np.stack(images), train=False)
    assert len(labels) > 8 and len(labels) % 8
    np.testing.assert_allclose(data.outputs, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(data.labels, labels)
    np.testing.assert_array_equal(data.locations, locations)


@pytest.fixture(scope="module")
def two_probes(data_dir, tmp_path_factory):
    """The cached and the uncached probe on the same random backbone, trained two epochs each.

    With image_size == resize_size the training crop of a square region (the box square) is the whole region,
    i.e. the eval view, and with a batch holding the whole train split each epoch is one full-batch step, so the
    order of images does not matter: the two paths must then train the same classifier.
    """
    config = _config(data_dir, region="box_square")
    builder = _builder(config)
    num_train = sum(len(ex["timestamps"]) for ex in _examples(builder, "train"))
    lc = config.linear_eval
    lc.global_batch = 8 * -(-num_train // 8)
    lc.num_epochs = 2
    backbone = backbones.load(config, str(tmp_path_factory.mktemp("probe")), "random")
    head = classification.head(62)
    variables = devices.replicate(backbone.variables)
    val = linear_eval.extract_split(backbone.module, variables, builder, "val", lc)
    train = linear_eval.extract_split(backbone.module, variables, builder, "train", lc)
    names = builder.info.features["label"].names
    writer = metric_writer.MetricWriter(str(tmp_path_factory.mktemp("metrics")))

    def run(cached):
        state = linear_eval.init_probe_state(backbone.variables, head, backbone.module.feature_dim, seed=0,
                                             momentum=lc.momentum, weight_decay=lc.weight_decay)
        replicated = devices.replicate(state)
        if cached:
            batches = lambda e: linear_eval.feature_batches(train.outputs, train.labels, lc.global_batch, seed=0,
                                                            epoch=e)
        else:
            index = records.read_location_index(builder, "train")
            batches = lambda e: input_pipeline.lincls_train_batches(
                builder, "train", index, image_size=lc.image_size, resize_size=lc.resize_size,
                batch_size=lc.global_batch, seed=0, epoch=e, region=lc.region)
        final, _ = linear_eval.train_classifier(
            replicated, batches, val, names, lc=lc, head=head, backbone=None if cached else backbone.module,
            writer=writer, name="test")
        return state, devices.unreplicate(final)

    try:
        return backbone.variables, run(cached=True), run(cached=False)
    finally:
        writer.close()


def test_uncached_probe_leaves_the_backbone_unchanged(two_probes):
    original, _, (initial, final) = two_probes
    assert _leaves_equal(final.backbone, original)
    assert not _leaves_equal(final.head, initial.head)  # It did train.


def test_cached_and_uncached_paths_train_the_same_classifier(two_probes):
    _, (_, cached), (_, uncached) = two_probes
    for a, b in zip(jax.tree.leaves(cached.head), jax.tree.leaves(uncached.head), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_selects_on_val_and_evaluates_test_once(data_dir, tmp_path, monkeypatch):
    config = _config(data_dir, num_epochs=4)
    scripted_val_top1 = iter([0.3, 0.7, 0.5, 0.6])  # Best after epoch 2, not the last.
    calls = []
    real = linear_eval.evaluate_split

    def spy(head, params, split, class_names):
        report = real(head, params, split, class_names)
        if split.name == "val":
            report["top1"] = next(scripted_val_top1)
        calls.append((split, jax.tree.map(np.copy, params), report))
        return report

    monkeypatch.setattr(linear_eval, "evaluate_split", spy)
    entry = linear_eval.evaluate(config, str(tmp_path))

    val_calls = [c for c in calls if c[0].name == "val"]
    test_calls = [c for c in calls if c[0].name == "test"]
    assert len(val_calls) == 4 and len(test_calls) == 1
    assert entry["selected_epoch"] == 2
    assert entry["splits"]["val"]["top1"] == 0.7
    test, params, _ = test_calls[0]
    assert _leaves_equal(params, val_calls[1][1])
    assert not _leaves_equal(params, val_calls[3][1])
    # Test metrics recomputed with numpy from the selected classifier and the test features.
    logits = test.outputs.astype(np.float64) @ params["kernel"] + params["bias"]
    assert entry["splits"]["test"]["top1"] == pytest.approx(np.mean(logits.argmax(1) == test.labels))
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    location_ids = np.unique(test.locations)
    votes = np.stack([probs[test.locations == i].sum(0) for i in location_ids])
    location_labels = np.array([test.labels[test.locations == i][0] for i in location_ids])
    assert entry["splits"]["test"]["location_top1"] == pytest.approx(np.mean(votes.argmax(1) == location_labels))
    with open(tmp_path / "results.json") as f:
        assert json.load(f)["linear_eval"]["random"]["selected_epoch"] == 2


def test_the_logistic_readout_keeps_the_best_val_strength_and_scores_test_with_it(data_dir, tmp_path):
    entry = linear_eval.evaluate(_config(data_dir, readout="logistic"), str(tmp_path))
    with open(workdir_lib.metrics_path(str(tmp_path), workdir_lib.stage_prefix("linear_eval", "random"))) as f:
        rows = [json.loads(line) for line in f]
    assert sorted(row["l2"] for row in rows) == sorted(logistic.STRENGTHS)
    best = max(row["val_top1"] for row in rows)
    assert entry["splits"]["val"]["top1"] == pytest.approx(best)
    assert entry["selected_l2"] == max(row["l2"] for row in rows if row["val_top1"] == best)
    assert set(entry["splits"]) == {"val", "test"} and entry["protocol"]["readout"] == "logistic"
    assert "selected_epoch" not in entry


@pytest.fixture(scope="module")
def pretrained_workdir(data_dir, tmp_path_factory):
    """A workdir whose checkpoints/7 holds a pretraining state of another seed (so it differs from random)."""
    workdir = tmp_path_factory.mktemp("pretrained")
    config = _config(data_dir)
    config.seed = 1
    state = train_setup.initial_state(config).replace(step=np.int32(7))
    mngr = checkpointing.manager(os.path.join(workdir, "checkpoints"), keep=2)
    checkpointing.save(mngr, 7, state, {"config": json.loads(config.to_json()), "total_steps": 10,
                                        "variant": config.variant})
    checkpointing.wait(mngr)
    return str(workdir), state


def test_checkpoint_paths_resolve_to_the_same_step(pretrained_workdir):
    workdir, _ = pretrained_workdir
    directory = os.path.join(workdir, "checkpoints")
    assert workdir_lib.find_checkpoint(workdir) == (directory, 7)
    assert workdir_lib.find_checkpoint(directory) == (directory, 7)
    assert workdir_lib.find_checkpoint(os.path.join(directory, "7")) == (directory, 7)


def test_pretrained_without_a_checkpoint_is_a_clear_error(data_dir, tmp_path):
    with pytest.raises(workdir_lib.WorkdirError, match="Run the pretrain stage.*init=random"):
        backbones.load(_config(data_dir), str(tmp_path), "pretrained")
    with pytest.raises(workdir_lib.WorkdirError, match="is not a directory"):
        backbones.load(_config(data_dir), str(tmp_path), str(tmp_path / "missing"))
    with pytest.raises(workdir_lib.WorkdirError, match="holds no finished pretraining checkpoint"):
        backbones.load(_config(data_dir), str(tmp_path), str(tmp_path))


def test_results_keep_both_inits_and_the_margin(data_dir, pretrained_workdir):
    workdir, saved = pretrained_workdir
    config = _config(data_dir, init="pretrained", num_epochs=2)
    backbone = backbones.load(config, workdir, "pretrained")
    assert _leaves_equal(backbone.variables["params"], saved.params["encoder"]["backbone"])
    linear_eval.evaluate(config, workdir)
    linear_eval.evaluate(_config(data_dir, init="random", num_epochs=2, cache_features=False), workdir)

    with open(os.path.join(workdir, "results.json")) as f:
        entries = json.load(f)["linear_eval"]
    assert set(entries) == {"pretrained", "random"}
    pretrained, random = entries["pretrained"], entries["random"]
    assert (pretrained["pretrain_step"], pretrained["pretrain_total_steps"]) == (7, 10)
    assert pretrained["variant"] == config.variant and random["pretrain_step"] is None
    assert set(pretrained["splits"]) == set(random["splits"]) == {"val", "test"}
    with open(os.path.join(workdir, "results.md")) as f:
        markdown = f.read()
    rows = [line.split("|")[1:-1] for line in markdown.splitlines() if line.startswith("| ")]
    rows = {(cells[0].strip(), cells[5].strip()): cells for cells in rows}
    columns = ("top1", "top5", "macro_f1", "location_top1", "location_macro_f1")
    for split in ("val", "test"):
        mine, floor = pretrained["splits"][split], random["splits"][split]
        for i, name in ((6 + 2 * j, name) for j, name in enumerate(columns)):  # Frozen, then fine-tuned columns.
            assert rows["pretrained", split][i + 1].strip() == "-"  # Not fine-tuned.
            assert float(rows["pretrained", split][i]) == pytest.approx(100 * mine[name], abs=0.005)
            assert float(rows["random", split][i]) == pytest.approx(100 * floor[name], abs=0.005)
            assert float(rows["pretrained - random", split][i]) == pytest.approx(100 * (mine[name] - floor[name]),
                                                                                 abs=0.005)
    assert os.path.exists(os.path.join(workdir, "linear_eval_random_metrics.jsonl"))

    linear_eval.evaluate(config, workdir)  # A rerun replaces its per-epoch rows instead of appending a copy.
    with open(os.path.join(workdir, "linear_eval_pretrained_metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2]


def test_frozen_and_fine_tuned_columns_and_margins_on_hand_made_entries():
    def entry(top1, step, epoch=3):
        metrics = {"top1": top1, "top5": 0.9, "macro_f1": 0.5, "location_top1": top1, "location_macro_f1": 0.5}
        return {"variant": "geo_tp" if step else None, "pretrain_step": step, "pretrain_total_steps": step,
                "backbone": "ResNet-50", "selected_epoch": epoch, "num_epochs": 4, "splits": {"val": metrics}}

    markdown = results.render_markdown({
        "linear_eval": {"random": entry(0.25, None), "pretrained": entry(0.6, 100)},
        "finetune": {"pretrained": entry(0.7, 100, epoch=2), "random": entry(0.5, None)}})
    rows = [line for line in markdown.splitlines() if line.startswith("| ")][1:]
    assert rows[0] == ("| pretrained | geo_tp | 100/100 | ResNet-50 | 3/4 / 2/4 | val | 60.00 | 70.00 | 90.00 "
                       "| 90.00 | 50.00 | 50.00 | 60.00 | 70.00 | 50.00 | 50.00 |")
    assert rows[1].startswith("| random | - | - | ResNet-50 | 3/4 / 3/4 | val | 25.00 | 50.00 |")
    assert rows[2] == ("| pretrained - random |  |  |  |  | val | +35.00 | +20.00 | +0.00 | +0.00 | +0.00 | +0.00 "
                       "| +35.00 | +20.00 | +0.00 | +0.00 |")


def test_step_and_cosine_learning_rates():
    step = [classification.epoch_learning_rate(e, peak=30.0, num_epochs=100, schedule="step", decay_epochs=(60, 80))
            for e in (0, 59, 60, 79, 80, 99)]
    np.testing.assert_allclose(step, [30, 30, 3, 3, 0.3, 0.3])
    cosine = [classification.epoch_learning_rate(e, peak=2.0, num_epochs=10, schedule="cosine", decay_epochs=())
              for e in (0, 5, 9)]
    np.testing.assert_allclose(cosine, [2.0, 1.0, 1.0 + np.cos(np.pi * 0.9)])


def test_pad_batch_masks_the_padding():
    padded = input_pipeline.pad_batch({"x": np.ones((3, 2)), "label": np.array([4, 5, 6])}, 5)
    np.testing.assert_array_equal(padded["x"], [[1, 1]] * 3 + [[0, 0]] * 2)
    np.testing.assert_array_equal(padded["label"], [4, 5, 6, 0, 0])
    np.testing.assert_array_equal(padded["weight"], [1, 1, 1, 0, 0])
