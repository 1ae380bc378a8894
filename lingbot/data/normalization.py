"""Quantile normalisation, the one implementation: training's latent windows, the policy's action and
state channels and the BC baseline all map robot units to the model's -1..1 here.

Per channel, the dataset's q01 maps to -1 and q99 to 1 (LingBot-VA's normalisation; `stats.json` of
ingest holds the quantiles); a channel whose quantiles coincide gets a span of `MIN_SPAN`. The same
expression serves torch tensors (training) and numpy arrays (the policy), with the quantiles in the
input's dtype, so both give the same floats.
"""

from __future__ import annotations

import numpy as np
import torch

from lingbot.errors import LingbotError

MIN_SPAN = 1e-6


def _quantiles(stats: dict, like):
    """(q01, q99 - q01 floored at MIN_SPAN) per channel, as `like`'s array type, dtype and device."""
    if isinstance(like, torch.Tensor):
        lo = torch.tensor(stats["q01"], dtype=like.dtype, device=like.device)
        hi = torch.tensor(stats["q99"], dtype=like.dtype, device=like.device)
        return lo, (hi - lo).clamp_min(MIN_SPAN)
    lo = np.asarray(stats["q01"], like.dtype)
    return lo, np.maximum(np.asarray(stats["q99"], like.dtype) - lo, MIN_SPAN)


def normalize(x, stats: dict):
    """Robot units -> normalised (q01..q99 -> -1..1) over the last axis; a tensor or an array."""
    lo, span = _quantiles(stats, x)
    return 2 * (x - lo) / span - 1


def unnormalize(x, stats: dict):
    """Normalised -> robot units, the inverse of `normalize`."""
    lo, span = _quantiles(stats, x)
    return (x + 1) / 2 * span + lo


class ChannelLayout:
    """The model's action (or state) channels <-> the robot's action (or state) vector, explicitly.

    The model predicts (K, A_model) per chunk: row i is action step i of the chunk (time major), columns
    0..robot_dim-1 are the robot's channels in the dataset's feature order, quantile-normalised to
    -1..1; the remaining channels are unused padding. `to_robot` keeps the time order of the rows: the
    first row is executed first. The robot state enters the model the same way (`to_model`).
    """

    def __init__(self, stats: dict, robot_dim: int, model_channels: int, what: str = "action"):
        if robot_dim > model_channels:
            raise LingbotError(f"robot {what} has {robot_dim} channels, the model only {model_channels}")
        channels = len(stats["q01"])
        if channels != robot_dim:
            raise LingbotError(f"normalization stats have {channels} {what} channels, expected {robot_dim}")
        self.stats = stats
        self.robot_dim, self.model_channels, self.what = robot_dim, model_channels, what
        # What the model may output: the normalised image of the data's [min, max] (q01/q99 map to
        # -1..1, so the top and bottom 1% of a channel lie beyond them); [-1, 1] for stats without min/max.
        low = normalize(np.asarray(stats["min"], np.float32), stats) if "min" in stats else -np.ones(robot_dim)
        high = normalize(np.asarray(stats["max"], np.float32), stats) if "max" in stats else np.ones(robot_dim)
        self.bounds = tuple(np.pad(np.minimum(b, -1) if i == 0 else np.maximum(b, 1), (0, model_channels - robot_dim),
                                   constant_values=0.0).astype(np.float32) for i, b in enumerate((low, high)))

    def clip(self, model_actions: torch.Tensor) -> torch.Tensor:
        """(K, A_model) model-space actions clipped to the data's range (`bounds`), on their device."""
        low, high = (torch.from_numpy(b).to(model_actions.device, model_actions.dtype) for b in self.bounds)
        return torch.maximum(torch.minimum(model_actions, high), low)

    def to_robot(self, model_actions: np.ndarray) -> np.ndarray:
        """(K, A_model) normalised -> (K, robot_dim) in robot units."""
        return unnormalize(np.asarray(model_actions, np.float32)[:, : self.robot_dim], self.stats)

    def to_model(self, robot_actions: np.ndarray) -> np.ndarray:
        """(K, robot_dim) robot units -> (K, A_model) normalised, padding channels zero."""
        x = np.asarray(robot_actions, np.float32)
        if x.ndim != 2 or x.shape[1] != self.robot_dim:
            raise LingbotError(f"{self.what} of shape {x.shape}, expected (steps, {self.robot_dim})")
        out = np.zeros((len(x), self.model_channels), np.float32)
        out[:, : self.robot_dim] = normalize(x, self.stats)
        return out
