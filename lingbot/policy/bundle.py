"""The policy bundle: everything a robot needs to run a trained policy, in one directory.

One layout serves evaluation, the release on the Hub, `lingbot pull` and `lingbot serve`::

    policy.json            format, model config, cameras (LeRobot keys), image size [H, W], actions per
                           chunk, the robot's action and state dims and keys, fps, policy config, text encoder,
                           provenance (fingerprints of the dataset / VAE / cache it was trained from),
                           robot (type, action and state channel names in vector order), when known
    model.safetensors      world-model weights (the training run's EMA weights)
    normalization.json     q01/q99 (and mean/std) of the robot's actions and states
    tasks.safetensors      "embeddings" (n_tasks, 1, text_dim) for the task strings in policy.json
    vae/                   diffusers AutoencoderKLWan directory (config carries the latent mean/std)

Only safetensors and JSON: loading never unpickles. A release adds README.md (model card),
eval.json and manifest.json (sha256 of every file) on top of this layout (lingbot/hub/).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from lingbot.config import ModelConfig, PolicyConfig, to_dict
from lingbot.errors import LingbotError
from lingbot.fsutil import atomic_dir

FORMAT = "lingbot-policy/1"
FILES = ("policy.json", "model.safetensors", "normalization.json", "tasks.safetensors", "vae")


def write_bundle(out: Path, checkpoint: Path, vae_dir: Path, cache: Path, policy_cfg: PolicyConfig,
                 demos: Path | None = None) -> dict:
    """Assemble a bundle from a training checkpoint, the VAE and the latent cache it was trained on;
    `demos` (the ingested dataset) adds the robot's description: type and the names of its action and
    state channels, in the order the vectors hold them."""
    from safetensors.torch import load_file, save_file

    from lingbot.vae.wan import spatial_ratio

    checkpoint, vae_dir, cache = Path(checkpoint), Path(vae_dir), Path(cache)
    for path in (checkpoint / "config.json", checkpoint / "ema.safetensors", vae_dir / "config.json",
                 cache / "manifest.json", cache / "tasks.safetensors"):
        if not path.is_file():
            raise LingbotError(f"{path}: missing; cannot assemble the policy bundle")
    ckpt = json.loads((checkpoint / "config.json").read_text())
    manifest = json.loads((cache / "manifest.json").read_text())
    if ckpt.get("cache_fingerprints", {}).get("vae") not in (None, manifest["fingerprints"]["vae"]):
        raise LingbotError(f"{checkpoint}: trained on a cache from another VAE than {cache}")
    from safetensors import safe_open

    first = next(iter(manifest["episodes"]))
    with safe_open(str(cache / manifest["shards"][manifest["episodes"][first]["shard"]]), framework="pt") as f:
        latent_hw = f.get_slice(f"{first}/video").get_shape()[-2:]
    ratio = spatial_ratio(json.loads((vae_dir / "config.json").read_text()))
    meta = {
        "format": FORMAT,
        "image_size": [int(latent_hw[0]) * ratio, int(latent_hw[1]) * ratio],
        "model": ckpt["model"],
        "cameras": manifest["cameras"],
        "actions_per_chunk": ckpt["actions_per_chunk"],
        "frame_stride": manifest["frame_stride"],
        "action_dim": ckpt["action_dim"],
        "action_key": manifest["action_key"],
        "state_key": manifest["state_key"],
        "state_dim": len(manifest["stats"]["state"]["q01"]),
        "fps": manifest["fps"],
        "tasks": manifest["tasks"],
        "text_encoder": manifest["text_encoder"],
        "policy": to_dict(policy_cfg),
        "provenance": {"cache": manifest["fingerprints"], "train": ckpt.get("train", {}), "step": ckpt.get("step")},
    }
    if demos is not None:
        from lingbot.data.lerobot_io import channel_names

        described = json.loads((Path(demos) / "lingbot.json").read_text())
        names = described.get("names") or {}
        meta["robot"] = {"type": described.get("robot_type"),
                         "action_names": channel_names(names.get(manifest["action_key"]), meta["action_dim"]),
                         "state_names": channel_names(names.get(manifest["state_key"]), meta["state_dim"])}
    with atomic_dir(Path(out)) as tmp:
        tmp.mkdir()
        (tmp / "policy.json").write_text(json.dumps(meta, indent=2) + "\n")
        save_file(load_file(str(checkpoint / "ema.safetensors")), str(tmp / "model.safetensors"))
        (tmp / "normalization.json").write_text(json.dumps(
            {"action": manifest["stats"]["action"], "state": manifest["stats"]["state"]}, indent=2) + "\n")
        shutil.copyfile(cache / "tasks.safetensors", tmp / "tasks.safetensors")
        shutil.copytree(vae_dir, tmp / "vae")
    return meta


def read_bundle(path: Path) -> dict:
    """policy.json of a bundle, checked: every file present, known format. Adds `model_config`."""
    path = Path(path)
    missing = [name for name in FILES if not (path / name).exists()]
    if missing:
        raise LingbotError(f"{path}: not a lingbot policy bundle ({missing[0]} missing)")
    meta = json.loads((path / "policy.json").read_text())
    if meta.get("format") != FORMAT:
        raise LingbotError(f"{path / 'policy.json'}: format {meta.get('format')!r}, expected {FORMAT!r}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    model = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["model"].items() if k in fields}
    model.setdefault("state_channels", 0)  # bundles from before the state input: the model had none
    model.setdefault("text_modulation", False)  # bundles from before the text joined AdaLN
    meta["model_config"] = ModelConfig(**model)
    return meta
