"""A lingbot bundle (or release) directory that LeRobot loads like its own checkpoints.

`write_lerobot_files(DIR)` adds LeRobot's `config.json` (policy type "lingbot", `bundle` empty: DIR is
the bundle; the chunk size) and the saved pre/post-processor pipelines. Then

    lerobot-eval --policy.path=DIR --env.type=... [--policy.camera_map='{...}']

finds the plugin by its distribution name (`lerobot_policy_*`) and runs the policy; `lingbot publish`
writes these files into every release, so a pulled release works the same way.
"""

from __future__ import annotations

from pathlib import Path

from lerobot_policy_lingbot.configuration_lingbot import LingbotConfig
from lerobot_policy_lingbot.processor_lingbot import make_lingbot_pre_post_processors


def lerobot_config(meta: dict) -> LingbotConfig:
    """The LeRobot config of a bundle (its policy.json as read by lingbot.policy.bundle.read_bundle).

    No input/output features: LeRobot fills them from the env or dataset the policy is run on (its
    camera keys are then what `camera_map` routes to the bundle's cameras); the bundle knows its own.
    """
    return LingbotConfig(bundle="", chunk_size=int(meta["actions_per_chunk"]), device="cpu")


def write_lerobot_files(directory: Path) -> list[str]:
    """Write LeRobot's config.json and processor files into the bundle `directory`; returns their names."""
    from lingbot.policy.bundle import read_bundle

    directory = Path(directory)
    before = {p.name for p in directory.iterdir()}
    config = lerobot_config(read_bundle(directory))
    config._save_pretrained(directory)
    for pipeline in make_lingbot_pre_post_processors(config):
        pipeline.save_pretrained(directory)
    return sorted({p.name for p in directory.iterdir()} - before)
