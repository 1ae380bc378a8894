"""`LingbotConfig`: a released lingbot policy bundle as a LeRobot policy type ("lingbot").

The config only points at the bundle and says how LeRobot's observations reach it; the model, its
normalisation, cameras, image size and chunk size all live in the bundle (lingbot/policy/bundle.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lerobot.configs import NormalizationMode, PreTrainedConfig
from lerobot.utils.constants import ACTION

from lingbot.errors import LingbotError

# PolicyConfig fields (lingbot/config.py) a LeRobot user may override; None keeps the bundle's value.
POLICY_OPTIONS = ("video_steps", "video_exec_step", "action_steps", "history_chunks", "asynchronous", "seed")


@PreTrainedConfig.register_subclass("lingbot")
@dataclass
class LingbotConfig(PreTrainedConfig):
    # The policy bundle: a local directory (a release fetched by `lingbot pull ORG/NAME@TAG --dir DIR`,
    # or a training run's bundle). Empty when loaded with `--policy.path=DIR`: DIR is then the bundle.
    bundle: str = ""

    # Bundle camera key -> the LeRobot observation key it is read from, e.g.
    # {"observation.images.corner3": "observation.image"}. A camera not listed is read from the key of
    # the same name. One observation key may feed several bundle cameras. Images of another size than
    # the bundle's are resized (area when shrinking, bilinear when growing), whatever their aspect.
    camera_map: dict[str, str] = field(default_factory=dict)

    # The instruction. None: the observation's "task" (LeRobot envs and robots supply it), else the
    # bundle's first task. Strings the bundle was not trained on go through its text encoder.
    task: str | None = None

    # Actions per chunk: fixed by the bundle (the model was trained on it). None is filled in from the
    # bundle when the policy loads; any other value must equal it.
    chunk_size: int | None = None

    # The env's control rate in Hz. The bundle acts at its dataset's fps: in an env that steps faster (a
    # multiple of it), `select_action` holds each action for env_fps / fps steps and reads the frame at
    # the bundle's rate, as the data was recorded (LeRobot's MetaWorld steps at 80 Hz; lingbot's MetaWorld
    # data is 40 fps). None: one env step per bundle action.
    env_fps: int | None = None

    # Real-time options (lingbot PolicyConfig); None keeps the bundle's. Env i of a batch uses seed + i.
    video_steps: int | None = None
    video_exec_step: int | None = None
    action_steps: int | None = None
    history_chunks: int | None = None
    asynchronous: bool | None = None
    seed: int | None = None

    # Normalisation happens inside the bundle (quantile stats in normalization.json): LeRobot's
    # processors pass everything through.
    normalization_mapping: dict[str, NormalizationMode] = field(
        default_factory=lambda: {
            "VISUAL": NormalizationMode.IDENTITY,
            "STATE": NormalizationMode.IDENTITY,
            "ACTION": NormalizationMode.IDENTITY,
        }
    )

    def policy_overrides(self) -> dict:
        """The lingbot PolicyConfig overrides this config asks for."""
        return {name: getattr(self, name) for name in POLICY_OPTIONS if getattr(self, name) is not None}

    @property
    def n_action_steps(self) -> int | None:
        """A lingbot session executes whole chunks (it grounds the cache with all K executed actions)."""
        return self.chunk_size

    def camera_source(self, camera: str) -> str:
        return self.camera_map.get(camera, camera)

    def validate_features(self) -> None:
        """The env's/dataset's side; the bundle's side (cameras, action dim) is checked when it loads."""
        if self.output_features and ACTION not in self.output_features:
            raise LingbotError(f"lingbot policy: output features {sorted(self.output_features)} have no {ACTION!r}")

    # -- training presets: lingbot policies are trained by lingbot's own stages, not lerobot-train --

    def get_optimizer_preset(self):
        raise NotImplementedError("lingbot policies are trained with lingbot (dvc repro finetune), not lerobot-train")

    def get_scheduler_preset(self):
        return None

    @property
    def observation_delta_indices(self) -> None:
        return None

    @property
    def action_delta_indices(self) -> list | None:
        return None if self.chunk_size is None else list(range(self.chunk_size))

    @property
    def reward_delta_indices(self) -> None:
        return None

