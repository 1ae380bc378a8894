"""The causal video VAE (diffusers' AutoencoderKLWan) and its streaming, frame-by-frame encoder.

Wan's VAE is causal in time: the first frame is encoded alone, then each group of 4 frames becomes one
latent frame (4x temporal compression), every temporal convolution reading a cache of the previous
group's last frames. Encoding a clip of 1 + 4k frames gives 1 + k latent frames.

Pixels are float in [-1, 1], layout (B, C, T, H, W). Latents are the posterior mean, normalised per
channel with `latents_mean` / `latents_std` from the VAE's own config (measured on the training
latents by `fit_vae` and saved with the weights), so one directory carries everything needed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lingbot.config import VAEConfig
from lingbot.errors import LingbotError

TEMPORAL_GROUP = 4  # frames per latent frame after the first


def build_vae(cfg: VAEConfig):
    """A freshly initialised small AutoencoderKLWan (seeded), for training on the demo frames."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(cfg.seed)
    downsamples = len(cfg.dim_mult) - 1
    if downsamples < 2:
        raise LingbotError(f"vae.dim_mult {list(cfg.dim_mult)}: needs >= 3 levels (two temporal downsamples: 4x in time)")
    if cfg.residual and cfg.dim_mult[-1] != cfg.dim_mult[-2]:
        raise LingbotError(f"vae.dim_mult {list(cfg.dim_mult)}: residual blocks need the last two levels equal")
    patch = cfg.patch_size if cfg.patch_size > 1 else None
    channels = 3 * (patch or 1) ** 2
    return AutoencoderKLWan(
        base_dim=cfg.base_dim,
        z_dim=cfg.z_dim,
        dim_mult=list(cfg.dim_mult),
        num_res_blocks=cfg.num_res_blocks,
        attn_scales=[],
        temperal_downsample=[False] * (downsamples - 2) + [True, True],  # the deepest two: 4x in time
        is_residual=cfg.residual,
        in_channels=channels,
        out_channels=channels,
        patch_size=patch,
        scale_factor_spatial=spatial_ratio({"dim_mult": cfg.dim_mult, "patch_size": patch}),
        latents_mean=[0.0] * cfg.z_dim,
        latents_std=[1.0] * cfg.z_dim,
    )


def load_vae(source: str | Path, subfolder: str = ""):
    """Load an AutoencoderKLWan from a local diffusers directory or a Hub repo `org/name[@revision]`.

    Weights load from safetensors only (never a pickle).
    """
    from diffusers import AutoencoderKLWan

    source = str(source)
    local = Path(source).expanduser()
    kwargs = {"use_safetensors": True}
    if subfolder:
        kwargs["subfolder"] = subfolder
    try:
        if local.exists():
            return AutoencoderKLWan.from_pretrained(str(local), **kwargs).eval()
        repo_id, _, revision = source.partition("@")
        return AutoencoderKLWan.from_pretrained(repo_id, revision=revision or None, **kwargs).eval()
    except (OSError, ValueError, EnvironmentError) as exc:
        raise LingbotError(f"{source}: cannot load the VAE ({str(exc).splitlines()[0]})") from None


def spatial_ratio(config) -> int:
    """Pixels per latent cell along each side, from a VAE config (`vae.config` or its config.json)."""
    return 2 ** (len(config["dim_mult"]) - 1) * (config.get("patch_size") or 1)


def latent_stats(vae) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) per latent channel, shaped (1, z, 1, 1, 1) for broadcasting over (B, z, T, h, w)."""
    mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)
    return mean, std


def to_pixels(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 (or (B, T, H, W, 3)) -> float (B, 3, T, H, W) in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(frames))
    if x.ndim == 4:
        x = x.unsqueeze(0)
    return x.permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)


def usable_frames(n: int) -> int:
    """Frames of an n-frame clip that the VAE consumes: 1 + 4k (the last partial group is dropped)."""
    return 0 if n < 1 else 1 + TEMPORAL_GROUP * ((n - 1) // TEMPORAL_GROUP)


@torch.no_grad()
def encode_clip(vae, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """(B, 3, T, H, W) with T = 1 + 4k -> posterior-mean latents (B, z, 1 + k, h, w)."""
    if (pixels.shape[2] - 1) % TEMPORAL_GROUP:
        raise ValueError(f"clip of {pixels.shape[2]} frames: the causal VAE takes 1 + 4k frames")
    mu = vae.encode(pixels).latent_dist.mean
    if normalize:
        mean, std = latent_stats(vae)
        mu = (mu - mean.to(mu)) / std.to(mu)
    return mu


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> np.ndarray:
    """Normalised latents (B, z, T, h, w) -> uint8 frames (B, 1 + 4(T-1), H, W, 3)."""
    mean, std = latent_stats(vae)
    pixels = vae.decode(latents * std.to(latents) + mean.to(latents)).sample
    return ((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 4, 1).cpu().numpy()


class StreamingEncoder:
    """Encode a video one frame at a time, keeping the VAE's causal convolution cache between calls.

    `push(frame)` returns the latent frame as soon as its group is complete: after the first frame, then
    after every 4th frame; otherwise None. The result equals `encode_clip` on the whole clip (the
    same convolutions over the same cached context), which the tests check to 1e-4.
    """

    def __init__(self, vae, normalize: bool = True):
        from diffusers.models.autoencoders.autoencoder_kl_wan import patchify

        self.vae = vae
        self.normalize = normalize
        self._patchify = patchify
        self.reset()

    def reset(self) -> None:
        self._stats = None  # (mean, std) on the frames' device, copied there once
        self._cache = [None] * self.vae._cached_conv_counts["encoder"]
        self._pending: list[torch.Tensor] = []
        self.frames_seen = 0

    @torch.no_grad()
    def push(self, frame: torch.Tensor) -> torch.Tensor | None:
        """frame: (B, 3, H, W) in [-1, 1]. Returns (B, z, h, w) latents or None."""
        self._pending.append(frame)
        self.frames_seen += 1
        group = 1 if self.frames_seen == 1 else TEMPORAL_GROUP
        if len(self._pending) < group:
            return None
        x = torch.stack(self._pending, dim=2)  # (B, 3, group, H, W)
        self._pending = []
        if self.vae.config.patch_size is not None:
            x = self._patchify(x, patch_size=self.vae.config.patch_size)
        out = self.vae.encoder(x, feat_cache=self._cache, feat_idx=[0])
        mu, _ = self.vae.quant_conv(out).chunk(2, dim=1)  # quant_conv is 1x1x1: no temporal context
        if self.normalize:
            if self._stats is None or self._stats[0].device != mu.device:
                self._stats = tuple(t.to(mu) for t in latent_stats(self.vae))
            mean, std = self._stats
            mu = (mu - mean) / std
        return mu[:, :, -1]
