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


def test_the_gpu_preset_is_a_run_on_one_gpu():
    """`gpu`: the embedded default with the base world model and a GPU's batches; laid over another run,
    the run's data, tasks and evaluation stay, and its text width and latent channels."""
    from lingbot.config import BASE_MODEL, on_one_gpu

    gpu, small = preset("gpu"), preset("small")
    assert gpu.preset == "gpu" and gpu.model.video_width == BASE_MODEL.video_width and gpu.model.depth == BASE_MODEL.depth
    assert (gpu.model.text_dim, gpu.model.latent_channels) == (small.model.text_dim, small.model.latent_channels)
    assert (gpu.vae.batch_size, gpu.pretrain.batch_size, gpu.finetune.batch_size) == (16, 32, 32)
    assert (gpu.pretrain.lr, gpu.finetune.lr) == (3e-4, 1e-4)
    assert gpu.collect == small.collect and gpu.evaluate == small.evaluate and gpu.policy == small.policy
    run = override(preset("tiny"), {"pretrain": {"max_chunks": 12, "warmup": 50}, "evaluate": {"episodes": 7}})
    on_gpu = on_one_gpu(run)
    assert on_gpu.pretrain.max_chunks == 12 and on_gpu.pretrain.warmup == 20 and on_gpu.evaluate.episodes == 7
    assert on_gpu.model.latent_channels == run.model.latent_channels == 4 and on_gpu.vae.z_dim == run.vae.z_dim


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
