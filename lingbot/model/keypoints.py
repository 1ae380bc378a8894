"""Spatial-softmax keypoints: where in an image (or a latent frame) each feature channel peaks.

A conv stack ends in one softmax over the positions of each channel; the expected (x, y) under it is a
keypoint, a coordinate finer than the grid it is read from. Plain image BC reads pixels this way
(lingbot/baselines/bc.py); the world model reads the latent frame a chunk starts from
(`ModelConfig.keypoints`), where its 2x2 patch tokens place an object to one token, 16 pixels at 64x64.
"""

from __future__ import annotations

import torch
from torch import nn


class SpatialSoftmax(nn.Module):
    """(B, C, H, W) feature maps -> (B, 2C) expected x, y of each channel's softmax (keypoints)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        attn = x.flatten(2).softmax(-1).view(b, c, h, w)
        ys = torch.linspace(-1, 1, h, device=x.device, dtype=attn.dtype)
        xs = torch.linspace(-1, 1, w, device=x.device, dtype=attn.dtype)
        return torch.cat([(attn.sum(2) * xs).sum(-1), (attn.sum(3) * ys).sum(-1)], dim=1)


class LatentKeypoints(nn.Module):
    """Latent frames (..., cameras, z, h, w) -> (..., cameras * 2 * channels) keypoints: one conv stack
    shared by the cameras (3x3 convolutions at the latent's own resolution, GroupNorm, ReLU)."""

    def __init__(self, latent_channels: int, channels: int):
        super().__init__()
        groups = 8 if channels % 8 == 0 else 1
        self.net = nn.Sequential(
            nn.Conv2d(latent_channels, channels, 3, 1, 1), nn.GroupNorm(groups, channels), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, 1, 1), nn.GroupNorm(groups, channels), nn.ReLU(),
            SpatialSoftmax(),
        )

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        lead, (cams, z, h, w) = latent.shape[:-4], latent.shape[-4:]
        points = self.net(latent.reshape(-1, z, h, w))  # (N * cams, 2 * channels)
        return points.view(*lead, cams * points.shape[-1])
