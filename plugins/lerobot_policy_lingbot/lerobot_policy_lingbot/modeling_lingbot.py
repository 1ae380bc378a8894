"""`LingbotPolicy`: LeRobot's policy contract over lingbot's real-time sessions (lingbot/policy/session.py).

LeRobot drives a policy with batched tensors, one row per env: images float in [0, 1], channel first,
under LeRobot's keys. A lingbot session serves one robot: uint8 (H, W, 3) frames under the bundle's
camera keys in, actions in robot units out, its own KV cache. This class only converts between the
two: rows -> sessions (one per env, opened at the first step after `reset`), LeRobot keys -> bundle
cameras (`camera_map`, resized to the bundle's image size), float -> uint8, and the sessions' actions
back to one tensor. The model, its normalisation and the chunking are the session's.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from lerobot.configs import PreTrainedConfig
from lerobot.policies.pretrained import PreTrainedPolicy
from lerobot.utils.constants import ACTION, OBS_STATE
from torch import Tensor

from lerobot_policy_lingbot.configuration_lingbot import LingbotConfig
from lingbot.errors import LingbotError


def resolve_bundle(spec: str) -> Path:
    """The bundle directory `spec` names. A release is pulled (verified) by `lingbot pull` first."""
    if not spec:
        raise LingbotError("lingbot policy: no bundle; pass --policy.bundle=DIR (a lingbot policy bundle)")
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise LingbotError(f"lingbot policy: bundle {spec!r} is not a directory (for a release, "
                           "`lingbot pull ORG/NAME@TAG --dir DIR` first, then --policy.bundle=DIR)")
    return path


def to_uint8_frames(images: Tensor, size: tuple[int, int]) -> np.ndarray:
    """LeRobot images (B, 3, H, W) or (3, H, W), float in [0, 1] (or uint8) -> uint8 (B, h, w, 3)."""
    x = torch.as_tensor(images)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[1] != 3:
        raise LingbotError(f"expected channel-first RGB images (B, 3, H, W), got {tuple(x.shape)}")
    x = x.float() if x.dtype == torch.uint8 else x.float() * 255  # (B, 3, H, W) in 0..255
    if tuple(x.shape[-2:]) != size:
        # Area averaging when shrinking (no aliasing; exact block means for integer factors).
        shrink = x.shape[-2] >= size[0] and x.shape[-1] >= size[1]
        x = F.interpolate(x, size=size, mode="area") if shrink else \
            F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()  # (B, h, w, 3)


@contextlib.contextmanager
def outside_inference_mode():
    """Sessions run without grad and outside inference mode, whatever the caller's mode.

    LeRobot's loops call the policy under torch.inference_mode; a tensor made there cannot be updated
    in place outside it, and a session's KV cache is updated in place by later calls and, in
    asynchronous mode, by its worker thread (which never is in inference mode).
    """
    with torch.inference_mode(False), torch.no_grad():  # inference_mode(False) alone turns grad back on
        yield


class LingbotPolicy(PreTrainedPolicy):
    config_class = LingbotConfig
    name = "lingbot"

    def __init__(self, config: LingbotConfig, **kwargs):
        from lingbot.policy.runtime import load_policy

        super().__init__(config)
        config.validate_features()
        # The lingbot policy (world model, VAE) stays outside the nn.Module registry: its weights are
        # the bundle's, never written into a LeRobot checkpoint, and `.to()` does not move them.
        self.runtime = load_policy(resolve_bundle(config.bundle), device=config.device,
                                   **config.policy_overrides())
        self._check_against_bundle(config)
        self.sessions: list = []  # one lingbot Session per env row of the batch
        self._episode_open = False
        self._held: np.ndarray | None = None  # the actions being held (env_fps above the bundle's fps)
        self._held_steps = 0  # env steps they have been held

    def _check_against_bundle(self, config: LingbotConfig) -> None:
        from lingbot.sim.lerobot_env import held_steps

        rt = self.runtime
        if config.chunk_size is None:
            config.chunk_size = rt.K
        elif config.chunk_size != rt.K:
            raise LingbotError(f"lingbot policy: chunk_size {config.chunk_size}, but the bundle acts in chunks "
                               f"of {rt.K} actions")
        action = (config.output_features or {}).get(ACTION)
        if action is not None and tuple(action.shape)[-1:] != (rt.layout.robot_dim,):
            raise LingbotError(f"lingbot policy: the env/dataset action has shape {tuple(action.shape)}, the "
                               f"bundle's robot has {rt.layout.robot_dim} action channels")
        self.hold = 1 if config.env_fps is None else held_steps(config.env_fps, int(rt.meta["fps"]),
                                                                 "lingbot policy: env_fps: the env")
        unknown = sorted(set(config.camera_map) - set(rt.cameras))
        if unknown:
            raise LingbotError(f"lingbot policy: camera_map names {', '.join(unknown)}, not a camera of the bundle "
                               f"({', '.join(rt.cameras)})")
        images = set(config.image_features)
        if images:
            unmapped = [cam for cam in rt.cameras if config.camera_source(cam) not in images]
            if unmapped:
                raise LingbotError(
                    f"lingbot policy: no image input for bundle camera(s) {', '.join(unmapped)} (image inputs: "
                    f"{', '.join(sorted(images))}); map them, e.g. --policy.camera_map="
                    f"'{{\"{unmapped[0]}\": \"{sorted(images)[0]}\"}}'")

    # -- LeRobot's policy contract ---------------------------------------------------------------

    def reset(self) -> None:
        """A new episode: every env's session restarts (cache, frames, chunk count) at the next step."""
        self._episode_open = False
        self._held = None

    def select_action(self, batch: dict[str, Tensor], **kwargs) -> Tensor:
        """One action per env, (B, action_dim) in robot units; a new chunk every chunk_size bundle steps,
        each bundle action held for env_fps / fps env steps (the frames in between are not read)."""
        if self._held is None or self._held_steps == self.hold:
            with outside_inference_mode():
                frames = self._frames(batch)
                sessions = self._sessions(batch, len(frames))
                self._held = np.stack([s.select_action(f) for s, f in zip(sessions, frames)])
            self._held_steps = 0
        self._held_steps += 1
        return torch.from_numpy(self._held.copy()).to(self.config.device)  # a held action may be reused

    def predict_action_chunk(self, batch: dict[str, Tensor], **kwargs) -> Tensor:
        """The next chunk per env, (B, chunk_size, action_dim) in robot units, one action per bundle step
        (each to be held for env_fps / fps env steps).

        The batch is a chunk boundary: the caller executes the whole chunk, then asks again with the
        frame that ends it (the session writes the executed chunk into its cache as it was returned).
        """
        with outside_inference_mode():
            frames = self._frames(batch)
            chunks = []
            for session, frame in zip(self._sessions(batch, len(frames)), frames):
                session.queue.clear()  # whatever select_action had queued is superseded
                chunks.append(session.infer(frame))
        return torch.from_numpy(np.stack(chunks)).to(self.config.device)

    def forward(self, batch: dict[str, Tensor]):
        raise NotImplementedError("lingbot policies are trained with lingbot (dvc repro finetune), not lerobot-train")

    def get_optim_params(self) -> dict:
        raise NotImplementedError("lingbot policies are trained with lingbot (dvc repro finetune), not lerobot-train")

    # -- LeRobot checkpoints: a config.json that points at the bundle ------------------------------

    def _save_pretrained(self, save_directory: Path, state_dict=None) -> None:
        """Only config.json: the weights stay in the bundle. With bundle "" the directory is the bundle."""
        self.config._save_pretrained(save_directory)

    @classmethod
    def from_pretrained(cls, pretrained_name_or_path, *, config: PreTrainedConfig | None = None, **kwargs):
        """`--policy.path=DIR`: DIR's config.json; its bundle, or DIR itself when that is empty."""
        if config is None:
            config = PreTrainedConfig.from_pretrained(pretrained_name_or_path, **kwargs)
        if not config.bundle:
            config.bundle = str(pretrained_name_or_path)
        policy = cls(config)
        policy.eval()
        return policy

    # -- glue --------------------------------------------------------------------------------------

    def _frames(self, batch: dict) -> list[dict[str, np.ndarray]]:
        """One {bundle camera: uint8 (H, W, 3), bundle state key: (S,)} per env row of the batch."""
        rt = self.runtime
        size = tuple(int(v) for v in rt.meta["image_size"])
        per_camera = {}
        for camera in rt.cameras:
            key = self.config.camera_source(camera)
            if key not in batch:
                images = sorted(k for k in batch if k.startswith("observation.image"))
                raise LingbotError(f"lingbot policy: the observation has no {key!r} for bundle camera {camera!r} "
                                   f"(images: {', '.join(images) or 'none'}); set --policy.camera_map")
            per_camera[camera] = to_uint8_frames(batch[key], size)
        if rt.state_layout is not None:  # LeRobot's robot state, under the key the bundle was trained with
            if OBS_STATE not in batch:
                raise LingbotError(f"lingbot policy: the observation has no {OBS_STATE!r} (the bundle's model "
                                   f"takes the robot state: {rt.state_layout.robot_dim} values)")
            per_camera[rt.state_key] = batch[OBS_STATE].detach().float().cpu().numpy()
        rows = {len(v) for v in per_camera.values()}
        if len(rows) != 1:
            raise LingbotError(f"lingbot policy: cameras and state disagree on the batch size ({sorted(rows)})")
        return [{camera: images[i] for camera, images in per_camera.items()} for i in range(rows.pop())]

    def _tasks(self, batch: dict, n: int) -> list[str]:
        if self.config.task:
            return [self.config.task] * n
        given = batch.get("task")
        given = [given] * n if isinstance(given, str) else list(given) if given is not None else [""] * n
        if len(given) != n:
            raise LingbotError(f"lingbot policy: {len(given)} tasks for a batch of {n}")
        return [task or self.runtime.tasks[0] for task in given]

    def _sessions(self, batch: dict, n: int) -> list:
        """The sessions of the open episode; the first step after `reset` (re)starts one per env."""
        if self._episode_open:
            if n != len(self.sessions):
                raise LingbotError(f"lingbot policy: batch of {n} envs in an episode of {len(self.sessions)}; "
                                   "call reset() between episodes")
            return self.sessions
        tasks = self._tasks(batch, n)
        if len(self.sessions) == n:
            for session, task in zip(self.sessions, tasks):
                session.reset(task)
        else:
            for session in self.sessions:
                session.close()
            seed = self.runtime.cfg.seed
            self.sessions = [self.runtime.new_session(task, seed=seed + i) for i, task in enumerate(tasks)]
        self._episode_open = True
        return self.sessions
