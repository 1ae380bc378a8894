"""LeRobot's ACT and Diffusion Policy as peers: trained by LeRobot's own `lerobot-train`, rolled out by
lingbot's `evaluate` through the session interface, on the same demos, seeds and time limit.

Training (`train_peer`) runs `lerobot-train` on the ingested LeRobot dataset, restricted to the target
task's training episodes (the ones `finetune` uses), on the CPU, with no download: the ResNet-18
backbones start from scratch (`pretrained_backbone_weights` null), which costs them the ImageNet
features their defaults assume. The config choices for 64x64 images and 4-action control are in
`PEER_ARGS`; LeRobot's defaults are sized for 480x640 ALOHA images and 50 Hz chunks of 100 actions.

Rollouts (`load_peer`): LeRobot's per-step contract. `infer(observation)` hands LeRobot's preprocessor
the images as float CHW in 0..1 and the state, calls `select_action` (which runs the model only when
its own action queue is empty: every `n_action_steps` steps) and returns one action, so `evaluate`
asks again at the next step; `latency_ms` holds every call (the chunk computations are its tail: see
`latency_ms_p95`).

A trained peer directory: LeRobot's `pretrained_model` files (config.json, model.safetensors, the
processors and their normalisation stats) plus `lingbot_peer.json` (cameras, image size, fps, state key
and dims, the episodes and steps it was trained on).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lingbot.errors import LingbotError
from lingbot.fsutil import atomic_dir

# Our demos: 64x64 images from 2 cameras at 40 fps, 4-d actions, the world model re-plans every 4
# steps. Both peers re-plan as often (n_action_steps 4) and predict a little further (16 steps, 0.4 s).
# Without pretrained weights a smaller transformer / U-Net trains more steps in the same CPU time.
PEER_ARGS = {
    "act": ["--policy.chunk_size=16", "--policy.n_action_steps=4", "--policy.dim_model=256",
            "--policy.dim_feedforward=1024", "--policy.pretrained_backbone_weights=null"],
    # A crop of 7/8 of the image (56 of 64, `train_peer` sets it): a random shift of up to 8 px in
    # training (centre crop at run time), the augmentation BC gets; group norm replaces batch norm
    # when the backbone is not pretrained.
    "diffusion": ["--policy.n_obs_steps=2", "--policy.horizon=16", "--policy.n_action_steps=4",
                  "--policy.drop_n_last_frames=11", "--policy.use_group_norm=true",
                  "--policy.down_dims=[128, 256, 512]", "--policy.noise_scheduler_type=DDIM",
                  "--policy.num_inference_steps=10", "--policy.pretrained_backbone_weights=null"],
}
PEERS = tuple(PEER_ARGS)
# ALOHA (50 Hz, 400-step episodes, 14 joints): ACT's own setting for its sim tasks, a chunk of 100 actions
# (2 s) executed whole (LeRobot's default; ACT's paper adds temporal ensembling, not used here), so it
# plans 4 times per episode; the world model plans every 8 actions (latents.frame_stride 2). Diffusion
# Policy re-plans every 8 of a 16-step horizon. The model sizes stay the CPU-sized ones above.
ALOHA_ARGS = {
    "act": ["--policy.chunk_size=100", "--policy.n_action_steps=100"],
    "diffusion": ["--policy.horizon=16", "--policy.n_action_steps=8", "--policy.drop_n_last_frames=7"],
}


def peer_args(kind: str, robot_type: str) -> list[str]:
    """`lerobot-train` policy flags of peer `kind` for a dataset of `robot_type` (the last flag wins)."""
    return [*PEER_ARGS[kind], *(ALOHA_ARGS[kind] if robot_type == "aloha" else [])]


def train_peer(kind: str, demos: Path, episodes: list[int], out: Path, steps: int, batch_size: int = 8,
               seed: int = 0, threads: int = 2, extra: tuple[str, ...] = ()) -> dict:
    """`lerobot-train` of peer `kind` on `episodes` of the ingested dataset at `demos`; writes `out`."""
    if kind not in PEER_ARGS:
        raise LingbotError(f"peer: unknown peer {kind!r} (known: {', '.join(PEERS)})")
    demos = Path(demos)
    described = json.loads((demos / "lingbot.json").read_text())
    dataset = (demos / "dataset").resolve()
    keys = described["keys"]
    height, width = described["shapes"][keys["cameras"][0]][:2]
    if kind == "diffusion":
        extra = (f"--policy.crop_shape=[{height - height // 8}, {width - width // 8}]", *extra)
    # The peers read what lingbot's policy reads: the chosen cameras and state, never the dataset's
    # other features (collect's observation.environment_state says where the objects are: LeRobot
    # would feed it to ACT and Diffusion Policy as an input).
    inputs = {cam: {"type": "VISUAL", "shape": [3, height, width]} for cam in keys["cameras"]}
    inputs[keys["state"]] = {"type": "STATE", "shape": list(described["shapes"][keys["state"]][:1])}
    with tempfile.TemporaryDirectory(prefix=f"lingbot-peer-{kind}-") as tmp:
        run_dir = Path(tmp) / "run"
        args = [sys.executable, "-m", "lerobot.scripts.lerobot_train",
                f"--dataset.repo_id=local/{dataset.parent.name}", f"--dataset.root={dataset}",
                f"--dataset.episodes={json.dumps(sorted(episodes))}", f"--policy.type={kind}", *peer_args(kind, described.get("robot_type", "")),
                f"--policy.input_features={json.dumps(inputs)}",
                "--policy.push_to_hub=false", "--policy.device=cpu", f"--steps={steps}", f"--batch_size={batch_size}",
                "--num_workers=0", f"--output_dir={run_dir}", f"--save_freq={steps}",
                f"--log_freq={min(50, max(1, steps // 4))}",
                "--wandb.enable=false", f"--seed={seed}", *extra]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
        start = time.perf_counter()
        proc = subprocess.run(args, capture_output=True, text=True, env=env)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise LingbotError(f"peer: lerobot-train {kind} failed (exit {proc.returncode}):\n{tail}")
        # LeRobot logs each interval's mean update and data-loading seconds per step; the first
        # interval holds the warm-up. Their sum is the step time without the process's start-up.
        logged = [float(u) + float(d) for u, d in re.findall(r"updt_s:([\d.]+).*?data_s:([\d.]+)", proc.stdout + proc.stderr)]
        step_seconds = float(np.mean(logged[1:] or logged)) if logged else seconds / steps
        model = run_dir / "checkpoints" / "last" / "pretrained_model"
        with atomic_dir(Path(out)) as target:
            shutil.copytree(model, target)
            meta = {"format": "lingbot-peer/1", "peer": kind, "cameras": keys["cameras"],
                    "image_size": list(described["shapes"][keys["cameras"][0]][:2]), "fps": described["fps"],
                    "state_key": keys["state"], "state_dim": int(described["shapes"][keys["state"]][0]),
                    "action_dim": int(described["shapes"][keys["action"]][0]), "episodes": sorted(episodes),
                    "steps": steps, "batch_size": batch_size, "train_seconds": round(seconds, 1),
                    "step_seconds": round(step_seconds, 4)}
            (target / "lingbot_peer.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def train_peer_for(kind: str, demos: Path, episodes: list[int], out: Path, budget_s: float, batch_size: int = 8,
                   seed: int = 0, threads: int = 2) -> dict:
    """`train_peer` for about `budget_s` seconds. A 40-step `lerobot-train` probe's own log gives the
    seconds per step after the warm-up (its update and data-loading times), and its wall time less those
    steps the start-up; steps = (budget - start-up) / seconds per step, at least 10. (Two short runs'
    wall times differenced gave 695k steps when the shorter run was slowed by another process.)"""
    with tempfile.TemporaryDirectory(prefix="lingbot-calibrate-") as tmp:
        probe = train_peer(kind, demos, episodes, Path(tmp) / "probe", 40, batch_size, seed, threads)
    start_up = max(0.0, probe["train_seconds"] - 40 * probe["step_seconds"])
    steps = max(10, int((budget_s - start_up) / probe["step_seconds"]))
    return train_peer(kind, demos, episodes, out, steps, batch_size, seed, threads)


class PeerPolicy:
    """A trained LeRobot peer with the session interface `lingbot.sim.evaluate` rolls out."""

    def __init__(self, path: Path):
        from lerobot.configs import PreTrainedConfig
        from lerobot.policies.factory import get_policy_class, make_pre_post_processors

        path = Path(path)
        if not (path / "lingbot_peer.json").is_file():
            raise LingbotError(f"{path / 'lingbot_peer.json'}: missing; not a trained peer directory")
        self.meta = json.loads((path / "lingbot_peer.json").read_text())
        self.cameras, self.state_key = list(self.meta["cameras"]), self.meta["state_key"]
        config = PreTrainedConfig.from_pretrained(path)
        config.device = "cpu"
        self.policy = get_policy_class(config.type).from_pretrained(path, config=config).eval()
        self.pre, self.post = make_pre_post_processors(config, pretrained_path=str(path),
                                                       preprocessor_overrides={"device_processor": {"device": "cpu"}})

    def new_session(self, task: str | None = None, seed: int | None = None) -> "PeerSession":
        return PeerSession(self, task or "", seed or 0)


def load_peer(path: str | Path) -> PeerPolicy:
    return PeerPolicy(Path(path))


class PeerSession:
    """One episode: LeRobot's queues reset, its sampling noise seeded; one action per `infer`."""

    def __init__(self, peer: PeerPolicy, task: str, seed: int):
        import torch

        self.peer, self.task = peer, task
        self.latency_ms: list[float] = []
        peer.policy.reset()
        torch.manual_seed(seed)  # Diffusion Policy draws its noise from torch's global generator

    def observe(self, observation: dict) -> None:  # every step is an `infer`: nothing streams between
        pass

    def infer(self, observation: dict) -> np.ndarray:
        import torch

        from lingbot.policy.observation import observation_entry, observation_state

        start = time.perf_counter()
        p = self.peer
        batch = {}
        for key in p.cameras:
            image = torch.from_numpy(np.ascontiguousarray(observation_entry(observation, key)))
            image = image.permute(2, 0, 1).float() / 255.0
            batch[key] = image[None]
        state = observation_state(observation, p.state_key, p.meta["state_dim"])
        batch[p.state_key] = torch.from_numpy(state)
        batch["task"] = [self.task]
        with torch.inference_mode():
            action = p.post(p.policy.select_action(p.pre(batch)))
        self.latency_ms.append((time.perf_counter() - start) * 1000)
        return np.asarray(action, np.float32).reshape(1, -1)

    def close(self) -> None:
        pass
