"""Bad configs are refused before any compute, each with a message that names the field and the fix."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import fmow
from geo_contrast import config_lib
from geo_contrast import records
from geo_contrast import pretrain
from geo_contrast import stages
from geo_contrast import train_setup


def _config(**overrides):
    c = fmow.get_config("sample")
    c.input.global_batch = 8
    c.moco.queue_size = 32
    for path, value in overrides.items():
        section, _, field = path.rpartition(".")
        (c[section] if section else c)[field] = value
    return c


@pytest.mark.parametrize("overrides,devices,message", [
    ({"input.global_batch": 10}, 4,
     "config.input.global_batch=10 must be a positive multiple of the device count (4); use e.g. "
     "--config.input.global_batch=8."),
    ({"moco.queue_size": 100}, 1,
     "config.moco.queue_size=100 must be a positive multiple of config.input.global_batch=8 (whole batches are "
     "enqueued); use e.g. --config.moco.queue_size=96."),
    ({"moco.temperature": 0.0}, 1, "config.moco.temperature=0.0 must be > 0; use e.g. --config.moco.temperature=0.2"),
    ({"moco.temperature": -0.07}, 1, "config.moco.temperature=-0.07 must be > 0"),
    ({"variant": "simclr"}, 1,
     "config.variant='simclr' is not a variant; choose one of ['geo', 'geo_only', 'geo_tp', 'moco', 'tp']"),
    ({"moco.bn_groups": 1}, 1, "shuffle BN needs at least two BN groups in all (a query and its key must never "
                               "share BN statistics); use e.g. --config.moco.bn_groups=2."),
    ({"moco.bn_groups": 3}, 2, "config.moco.bn_groups=3 must divide the per-device batch (4 = global_batch 8 / 2"),
    ({"dataset.name": ""}, 1, "config.dataset.name is empty"),
    ({"input.prefetch_batches": 0}, 1, "config.input.prefetch_batches=0 must be >= 1"),
    ({"input.image_size": 0}, 1,
     "config.input.image_size=0 must be >= 16 px (the ResNet's stride is 32); use e.g. "
     "--config.input.image_size=224."),
    ({"finetune.image_size": 8, "stages": "finetune"}, 1, "config.finetune: need 16 <= image_size (8) <= "),
    ({"linear_eval.image_size": 0, "stages": "linear_eval"}, 1,
     "config.linear_eval: need 16 <= image_size (0) <= "),
])
def test_impossible_values_are_refused_with_the_field_and_the_fix(overrides, devices, message):
    with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
        config_lib.validate(_config(**overrides), num_devices=devices, num_local_devices=devices)


# Each refused value with the suggestion of its message; the suggestion must pass every check.
@pytest.mark.parametrize("overrides,devices", [
    ({"input.global_batch": 10}, 4), ({"input.global_batch": 0}, 1), ({"input.global_batch": 12}, 1),
    ({"input.global_batch": 6, "moco.queue_size": 64}, 2), ({"moco.bn_groups": 3}, 1), ({"moco.bn_groups": 3}, 2),
    ({"moco.bn_groups": 1}, 1), ({"moco.bn_groups": 0}, 4), ({"moco.queue_size": 100}, 1),
    ({"input.global_batch": 1, "moco.queue_size": 1}, 1), ({"input.image_size": 0}, 1),
])
def test_every_suggested_value_passes_validation(overrides, devices):
    """Following each message's suggestion leads to a valid config, and a suggested value is never refused
    afterwards (a later message may only be about another field, one the user had also set badly)."""
    config = _config(**overrides)
    fixed = set()
    for _ in range(3):
        try:
            config_lib.validate(config, num_devices=devices, num_local_devices=devices)
            return
        except config_lib.ConfigError as error:
            message = str(error)
        refused = re.match(r"config\.(\S+?)=", message)
        assert refused and refused.group(1) not in fixed, message
        suggestion = re.search(r"use e\.g\. ((?:--config\.\S+=\S+ ?)+)\.$", message)
        assert suggestion, message
        for flag in suggestion.group(1).split():
            path, _, value = flag[len("--config."):].partition("=")
            section, _, field = path.rpartition(".")
            config[section][field] = int(value)
            fixed.add(path)
    raise AssertionError(f"still refused after three suggestions: {message}")


def test_geo_only_needs_neither_a_queue_nor_two_bn_groups():
    config = _config(variant="geo_only", **{"moco.bn_groups": 1, "moco.queue_size": 100})
    config_lib.validate(config, num_devices=1, num_local_devices=1)


def test_the_sample_config_passes():
    config_lib.validate(_config(), num_devices=1, num_local_devices=1)
    config_lib.validate(_config(**{"moco.bn_groups": 1}), num_devices=4, num_local_devices=4)


def test_a_split_smaller_than_one_global_batch_is_refused():
    with pytest.raises(config_lib.ConfigError, match=re.escape(
            "config.dataset.train_split='train' has 48 images, fewer than one global batch "
            "(config.input.global_batch=64)")):
        config_lib.validate_against_data(_config(**{"input.global_batch": 64}), num_images=48,
                                         num_distinct_locations=12)


@pytest.fixture
def no_model(monkeypatch):
    """Makes building the model an error, so a test shows that the check came before any compute."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was built before the config was refused")

    monkeypatch.setattr(train_setup, "build_model", refuse)


def _distinct_train_locations(data_dir):
    source = records.load_builder("fmow", data_dir).as_data_source("train")
    coordinates = [source[i]["coordinates"] for i in range(len(source))]
    return len(np.unique(np.stack(coordinates), axis=0))


def test_more_clusters_than_distinct_locations_is_refused_before_the_model(tiny_fmow, tmp_path, no_model):
    data_dir = tiny_fmow[0]
    places = _distinct_train_locations(data_dir)
    assert places == 12
    config = _config(**{"dataset.data_dir": data_dir, "geo.num_clusters": places + 1})
    with pytest.raises(config_lib.ConfigError, match=re.escape(
            f"config.geo.num_clusters={places + 1} exceeds the {places} distinct locations of "
            f"config.dataset.train_split='train': k-means cannot form more clusters than places; use "
            f"--config.geo.num_clusters={places} or fewer.")):
        pretrain.pretrain(config, str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()

    # As many clusters as places passes the check (and reaches the model); without the geo loss the number
    # of clusters does not matter.
    for config in (_config(**{"dataset.data_dir": data_dir, "geo.num_clusters": places}),
                   _config(**{"dataset.data_dir": data_dir, "geo.num_clusters": places + 1, "variant": "tp"})):
        with pytest.raises(AssertionError, match="the model was built"):
            pretrain.pretrain(config, str(tmp_path / config.variant))


def test_a_missing_dataset_says_how_to_build_it(tmp_path, no_model):
    empty = tmp_path / "no_data"
    config = _config(**{"dataset.data_dir": str(empty)})
    with pytest.raises(records.DatasetNotFoundError, match=re.escape(
            f"tfds build tfds_builders/fmow --manual_dir=PATH_TO_RELEASE --data_dir={empty}")):
        pretrain.pretrain(config, str(tmp_path / "workdir"))


def test_a_dataset_built_as_tfrecord_says_how_to_rebuild_it(tiny_fmow, tmp_path, no_model):
    from tfds_builders.fmow import fmow_dataset_builder
    builder = fmow_dataset_builder.Builder(data_dir=str(tmp_path / "data"), file_format="tfrecord")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=tiny_fmow[1]))
    config = _config(**{"dataset.data_dir": str(tmp_path / "data")})
    with pytest.raises(records.DatasetNotFoundError, match=re.escape(
            "is stored as tfrecord; training reads ArrayRecord files by index (each epoch a random permutation "
            "of the images). Rebuild it")) as error:
        pretrain.pretrain(config, str(tmp_path / "workdir"))
    assert str(error.value).endswith("--file_format=array_record")


def test_the_regions_known_to_validation_are_the_augmentations():
    from geo_contrast import augment
    assert config_lib.REGIONS == augment.REGIONS
    with pytest.raises(config_lib.ConfigError, match="config.input.region='square'; choose one of"):
        config_lib.validate(_config(**{"input.region": "square"}), num_devices=1, num_local_devices=1)
    with pytest.raises(config_lib.ConfigError, match="config.linear_eval.region='centre'"):
        config_lib.validate(_config(**{"linear_eval.region": "centre"}), num_devices=1, num_local_devices=1)


def test_stages_validate_before_touching_the_workdir(tmp_path):
    workdir = tmp_path / "new_workdir"
    with pytest.raises(config_lib.ConfigError, match="config.moco.temperature"):
        stages.run(_config(**{"moco.temperature": 0.0}), str(workdir))
    with pytest.raises(config_lib.ConfigError, match=re.escape("config.input.image_size=0 must be >= 16 px")):
        stages.run(_config(**{"input.image_size": 0}), str(workdir))
    with pytest.raises(config_lib.ConfigError, match=re.escape(
            "config.init_from='README.md': README.md is not a readable safetensors file")):
        stages.run(_config(init_from="README.md"), str(workdir))
    with pytest.raises(config_lib.ConfigError, match=re.escape("config.stages='pretrain,probe': unknown stage(s) "
                                                               "['probe']")):
        stages.run(_config(stages="pretrain,probe"), str(workdir))
    assert not workdir.exists()


def test_an_unknown_field_is_named_with_the_closest_one():
    config = _config()
    assert config_lib.unknown_field(config, "moco.temperature") is None
    assert config_lib.unknown_field(config, "mocco.temperature") == "config has no field 'mocco'; did you mean " \
                                                                    "config.moco?"
    assert config_lib.unknown_field(config, "moco.temperature.x") == (
        "config.moco.temperature is a value, not a section: it has no field 'x'.")
    assert config_lib.unknown_field(config, "geo.zzz").startswith(
        "config.geo has no field 'zzz'; its fields are ['loss_weight', 'num_clusters'].")


@pytest.mark.parametrize("flag,message", [
    ("--config.moco.temprature=0.1",
     "--config.moco.temprature: config.moco has no field 'temprature'; did you mean config.moco.temperature?"),
    ("--config=configs/fmow.py:variant=foo", "config.variant='foo' is not a variant; choose one of ['geo', "),
    ("--config=configs/nope.py",
     "--config cannot be loaded: [Errno 2] No such file or directory: 'configs/nope.py'"),
])
def test_a_mistake_in_the_config_flags_is_one_error_line(flag, message, tmp_path):
    """Raised while absl parses the flags (ml_collections' overrides, get_config), before any work."""
    workdir = tmp_path / "workdir"
    config = [flag] if flag.startswith("--config=") else ["--config=configs/fmow.py:sample", flag]
    result = subprocess.run([sys.executable, "-m", "geo_contrast.main", f"--workdir={workdir}", *config],
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), capture_output=True,
                            text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {message}"), result.stderr[-3000:]
    assert "Traceback" not in result.stderr and not workdir.exists()


def test_a_resume_refuses_the_fields_that_change_the_run_and_allows_the_others():
    recorded = json.loads(_config().to_json())  # As the checkpoint's metadata holds it.
    allowed = {"optim.num_epochs": 80, "log_every_steps": 5, "checkpoint_every_steps": 7, "stages": "pretrain",
               "dataset.data_dir": "/elsewhere", "model.compute_dtype": "bfloat16", "input.prefetch_batches": 4,
               "linear_eval.base_lr": 1.0, "finetune.base_lr": 1.0}
    config_lib.check_resume(recorded, _config(**allowed), stage="pretrain", checkpoint="CKPT")
    with pytest.raises(config_lib.ConfigError, match=re.escape(
            "Cannot resume from CKPT with another config: input.crop_scale=(0.5, 1.0) there, (0.2, 1.0) now; "
            "seed=0 there, 1 now. To resume, pass the checkpoint's values ('--config.input.crop_scale=(0.5, 1.0)' "
            "--config.seed=0); to start a new run with the new ones, use a new --workdir.")):
        config_lib.check_resume(recorded, _config(**{"input.crop_scale": (0.2, 1.0), "seed": 1}), stage="pretrain",
                                checkpoint="CKPT")
    # Fine-tuning reads none of pretraining's own fields; its own section is what it must keep.
    config_lib.check_resume(recorded, _config(**{"moco.temperature": 0.5, "finetune.num_epochs": 20}),
                            stage="finetune", checkpoint="CKPT")
    with pytest.raises(config_lib.ConfigError, match=re.escape("finetune.base_lr=0.2 there, 0.1 now.")):
        config_lib.check_resume(recorded, _config(**{"finetune.base_lr": 0.1}), stage="finetune",
                                checkpoint="CKPT")
