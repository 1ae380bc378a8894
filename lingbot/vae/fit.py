"""Stage fit_vae: train the small causal VAE on demo frames (or take a pretrained one), score it on
held-out episodes (PSNR, SSIM), measure per-channel latent statistics, and save it in diffusers layout.

Output directory: `config.json` (with `latents_mean` / `latents_std`) + `diffusion_pytorch_model.safetensors`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lingbot.config import VAEConfig
from lingbot.data.lerobot_io import iter_episode_frames, open_layout
from lingbot.errors import LingbotError
from lingbot.fsutil import atomic_dir, atomic_file
from lingbot.train.schedule import lr_factor
from lingbot.vae.wan import build_vae, encode_clip, load_vae, to_pixels, usable_frames

EVAL_FRAMES = 17  # 1 + 4*4 frames scored per held-out episode and camera
STATS_CLIPS = 48  # training clips encoded to measure the latent normalisation
STATS_FRAMES = 8192  # ... and at most about this many frames (long episodes: fewer clips)
WARMUP_STEPS = 20  # the learning rate's linear ramp, under a cosine over all steps

logger = logging.getLogger("lingbot.vae")


def read_demos(demos: Path) -> tuple[dict, dict, object]:
    """(lingbot.json, split.json, dataset layout) of an ingest directory."""
    demos = Path(demos)
    for name in ("lingbot.json", "split.json"):
        if not (demos / name).is_file():
            raise LingbotError(f"{demos / name}: missing; run `lingbot ingest` first")
    manifest = json.loads((demos / "lingbot.json").read_text())
    split = json.loads((demos / "split.json").read_text())
    return manifest, split, open_layout(demos / "dataset")


def load_frames(layout, cameras: list[str], episodes: list[int]) -> list[np.ndarray]:
    """Every (T, H, W, 3) uint8 clip of `episodes` x `cameras`; a broken video is a one-line error."""
    clips = []
    for key in cameras:
        for ep, frames, error in iter_episode_frames(layout, key, episodes):
            if error:
                raise LingbotError(error)
            clips.append(frames)
    return clips


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = F.mse_loss(a, b).item()
    return float("inf") if mse == 0 else 10 * math.log10(4.0 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean SSIM (11x11 Gaussian window, sigma 1.5) of (N, C, H, W) images in [-1, 1]."""
    a, b = (a + 1) / 2, (b + 1) / 2
    coords = torch.arange(11, dtype=a.dtype) - 5
    g = torch.exp(-(coords**2) / (2 * 1.5**2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :]).expand(a.shape[1], 1, 11, 11)

    def blur(x):
        return F.conv2d(x, window, groups=a.shape[1])

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(s.mean())


def gradient_loss(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean L1 difference of the horizontal and vertical pixel differences of (B, 3, T, H, W) clips."""
    dx = (recon.diff(dim=-1) - x.diff(dim=-1)).abs().mean()
    dy = (recon.diff(dim=-2) - x.diff(dim=-2)).abs().mean()
    return dx + dy


FOREGROUND_SCALE = 0.2  # pixel difference (in -1..1 units, ~25/255) from the background that counts fully


def static_background(clips: list[np.ndarray], frames: int = 256) -> np.ndarray:
    """(H, W, 3) uint8: the per-pixel median of up to `frames` frames spread over one camera's clips."""
    offsets = np.cumsum([0] + [len(c) for c in clips])
    picks = np.unique(np.linspace(0, offsets[-1] - 1, frames).astype(int))
    clip_of = np.searchsorted(offsets, picks, side="right") - 1
    sample = np.stack([clips[c][i - offsets[c]] for c, i in zip(clip_of, picks)])
    return np.median(sample, axis=0).astype(np.uint8)


def foreground_weights(x: torch.Tensor, background: torch.Tensor, weight: float) -> torch.Tensor:
    """(B, 1, T, H, W) loss weights of clips x (B, 3, T, H, W) over their backgrounds (B, 3, H, W):
    1 on the background, rising to 1 + weight where a pixel differs by FOREGROUND_SCALE or more."""
    differs = (x - background.unsqueeze(2)).abs().amax(dim=1, keepdim=True)
    return 1 + weight * (differs / FOREGROUND_SCALE).clamp(max=1)


def _sample_batch(clips: list[np.ndarray], cfg: VAEConfig, rng: np.random.Generator) -> tuple[torch.Tensor, list[int]]:
    batch, picked = [], []
    for _ in range(cfg.batch_size):
        picked.append(int(rng.integers(len(clips))))
        clip = clips[picked[-1]]
        start = rng.integers(0, len(clip) - cfg.clip_frames + 1)
        batch.append(clip[start : start + cfg.clip_frames])
    return to_pixels(np.stack(batch)), picked


def kl_per_element(posterior) -> torch.Tensor:
    """KL(q(z|x) || N(0, 1)) per latent element, averaged over every element of the batch. diffusers'
    `kl()` sums dims 1-3 only (of a 5-D video latent: channels, frames, rows), which scaled by the pixel
    count left the term ~1e-12 per element; `vae.kl_weight` weighs this mean against the reconstruction
    error per pixel, as it says."""
    mean, logvar = posterior.mean.float(), posterior.logvar.float()
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()


def train(vae, clips: list[np.ndarray], cfg: VAEConfig, progress: bool = True,
          backgrounds: list[np.ndarray] | None = None, precision: str = "fp32") -> list[dict]:
    """Reconstruction (MSE + L1, + image-gradient L1 if `grad_weight`, foreground pixels weighted by
    `foreground_weight` over `backgrounds`, one per clip) + KL (+ `align_weight` x the latents' alignment
    to a pretrained image encoder's features: lingbot/vae/teacher.py) on random clips; AdamW with cosine decay.
    `precision` (resolved: "fp32" or "bf16") is the forward's arithmetic. Returns the loss log."""
    from lingbot.hardware import autocast as precision_autocast
    from lingbot.progress import progress_bar

    if cfg.foreground_weight and (backgrounds is None or len(backgrounds) != len(clips)):
        raise ValueError("fit_vae: foreground_weight needs one background per clip")
    if backgrounds is not None:
        backgrounds = [b for b, c in zip(backgrounds, clips) if len(c) >= cfg.clip_frames]
    clips = [c for c in clips if len(c) >= cfg.clip_frames]
    if not clips:
        raise LingbotError(f"fit_vae: no training episode has {cfg.clip_frames} frames")
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = vae.device
    params = list(vae.parameters())
    if cfg.align_weight:
        from lingbot.vae.teacher import FEATURE_CHANNELS, alignment_loss

        # trained with the VAE, then dropped: only the encoder's latents are shaped by it
        projection = torch.nn.Conv2d(cfg.z_dim, FEATURE_CHANNELS, 1).to(device)
        params += list(projection.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, cfg.steps, WARMUP_STEPS, decay_from_start=True))
    # bf16 autocast where it is native: 1.2x faster steps on a CPU with AVX512-BF16 (and the usual win
    # on GPUs); the weights, the loss and the optimizer stay fp32, scoring and latent statistics run in fp32.
    autocast = precision_autocast(device, precision)
    vae.train()
    log = []
    bar = progress_bar(progress, iterable=range(cfg.steps), desc="fit_vae")
    for step in bar:
        x, picked = _sample_batch(clips, cfg, rng)
        x = x.to(device)
        with autocast:
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample()).sample.float()
        if cfg.foreground_weight:
            background = to_pixels(np.stack([backgrounds[i] for i in picked])[:, None])[:, :, 0].to(device)
            w = foreground_weights(x, background, cfg.foreground_weight)
            err = recon - x
            rec = ((w * err**2).mean() + 0.5 * (w * err.abs()).mean()) / w.mean()
        else:
            rec = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x)
        if cfg.grad_weight:
            rec = rec + cfg.grad_weight * gradient_loss(recon, x)
        kl = kl_per_element(posterior)
        loss = rec + cfg.kl_weight * kl
        align = alignment_loss(posterior.mean, projection, x) if cfg.align_weight else None
        if align is not None:
            loss = loss + cfg.align_weight * align
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        entry = {"step": step, "loss": loss.item(), "kl": kl.item(), "psnr": psnr(recon.detach(), x),
                 "lr": sched.get_last_lr()[0], **({"align": align.item()} if align is not None else {})}
        log.append(entry)
        bar.set_postfix(loss=f"{entry['loss']:.4f}", psnr=f"{entry['psnr']:.1f}")
    vae.eval()
    return log


@torch.no_grad()
def evaluate(vae, clips: list[np.ndarray]) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """PSNR/SSIM of deterministic (posterior mean) reconstructions of the first EVAL_FRAMES frames."""
    originals, recons = [], []
    for clip in clips:
        n = usable_frames(min(len(clip), EVAL_FRAMES))
        x = to_pixels(clip[:n]).to(vae.device)
        z = vae.encode(x).latent_dist.mean
        originals.append(x[0].transpose(0, 1).cpu())  # (T, 3, H, W)
        recons.append(vae.decode(z).sample.clamp(-1, 1)[0].transpose(0, 1).cpu())
    a, b = torch.cat(originals), torch.cat(recons)
    return {"psnr_db": round(psnr(b, a), 3), "ssim": round(ssim(b, a), 4), "eval_frames": int(len(a))}, a, b


def stats_sample(clips: list[np.ndarray]) -> list[np.ndarray]:
    """A spread sample of the training clips for the latent statistics: every (n // STATS_CLIPS)-th clip,
    halved while it holds more than STATS_FRAMES frames. It pins the per-channel statistics well; all
    of them costs minutes. MetaWorld's sample (52 clips of <= 156 frames) stays as it was; ALOHA's
    (90 clips of 400 frames: 36,000 frames) becomes 12 clips spread over the training episodes."""
    sample = clips[:: max(1, len(clips) // STATS_CLIPS)]
    while len(sample) > 1 and sum(len(c) for c in sample) > STATS_FRAMES:
        sample = sample[::2]
    return sample


@torch.no_grad()
def measure_latent_stats(vae, clips: list[np.ndarray]) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of the raw posterior-mean latents over all given clips."""
    total = total_sq = None
    count = 0
    for clip in clips:
        n = usable_frames(len(clip))
        z = encode_clip(vae, to_pixels(clip[:n]).to(vae.device), normalize=False)  # (1, z, t, h, w)
        z = z.transpose(0, 1).reshape(z.shape[1], -1).double().cpu()
        total = z.sum(1) if total is None else total + z.sum(1)
        total_sq = (z**2).sum(1) if total_sq is None else total_sq + (z**2).sum(1)
        count += z.shape[1]
    mean = total / count
    std = (total_sq / count - mean**2).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.tolist()


def save_grid(originals: torch.Tensor, recons: torch.Tensor, path: Path, n: int = 8) -> None:
    """PNG: n held-out frames (spread over the set) on top, their reconstructions below."""
    from PIL import Image

    idx = torch.linspace(0, len(originals) - 1, n).long()

    def row(x):
        x = ((x[idx] + 1) * 127.5).clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
        return np.concatenate(list(x), axis=1)

    grid = np.concatenate([row(originals), row(recons)], axis=0)
    with atomic_file(Path(path)) as tmp:
        Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(tmp, format="PNG")


BF16_PROBE_TIMEOUT_S = 60.0  # one training step; finishing ones take ~0.5-2 s on 2 CPU cores at 64-128 px
BF16_MEASURED_PIXELS = 96 * 128  # frames up to this size (64x64, ALOHA's 96x128) trained in bf16 without a stall


def _probe_step(cfg_json: str, h: int, w: int, threads: int) -> None:
    """Child of `bf16_step_stalls`: one bf16 training step of the VAE on random clips of h x w, saying
    "start" once built and "done" once stepped on stdout."""
    cfg = VAEConfig(**json.loads(cfg_json))
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    clips = [rng.integers(0, 256, (cfg.clip_frames, h, w, 3), dtype=np.uint8) for _ in range(cfg.batch_size)]
    vae = build_vae(cfg)
    print("start", flush=True)
    train(vae, clips, dataclasses.replace(cfg, steps=1, foreground_weight=0.0), progress=False, precision="bf16")
    print("done", flush=True)


@functools.lru_cache(maxsize=None)
def bf16_step_stalls(cfg: VAEConfig, shape: tuple[int, int], threads: int,
                     timeout_s: float = BF16_PROBE_TIMEOUT_S) -> bool:
    """Whether one bf16 training step of `cfg`'s VAE on (h, w) = `shape` frames fails to finish within
    `timeout_s` on this CPU with `threads` threads, tried in a child process (a stalled oneDNN call cannot
    be interrupted in this one; importing and building are not timed). On CPUs with AMX, oneDNN's AMX
    kernel for a convolution's weight gradient (brgconv_bwd_w) can stall with more than one thread:
    here (torch 2.11) a 64-channel 3x3x3 convolution on 64x64 planes, i.e. the small VAE at 128x128,
    never finished, while 64x64 and 96x128 images, one thread, or oneDNN capped below AMX all run it in
    well under a second."""
    import selectors
    import subprocess
    import sys

    code = "import sys; from lingbot.vae.fit import _probe_step; _probe_step(sys.argv[1], *map(int, sys.argv[2:]))"
    cfg_json = json.dumps(dataclasses.asdict(cfg))
    with subprocess.Popen([sys.executable, "-c", code, cfg_json, str(shape[0]), str(shape[1]), str(threads)],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as proc:
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(proc.stdout, selectors.EVENT_READ)
                for word, limit in (("start", 10 * timeout_s), ("done", timeout_s)):
                    if not sel.select(limit):
                        return True
                    if proc.stdout.readline().strip() != word:  # the child failed: not a stall
                        return False
                return False
        finally:
            proc.kill()


def cpu_precision(cfg: VAEConfig, precision: str, device: torch.device, shape: tuple[int, int],
                  timeout_s: float = BF16_PROBE_TIMEOUT_S) -> str:
    """`precision` for training on `device`, or fp32 where a bf16 step would stall (`bf16_step_stalls`),
    with a warning saying so. Only frames larger than `BF16_MEASURED_PIXELS` on CPUs with AMX and more
    than one thread are probed (~5 s, mostly the child's imports)."""
    threads = torch.get_num_threads()
    if (precision != "bf16" or device.type != "cpu" or threads < 2 or shape[0] * shape[1] <= BF16_MEASURED_PIXELS
            or not torch.cpu._is_amx_tile_supported()):
        return precision
    if not bf16_step_stalls(cfg, shape, threads, timeout_s):
        return precision
    logger.warning("fit_vae: a bf16 training step at %dx%d did not finish in %.0f s on this CPU (oneDNN's AMX "
                   "weight-gradient kernel stalls at this size with %d threads): training in fp32",
                   shape[0], shape[1], timeout_s, threads)
    return "fp32"


def fit_vae(cfg: VAEConfig, demos: Path, out: Path, grid_png: Path | None = None,
            log_tsv: Path | None = None, progress: bool = True, device: str | None = None,
            frames=None) -> dict:
    """The stage. `device`: where to train (default CUDA when there is one); `frames`: a callable
    (layout, cameras, episodes) -> clips in place of `load_frames` (e.g. frames decoded elsewhere).
    The precision it trained in and the machine are recorded in the VAE's config (`_lingbot`) and
    returned under "machine"."""
    from lingbot.hardware import resolve_precision, run_record

    t0 = time.perf_counter()
    load = frames or load_frames
    manifest, split, layout = read_demos(demos)
    cameras = manifest["keys"]["cameras"]
    val = split["val"][: cfg.eval_episodes] or split["train"][: cfg.eval_episodes]
    per_camera = [load(layout, [camera], split["train"]) for camera in cameras]
    train_clips = [clip for clips in per_camera for clip in clips]
    backgrounds = None
    if cfg.foreground_weight:
        backgrounds = [b for clips in per_camera for b in [static_background(clips)] * len(clips)]
    val_clips = load(layout, cameras, val)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if cfg.pretrained:
        vae = load_vae(cfg.pretrained, cfg.subfolder).to(device)
        log, record = [], {"pretrained": cfg.pretrained, **run_record(device, "fp32")}
    else:
        precision = resolve_precision(cfg.precision, device, "fit_vae")
        precision = cpu_precision(cfg, precision, device, tuple(train_clips[0].shape[1:3]))
        vae = build_vae(cfg).to(device)
        log = train(vae, train_clips, cfg, progress, backgrounds, precision)
        record = run_record(device, precision)
    metrics, originals, recons = evaluate(vae, val_clips)
    mean, std = measure_latent_stats(vae, stats_sample(train_clips))
    # `_lingbot`: diffusers keeps keys with a leading underscore in config.json and passes them to no one.
    vae.register_to_config(latents_mean=mean, latents_std=std, _lingbot=record)
    with atomic_dir(Path(out)) as tmp:
        vae.to("cpu").save_pretrained(tmp, safe_serialization=True)
    if grid_png is not None:
        save_grid(originals, recons, grid_png)
    if log_tsv is not None and log:
        with atomic_file(Path(log_tsv)) as tmp:
            with open(tmp, "w") as f:
                align = "align" in log[0]  # the column only where the alignment was trained
                f.write("step\tloss\tpsnr\tlr" + ("\talign" if align else "") + "\n")
                for e in log:
                    f.write(f"{e['step']}\t{e['loss']:.6f}\t{e['psnr']:.3f}\t{e['lr']:.6g}"
                            + (f"\t{e['align']:.6f}" if align else "") + "\n")
    params = sum(p.numel() for p in vae.parameters())
    return {
        **metrics,
        "params": int(params),
        "z_dim": int(vae.config.z_dim),
        "steps": len(log),
        "train_clips": len(train_clips),
        "seconds": round(time.perf_counter() - t0, 1),
        "machine": record,
    }
