"""A sample config's data: drawn from `config.dataset.sample_seed`, never from `config.seed`, so every training
seed of a sweep trains and is scored on the same images."""

from configs import fmow
from geo_contrast import sample_dataset


def test_the_sample_is_generated_from_its_own_seed_not_the_training_seed(tmp_path, monkeypatch):
    seeds = []
    _, builder_class = sample_dataset.SAMPLES["fmow"]
    generate = lambda out, seed: seeds.append(seed) or {}  # noqa: E731
    monkeypatch.setitem(sample_dataset.SAMPLES, "fmow", (generate, builder_class))
    monkeypatch.setattr(builder_class, "download_and_prepare", lambda self, **kwargs: None)
    for training_seed in (0, 3):
        config = fmow.get_config("sample")
        config.seed = training_seed
        sample_dataset.prepare_if_sample(config, str(tmp_path / f"seed{training_seed}"))
    config.dataset.sample_seed = 5
    sample_dataset.prepare_if_sample(config, str(tmp_path / "data_seed5"))
    assert seeds == [0, 0, 5]
