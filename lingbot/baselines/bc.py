"""The plain image behaviour-cloning baseline: the yardstick a target task must not already fall to.

A standard visuomotor BC policy, no world model: per camera a small conv net (GroupNorm, ReLU) ending in
spatial-softmax keypoints, the robot state, and an MLP regressing the next K actions (action chunking,
executed open loop like the world model's chunks) under an L1 loss, in the same quantile normalisation
the world model uses. Random-shift augmentation, AdamW, cosine decay. It is trained on exactly the demos
the world model is fine-tuned on (the latent cache's train episodes of the fine-tuning tasks, same cap),
whose frames come from the ingested LeRobot dataset, and rolled out by `lingbot.sim.evaluate` on the
same held-out seeds through the same session interface: the `bc` stage of baselines/dvc.yaml.

Saved as `bc.safetensors` + `bc.json` (config, cameras, keys, normalisation): no pickles.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lingbot.config import BCConfig
from lingbot.errors import LingbotError
from lingbot.fsutil import atomic_dir
from lingbot.model.keypoints import SpatialSoftmax
from lingbot.train.schedule import lr_factor


def _conv_encoder(width: int) -> nn.Sequential:
    layers, c_in = [], 3
    for c_out, stride in ((width, 1), (2 * width, 2), (2 * width, 1), (4 * width, 2), (4 * width, 1)):
        layers += [nn.Conv2d(c_in, c_out, 3, stride, 1), nn.GroupNorm(8, c_out), nn.ReLU()]
        c_in = c_out
    return nn.Sequential(*layers, SpatialSoftmax())


class ImageBC(nn.Module):
    """Images (B, cams, 3, H, W) in [-1, 1] + state (B, S) normalised -> actions (B, K, A) normalised."""

    def __init__(self, cameras: int, state_dim: int, action_dim: int, cfg: BCConfig):
        super().__init__()
        self.chunk, self.action_dim = cfg.chunk, action_dim
        self.encoders = nn.ModuleList(_conv_encoder(cfg.width) for _ in range(cameras))
        features = cameras * 8 * cfg.width + state_dim
        self.head = nn.Sequential(nn.Linear(features, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, cfg.hidden),
                                  nn.ReLU(), nn.Linear(cfg.hidden, cfg.chunk * action_dim))

    def forward(self, images: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        features = [enc(images[:, i]) for i, enc in enumerate(self.encoders)]
        return self.head(torch.cat(features + [state], dim=1)).view(-1, self.chunk, self.action_dim)


def _layout(stats: dict, what: str):
    from lingbot.data.normalization import ChannelLayout

    dim = len(stats["q01"])
    return ChannelLayout(stats, dim, dim, what)


def load_demos(demos: Path, cache: Path, train_cfg, chunk: int = BCConfig.chunk, frames=None) -> dict:
    """The fine-tuning episodes of `train_cfg` (selected in the latent cache) as BC samples, in memory.
    `frames`: a callable (layout, cameras, episodes) -> clips in place of `lingbot.vae.fit.load_frames`.

    images (N, cams, H, W, 3) uint8, state (N, S) and actions (N, chunk, A) normalised (the last action
    of an episode repeated past its end), plus the cameras, keys and stats the policy needs.
    """
    from lingbot.data.latents import open_manifest
    from lingbot.data.lerobot_io import read_state_action
    from lingbot.train.loop import select_episodes
    from lingbot.vae.fit import load_frames, read_demos

    manifest, _, layout = read_demos(demos)
    episodes = select_episodes(open_manifest(Path(cache)), train_cfg)
    keys = manifest["keys"]
    stats = json.loads((Path(demos) / "stats.json").read_text())
    episode_index, states, actions = read_state_action(layout, keys["state"], keys["action"])
    cameras = list(keys["cameras"])
    clips = (frames or load_frames)(layout, cameras, episodes)  # camera-major: clips[c * len(episodes) + i]
    state_layout = _layout(stats[keys["state"]], "state")
    action_layout = _layout(stats[keys["action"]], "action")
    images, state_rows, action_rows = [], [], []
    for i, ep in enumerate(episodes):
        rows = np.flatnonzero(episode_index == ep)
        frames = [clips[c * len(episodes) + i] for c in range(len(cameras))]
        n = min(len(rows), *(len(f) for f in frames))
        if n == 0:
            raise LingbotError(f"{demos}: episode {ep} has no frames")
        images.append(np.stack([f[:n] for f in frames], axis=1))
        state_rows.append(state_layout.to_model(states[rows[:n]]))
        ep_actions = action_layout.to_model(actions[rows[:n]])
        ahead = np.minimum(np.arange(n)[:, None] + np.arange(chunk)[None], n - 1)
        action_rows.append(ep_actions[ahead])
    return {"images": np.concatenate(images), "state": np.concatenate(state_rows),
            "actions": np.concatenate(action_rows), "episodes": episodes, "cameras": cameras,
            "state_key": keys["state"], "fps": manifest["fps"],
            "stats": {"state": stats[keys["state"]], "action": stats[keys["action"]]}}


def random_shift(images: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """(B, cams, 3, H, W): each image replicate-padded by `pad` and cropped back at a random offset."""
    if pad == 0:
        return images
    b, c, ch, h, w = images.shape
    padded = F.pad(images.flatten(0, 1), (pad,) * 4, mode="replicate")
    dx = torch.randint(0, 2 * pad + 1, (b * c,), generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (b * c,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(-1, ch, -1, w + 2 * pad)
    cropped = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(-1, ch, h, -1)
    return cropped.gather(3, cols).view(b, c, ch, h, w)


def train_bc(data: dict, cfg: BCConfig, progress: bool = True, device: str = "cpu") -> tuple[ImageBC, list[float], float]:
    """Fit the baseline on `data` (load_demos) on `device` (the samples stay in host memory, each batch
    is moved); returns the model (on the CPU), the loss per step and the seconds."""
    from lingbot.progress import progress_bar

    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    images = torch.from_numpy(data["images"]).permute(0, 1, 4, 2, 3)  # (N, cams, 3, H, W) uint8
    state = torch.from_numpy(data["state"])
    actions = torch.from_numpy(data["actions"])
    if actions.shape[1] != cfg.chunk:
        raise LingbotError(f"bc: samples hold chunks of {actions.shape[1]} actions, the config predicts {cfg.chunk}")
    model = ImageBC(images.shape[1], state.shape[1], actions.shape[2], cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.steps, decay_from_start=True))
    losses, start = [], time.perf_counter()
    model.train()
    for _ in progress_bar(progress, iterable=range(cfg.steps), desc="bc"):
        rows = torch.randint(0, len(images), (cfg.batch_size,), generator=generator)
        batch = random_shift(images[rows].float().div(127.5).sub(1.0), cfg.shift, generator).to(device)
        loss = F.l1_loss(model(batch, state[rows].to(device)), actions[rows].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    return model.cpu().eval(), losses, time.perf_counter() - start


def save_bc(model: ImageBC, data: dict, cfg: BCConfig, out: Path) -> None:
    from safetensors.torch import save_file

    meta = {"format": "lingbot-bc/1", "config": asdict(cfg), "cameras": data["cameras"],
            "state_key": data["state_key"], "state_dim": int(data["state"].shape[1]),
            "action_dim": int(data["actions"].shape[2]), "image_size": list(data["images"].shape[2:4]),
            "fps": data["fps"], "stats": data["stats"]}
    with atomic_dir(Path(out)) as tmp:
        tmp.mkdir()
        save_file(model.state_dict(), str(tmp / "bc.safetensors"))
        (tmp / "bc.json").write_text(json.dumps(meta, indent=2))


class BCPolicy:
    """A saved baseline, with the session interface `lingbot.sim.evaluate` rolls out."""

    def __init__(self, path: Path):
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / "bc.json").is_file():
            raise LingbotError(f"{path / 'bc.json'}: missing; not a BC baseline directory")
        self.meta = json.loads((path / "bc.json").read_text())
        cfg = BCConfig(**self.meta["config"])
        self.cameras, self.state_key = list(self.meta["cameras"]), self.meta["state_key"]
        self.model = ImageBC(len(self.cameras), self.meta["state_dim"], self.meta["action_dim"], cfg)
        self.model.load_state_dict(load_file(str(path / "bc.safetensors")))
        self.model.eval()
        self.state_layout = _layout(self.meta["stats"]["state"], "state")
        self.action_layout = _layout(self.meta["stats"]["action"], "action")

    def new_session(self, task: str | None = None, seed: int | None = None) -> "BCSession":
        return BCSession(self)


def load_bc(path: str | Path) -> BCPolicy:
    return BCPolicy(Path(path))


class BCSession:
    """Per chunk: the boundary observation in, K actions out (robot units); frames in between unused."""

    def __init__(self, policy: BCPolicy):
        self.policy = policy
        self.latency_ms: list[float] = []

    def observe(self, observation: dict) -> None:
        pass

    def infer(self, observation: dict) -> np.ndarray:
        from lingbot.policy.observation import observation_pixels, observation_state

        start = time.perf_counter()
        p = self.policy
        images = observation_pixels(observation, p.cameras)[None]  # (1, cams, 3, H, W)
        state = p.state_layout.to_model(observation_state(observation, p.state_key, p.meta["state_dim"]))
        with torch.no_grad():
            out = p.model(images, torch.from_numpy(state))[0].numpy()
        self.latency_ms.append((time.perf_counter() - start) * 1000)
        return p.action_layout.to_robot(out)

    def close(self) -> None:
        pass
