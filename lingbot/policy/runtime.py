"""The loaded policy: a bundle (lingbot/policy/bundle.py) read onto a device, the public entry point.

`load_policy(dir)` gives a `Policy` (the world model, the VAE, the action and state channel layouts
and the task embeddings, checked against the policy config); `policy.new_session(task)` starts an
episode stream (lingbot/policy/session.py), the object a robot loop, the server, evaluation and the
LeRobot plugin drive.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lingbot.config import PolicyConfig, override
from lingbot.data.normalization import ChannelLayout
from lingbot.errors import LingbotError
from lingbot.model.world_model import FlowSampler, WorldModel
from lingbot.policy.bundle import read_bundle
from lingbot.policy.session import Session


def policy_dtype(dtype: str, device: torch.device | str) -> str:
    """The world model's weights dtype for a policy on `device` ("auto", "fp32" or "bf16"), resolved as
    training's precision is: "auto" is bf16 on a CUDA GPU with native bf16 (what the GPU benchmark
    measures and `lingbot serve` serves there) and fp32 on every CPU (the small models' chunks are no
    faster in bf16 there)."""
    from lingbot.hardware import resolve_precision

    return resolve_precision(dtype, device, "policy", cpu_bf16=False)


def warn_untrained(model_cfg, cfg: PolicyConfig) -> None:
    """Warn where this policy config would show the model a history it was not trained on: a ring of
    another length than its training windows' (`window_chunks`), or imagined video left noisier than
    noisy-history augmentation ever made it (video denoising stopped early)."""
    import warnings

    from lingbot.model.world_model import HISTORY_NOISE_MAX

    if model_cfg.window_chunks and cfg.history_chunks != model_cfg.window_chunks:
        warnings.warn(f"policy: history_chunks {cfg.history_chunks}, but the model was trained with a "
                      f"{model_cfg.window_chunks}-chunk attention window: set policy.history_chunks "
                      f"{model_cfg.window_chunks}", stacklevel=3)
    level = FlowSampler(cfg.video_steps, cfg.shift).level(cfg.video_exec_step)
    if model_cfg.video_prediction and level > HISTORY_NOISE_MAX:
        warnings.warn(f"policy: video stopped at step {cfg.video_exec_step} of {cfg.video_steps} (shift {cfg.shift}) "
                      f"leaves the imagined history at noise level {level:.2f}; training re-noised history to at "
                      f"most {HISTORY_NOISE_MAX} (unless finetune.chunk_noise_p was set)", stacklevel=3)


class Policy:
    """A loaded bundle: the world model, the VAE, normalisation and task embeddings. Sessions share it.

    `dtype` ("fp32", "bf16", "auto": `policy_dtype`): the world model's weights; in bf16 every step
    also runs under bf16 autocast (the inputs, the sampler's state and the VAE stay fp32)."""

    def __init__(self, path: Path, device: str = "cpu", overrides: dict | None = None, dtype: str = "fp32"):
        from safetensors.torch import load_file

        from lingbot.hardware import torch_dtype
        from lingbot.vae.wan import load_vae

        self.path = Path(path)
        self.meta = read_bundle(self.path)
        self.cfg = override(PolicyConfig(), {**self.meta["policy"], **(overrides or {})})
        if not 1 <= self.cfg.video_exec_step <= self.cfg.video_steps:
            raise LingbotError(f"policy: video_exec_step must be in 1..video_steps ({self.cfg.video_steps})")
        model_cfg = self.meta["model_config"]
        if self.cfg.asynchronous and (model_cfg.attention != "causal" or not model_cfg.video_prediction):
            raise LingbotError("policy: asynchronous mode needs a causal model that imagines video "
                               "(this bundle is one of the paper's ablations)")
        if not 0 <= self.cfg.imagined_noise < 1 or (self.cfg.imagined_noise
                                                    and self.cfg.video_exec_step < self.cfg.video_steps):
            raise LingbotError("policy: imagined_noise must be in [0, 1) and needs the video denoised in full "
                               f"(video_exec_step == video_steps), got {self.cfg.imagined_noise}")
        warn_untrained(model_cfg, self.cfg)
        self.device = torch.device(device)
        self.dtype = policy_dtype(dtype, self.device)
        self.cameras = list(self.meta["cameras"])
        self.K = int(self.meta["actions_per_chunk"])
        self.frame_stride = int(self.meta["frame_stride"])
        self.model = WorldModel(self.meta["model_config"], cameras=len(self.cameras), actions_per_chunk=self.K)
        state = load_file(str(self.path / "model.safetensors"))
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise LingbotError(f"{self.path / 'model.safetensors'}: weights do not fit the model "
                               f"(missing {missing[:1]}, unexpected {unexpected[:1]})")
        self.model.to(self.device, torch_dtype(self.dtype)).eval()
        self.vae = load_vae(self.path / "vae").to(self.device)
        norm = json.loads((self.path / "normalization.json").read_text())
        self.layout = ChannelLayout(norm["action"], int(self.meta["action_dim"]), self.model.cfg.action_channels)
        self.state_key = self.meta.get("state_key", "observation.state")
        self.state_layout = None  # models without a state input ignore the observation's state
        if self.model.cfg.state_channels:
            self.state_layout = ChannelLayout(norm["state"], len(norm["state"]["q01"]),
                                              self.model.cfg.state_channels, what="state")
        self.tasks = list(self.meta["tasks"])
        self.task_embeddings = load_file(str(self.path / "tasks.safetensors"))["embeddings"]

    def task_embedding(self, task: str) -> torch.Tensor:
        """(1, Lt, text_dim): from the bundle for a trained task, else from the bundle's text encoder."""
        if task in self.tasks:
            emb = self.task_embeddings[self.tasks.index(task)]
        else:
            from lingbot.data.text import embed_tasks

            emb = torch.from_numpy(embed_tasks(self.meta["text_encoder"], [task])[0])
        return emb[None].to(self.device)

    def new_session(self, task: str | None = None, seed: int | None = None) -> Session:
        return Session(self, task or self.tasks[0], self.cfg.seed if seed is None else seed)

    def autocast(self):
        """The context every world-model call of this policy runs in (autocast is per thread: the
        asynchronous session's worker enters it too)."""
        from lingbot.hardware import autocast

        return autocast(self.device, self.dtype)


def load_policy(path: str | Path, device: str = "cpu", dtype: str = "fp32", **overrides) -> Policy:
    """Load a policy bundle (see lingbot/policy/bundle.py) on `device` with the world model in `dtype`
    (`policy_dtype`); `overrides` change PolicyConfig fields."""
    return Policy(Path(path), device, overrides, dtype)
