import pytest

from lingbot.config import PRESETS, load_run_config, override, preset, register_preset
from lingbot.errors import LingbotError


def test_params_override_preset_fields(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("preset: tiny\ncollect:\n  episodes: 7\n  tasks: [push-v3]\ningest:\n  val_fraction: 0.5\n")
    cfg = load_run_config(path)
    assert cfg.preset == "tiny"
    assert cfg.collect.episodes == 7
    assert cfg.collect.tasks == ("push-v3",)
    assert cfg.collect.image_size == PRESETS["tiny"].collect.image_size  # untouched fields keep the preset
    assert cfg.ingest.val_fraction == 0.5


@pytest.mark.parametrize(
    "text, message",
    [
        ("collect:\n  episodez: 3\n", "unknown field 'collect.episodez'"),
        ("collect:\n  episodes: three\n", "collect.episodes must be int"),
        ("preset: huge\n", "unknown preset 'huge'"),
        ("collect: [1, 2]\n", "collect must be a mapping"),
    ],
)
def test_bad_params_are_named(tmp_path, text, message):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(LingbotError, match=message.replace("(", r"\(")):
        load_run_config(path)


def test_presets_are_unique():
    with pytest.raises(ValueError, match="registered twice"):
        register_preset("tiny", preset("tiny"))
    assert override(preset("small"), {}) == preset("small")


def test_repo_params_load():
    from conftest import REPO

    cfg = load_run_config(REPO / "params.yaml")
    assert "drawer-open-v3" in cfg.collect.tasks


def test_chain_seed_derives_every_training_seed_but_not_the_evaluation_episodes(tmp_path):
    from lingbot.config import SEEDED_SECTIONS

    path = tmp_path / "params.yaml"
    path.write_text("preset: tiny\nvae:\n  seed: 5\n")
    zero = load_run_config(path)
    assert zero.seed == 0 and zero.vae.seed == 5 and zero.pretrain.seed == 0  # chain seed 0: the sections' own
    path.write_text("preset: tiny\nseed: 1\nvae:\n  seed: 5\n")
    one = load_run_config(path)
    seeds = {name: getattr(one, name).seed for name in SEEDED_SECTIONS}
    assert all(seeds[name] != getattr(zero, name).seed for name in SEEDED_SECTIONS)
    assert len(set(seeds.values())) == len(seeds)  # each stage its own stream
    assert one.evaluate.seed == zero.evaluate.seed  # every run scored on the same held-out episodes
    assert load_run_config(path) == one  # a function of the params alone
    path.write_text("preset: tiny\nseed: 2\nvae:\n  seed: 5\n")
    assert load_run_config(path).pretrain.seed not in (seeds["pretrain"], 0)
