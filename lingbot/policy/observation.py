"""A robot observation (a dict of LeRobot keys) read into what a policy consumes: camera images as
pixels, the robot state as a float vector; a missing or malformed entry is one clear error."""

from __future__ import annotations

import numpy as np
import torch

from lingbot.errors import LingbotError


def observation_entry(observation: dict, key: str):
    """observation[key]; a missing key is an error that lists the keys there are."""
    if key not in observation:
        raise LingbotError(f"observation has no {key!r} (keys: {', '.join(sorted(observation))})")
    return observation[key]


def observation_pixels(observation: dict, cameras: list[str]) -> torch.Tensor:
    """(cameras, 3, H, W) in [-1, 1] from an observation's uint8 camera images; a missing or malformed
    one is one error."""
    from lingbot.vae.wan import to_pixels

    images = []
    for key in cameras:
        image = np.asarray(observation_entry(observation, key))
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise LingbotError(f"observation {key!r}: expected uint8 (H, W, 3), got {image.dtype} {image.shape}")
        images.append(image)
    return to_pixels(np.stack(images)[:, None])[:, :, 0]


def observation_state(observation: dict, key: str, dim: int) -> np.ndarray:
    """(1, dim) float32 robot state of an observation; missing, short or non-finite is one error."""
    entry = observation_entry(observation, key)
    try:
        state = np.asarray(entry, np.float32).reshape(1, -1)
    except (TypeError, ValueError):
        raise LingbotError(f"observation {key!r}: expected a float vector ({dim},)") from None
    if state.shape[1] != dim or not np.isfinite(state).all():
        raise LingbotError(f"observation {key!r}: expected {dim} finite values, got {state.shape[1]}")
    return state
