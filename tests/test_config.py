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


def test_every_command_overrides_any_field_through_one_mechanism(tmp_path):
    """`--set FIELD=VALUE` reaches any field (dotted, YAML values) on every config-reading command, and a
    command's own flags are named `--set`s: the same path, the same errors as params.yaml."""
    from lingbot.cli import _run_config, build_parser, main

    parser = build_parser()
    args = parser.parse_args(["collect", "--out", "x", "--episodes", "7", "--task", "push-v3",
                              "--set", "collect.max_steps=123", "--set", "evaluate.tasks=[push-v3, drawer-open-v3]",
                              "--set", "publish.repo_id=org/name", "--set", "model.depth=3"])
    run = _run_config(args)
    assert run.collect.episodes == 7 and run.collect.tasks == ("push-v3",) and run.collect.max_steps == 123
    assert run.evaluate.tasks == ("push-v3", "drawer-open-v3") and run.publish.repo_id == "org/name"
    assert run.model.depth == 3
    # A flag names its field: the flag wins over a --set of the same field, applied before it.
    args = parser.parse_args(["pretrain", "cache", "--out", "o", "--set", "pretrain.steps=5", "--steps", "9",
                              "--set", "finetune.steps=4"])
    run = _run_config(args)
    assert (run.pretrain.steps, run.finetune.steps) == (9, 4)
    args = parser.parse_args(["ingest", "org/data@v1", "--out", "o", "--camera", "observation.images.top"])
    assert _run_config(args).ingest.source == "org/data@v1"
    assert _run_config(args).ingest.cameras == ("observation.images.top",)
    # A text field takes the value as written (not YAML's `yes` -> True).
    args = parser.parse_args(["publish", "b", "--eval", "e", "--set", "publish.repo_id=yes"])
    assert _run_config(args).publish.repo_id == "yes"
    # The errors params.yaml gives, as one line and exit 2.
    for bad, message in (("collect.episode=3", "unknown field 'collect.episode'"),
                         ("collect.episodes=many", "collect.episodes must be int"),
                         ("collect.episodes", "expected FIELD=VALUE")):
        with pytest.raises(LingbotError, match=message):
            _run_config(parser.parse_args(["collect", "--out", "x", "--set", bad]))
    assert main(["validate", str(tmp_path), "--set", "validate.nope=1"]) == 2


def test_every_params_file_holds_every_param_the_pipeline_names():
    """`dvc repro` refuses a params.yaml that lacks a param a stage lists (`Parameters 'ingest.source' are
    missing`): the shipped params files (params.yaml, configs/*.yaml) hold all of both pipelines' (the
    chain's and the baselines') and load."""
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1]
    stages = [s.get("do", s) for pipeline in ("dvc.yaml", "baselines/dvc.yaml")
              for s in yaml.safe_load((root / pipeline).read_text())["stages"].values()]
    named = {p for stage in stages for p in stage.get("params", []) if isinstance(p, str)}
    for path in [root / "params.yaml", *sorted((root / "configs").glob("*.yaml"))]:
        params = yaml.safe_load(path.read_text())
        for name in named:
            node = params
            for part in name.split("."):
                assert isinstance(node, dict) and part in node, f"{path.name}: no {name}"
                node = node[part]
        load_run_config(path)


def test_each_benchmark_takes_only_its_own_flags():
    from lingbot.cli import build_parser

    parser = build_parser()
    frames = parser.parse_args(["bench", "frames", "--target", "push-v3,drawer-open-v3", "--episodes", "3"])
    assert (frames.what, frames.episodes, frames.target, frames.params) == ("frames", 3, "push-v3,drawer-open-v3",
                                                                           "params.yaml")
    assert parser.parse_args(["bench", "train"]).steps == 10 and parser.parse_args(["bench", "vae"]).steps == 4
    for wrong in (["bench", "data", "--seeds", "1"], ["bench", "train", "--params", "p.yaml"],
                  ["bench", "realtime", "--steps", "3"], ["bench", "seeds"], ["bench", "bc"]):
        with pytest.raises(SystemExit):
            parser.parse_args(wrong)
