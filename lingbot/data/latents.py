"""The latent cache: every episode encoded once by the causal VAE, read by training as windows of chunks.

Layout of a cache directory::

    manifest.json            format, fingerprints (dataset, VAE, params, text encoder), shapes, the
                             action/state normalisation stats, and every episode's shard and length
    tasks.safetensors        "embeddings": (n_tasks, tokens, dim) float32, frozen text encoder output
    shard-00000.safetensors  for each episode e of the shard:
        "e/video"        (L, cams, z, h, w) float32  normalised VAE latents, L = 1 + (F - 1) // 4
        "e/actions"      (L, k, A) float32           raw actions realising latent frame j (row 0: zeros)
        "e/action_mask"  (L, k) uint8                1 where an action exists
        "e/state"        (L, S) float32              robot state at the last frame of latent frame j
    and with `latents.phases` P > 1 the same four for "e@p", p = 1 .. P-1: the episode encoded from dataset
    frame p on (phase augmentation; the manifest lists each phase's latent frame count)

Alignment (k = 4 * frame_stride actions per latent frame): video frame i is dataset frame
i * frame_stride. Latent 0 is video frame 0 alone; latent j >= 1 covers video frames 4j-3 .. 4j, and
its actions are dataset actions s(4j-4) .. s(4j)-1: the ones executed from the previous latent's last
frame up to this one's last frame (the inverse-dynamics target).

Shards are written to a temporary file and renamed; the manifest is written first. Rerunning encodes
only missing shards; a cache whose manifest fingerprints differ from the current inputs is refused.
"""

from __future__ import annotations

import hashlib
import json
import time
import dataclasses
from pathlib import Path

import numpy as np
import torch

from lingbot.config import LatentsConfig
from lingbot.data.normalization import normalize
from lingbot.errors import LingbotError
from lingbot.fsutil import atomic_file, write_json

FORMAT = "lingbot-latents/1"
TEMPORAL_GROUP = 4


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def vae_fingerprint(vae_dir: Path) -> str:
    """sha256 over the VAE directory's config and weights (latent stats live in the config)."""
    digest = hashlib.sha256()
    for path in sorted(Path(vae_dir).rglob("*")):
        if path.is_file() and path.suffix in (".json", ".safetensors"):
            digest.update(path.name.encode())
            digest.update(_sha256_file(path).encode())
    return digest.hexdigest()


def demos_fingerprint(demos: Path) -> str:
    """The ingested dataset: its content fingerprint plus the split and stats derived from it."""
    digest = hashlib.sha256()
    for name in ("lingbot.json", "split.json", "stats.json"):
        digest.update((Path(demos) / name).read_bytes())
    return digest.hexdigest()


def sequence_key(episode: int, phase: int = 0) -> str:
    """The tensor-name prefix of an episode's latent sequence from dataset frame `phase` on."""
    return f"{episode}" if phase == 0 else f"{episode}@{phase}"


def phase_lengths(meta: dict) -> list[int]:
    """Latent frame count of each phase of a manifest episode entry (one phase: the episode's own)."""
    return meta.get("phase_latent_frames", [meta["latent_frames"]])


def latent_alignment(n_frames: int, frame_stride: int) -> tuple[np.ndarray, int]:
    """(dataset frame index of each video frame fed to the VAE, latent frame count) for an episode."""
    video = np.arange(0, n_frames, frame_stride)
    n_latent = 1 + (len(video) - 1) // TEMPORAL_GROUP
    return video[: 1 + TEMPORAL_GROUP * (n_latent - 1)], n_latent


def align_episode(actions: np.ndarray, states: np.ndarray, frame_stride: int):
    """Per latent frame: (L, k, A) actions, (L, k) mask, (L, S) states, following the module docstring."""
    _, n_latent = latent_alignment(len(actions), frame_stride)
    k = TEMPORAL_GROUP * frame_stride
    out_actions = np.zeros((n_latent, k, actions.shape[1]), np.float32)
    mask = np.zeros((n_latent, k), np.uint8)
    out_states = np.zeros((n_latent, states.shape[1]), np.float32)
    out_states[0] = states[0]
    for j in range(1, n_latent):
        lo, hi = frame_stride * (TEMPORAL_GROUP * j - TEMPORAL_GROUP), frame_stride * TEMPORAL_GROUP * j
        out_actions[j] = actions[lo:hi]
        mask[j] = 1
        out_states[j] = states[hi]
    return out_actions, mask, out_states


def _episode_arrays(layout, episodes: list[int], state_key: str, action_key: str):
    from lingbot.data.lerobot_io import read_state_action

    index, states, actions = read_state_action(layout, state_key, action_key)
    return {ep: (actions[index == ep].astype(np.float32), states[index == ep].astype(np.float32)) for ep in episodes}


def build_cache(demos: Path, vae_dir: Path, out: Path, cfg: LatentsConfig, shard: tuple[int, int] = (0, 1),
                rebuild: bool = False, progress: bool = True, only: list[int] | None = None,
                prepare_only: bool = False) -> dict:
    """Encode the ingested dataset at `demos` with the VAE at `vae_dir` into the cache at `out`.

    `prepare_only`: write the manifest and task embeddings (dropping the shards of a stale cache) and
    stop: what `build_cache_on_cluster` does once before the shards fan out."""
    from safetensors.torch import save_file

    from lingbot.data.lerobot_io import episode_tasks, iter_episode_frames, open_layout
    from lingbot.data.text import embed_tasks, encoder_fingerprint
    from lingbot.progress import progress_bar
    from lingbot.vae.wan import encode_clip, load_vae, spatial_ratio, to_pixels

    t0 = time.perf_counter()
    demos, out = Path(demos), Path(out)
    index, count = shard
    if not 1 <= cfg.phases <= TEMPORAL_GROUP * cfg.frame_stride:
        raise LingbotError(f"latents.phases {cfg.phases}: must be 1 .. {TEMPORAL_GROUP * cfg.frame_stride} (the "
                           "dataset frames one latent frame spans at this frame_stride)")
    if not 0 <= index < count:
        raise LingbotError(f"cache_latents: shard {index}/{count} is out of range")
    for path in (demos / "lingbot.json", demos / "split.json", demos / "stats.json"):
        if not path.is_file():
            raise LingbotError(f"{path}: missing; run `lingbot ingest` first")
    if not (Path(vae_dir) / "config.json").is_file():
        raise LingbotError(f"{vae_dir}: no VAE here (config.json missing); run `lingbot fit-vae` first")
    info = json.loads((demos / "lingbot.json").read_text())
    split = json.loads((demos / "split.json").read_text())
    stats = json.loads((demos / "stats.json").read_text())
    keys = info["keys"]
    ratio = spatial_ratio(json.loads((Path(vae_dir) / "config.json").read_text()))
    for camera in keys["cameras"]:
        h, w = info["shapes"][camera][:2]
        if h % ratio or w % ratio:
            raise LingbotError(f"cache_latents: camera {camera} is {h}x{w} pixels; the VAE ({vae_dir}) compresses "
                               f"{ratio}x, so height and width must be multiples of {ratio} (and of {2 * ratio} for "
                               "the model's 2x2 patches): record or re-encode the dataset's videos at such a size")
    layout = open_layout(demos / "dataset")
    episodes = sorted(int(e) for e in layout.episodes["episode_index"])
    if only is not None:  # a subset of episodes (benchmarks); recorded in the params fingerprint
        episodes = [e for e in episodes if e in set(only)]
    ep_rows = {int(r["episode_index"]): r for r in layout.episodes.to_dict("records")}
    tasks = info["tasks"]
    params = dataclasses.asdict(cfg)
    if cfg.phases == 1:  # caches from before phase augmentation keep their fingerprint
        del params["phases"]
    fingerprints = {
        "dataset": demos_fingerprint(demos),
        "vae": vae_fingerprint(vae_dir),
        "params": hashlib.sha256(
            json.dumps({**params, "only": only}, sort_keys=True).encode()
        ).hexdigest(),
        "text_encoder": encoder_fingerprint(cfg.text_encoder),
    }
    shards = [episodes[i : i + cfg.episodes_per_shard] for i in range(0, len(episodes), cfg.episodes_per_shard)]
    vae = load_vae(vae_dir)
    manifest = {
        "format": FORMAT,
        "fingerprints": fingerprints,
        "cameras": keys["cameras"],
        "state_key": keys["state"],
        "action_key": keys["action"],
        "fps": info["fps"],
        "frame_stride": cfg.frame_stride,
        "actions_per_latent": TEMPORAL_GROUP * cfg.frame_stride,
        "z_dim": int(vae.config.z_dim),
        "text_encoder": cfg.text_encoder,
        "tasks": tasks,
        "stats": {"state": stats[keys["state"]], "action": stats[keys["action"]]},
        "shards": [f"shard-{i:05d}.safetensors" for i in range(len(shards))],
        "episodes": {},
    }
    out.mkdir(parents=True, exist_ok=True)
    old = out / "manifest.json"
    if old.is_file():
        previous = json.loads(old.read_text())
        differs = [k for k, v in fingerprints.items() if previous.get("fingerprints", {}).get(k) != v]
        if differs and not rebuild:
            raise LingbotError(
                f"{out}: cache built from other inputs ({', '.join(differs)} fingerprint differs); "
                "delete it or pass --rebuild"
            )
        if differs:
            for stale in out.glob("*.safetensors"):
                stale.unlink()
    # Episode lengths and splits are known before encoding: the manifest is complete from the start.
    val = set(split["val"])
    task_of = {ep: tasks.index(task) for ep, task in episode_tasks(layout).items()}
    for s, shard_eps in enumerate(shards):
        for ep in shard_eps:
            _, n_latent = latent_alignment(int(ep_rows[ep]["length"]), cfg.frame_stride)
            manifest["episodes"][str(ep)] = {
                "shard": s, "latent_frames": n_latent, "task_index": task_of[ep],
                "split": "val" if ep in val else "train",
            }
            if cfg.phases > 1:
                manifest["episodes"][str(ep)]["phase_latent_frames"] = [
                    latent_alignment(int(ep_rows[ep]["length"]) - p, cfg.frame_stride)[1] for p in range(cfg.phases)]
    write_json(out / "manifest.json", manifest)
    if not (out / "tasks.safetensors").is_file():
        with atomic_file(out / "tasks.safetensors") as tmp:
            save_file({"embeddings": torch.from_numpy(embed_tasks(cfg.text_encoder, tasks))}, str(tmp))

    if prepare_only:
        return {"episodes": len(episodes), "shards": len(shards)}
    mine = [s for s in range(len(shards)) if s % count == index]
    todo = [s for s in mine if not (out / manifest["shards"][s]).is_file()]
    arrays = _episode_arrays(layout, episodes, keys["state"], keys["action"]) if todo else {}
    frames_encoded = 0
    encode_s = 0.0
    bar = progress_bar(progress, total=sum(len(shards[s]) for s in todo), desc="cache_latents", unit="ep")
    for s in todo:
        tensors = {}
        for ep in shards[s]:
            n_frames = int(ep_rows[ep]["length"])
            clips = []
            for key in keys["cameras"]:
                ((_, frames, error),) = list(iter_episode_frames(layout, key, [ep]))
                if error:
                    raise LingbotError(error)
                if len(frames) != n_frames:
                    raise LingbotError(f"episode {ep}, {key}: video has {len(frames)} frames, parquet {n_frames}")
                clips.append(frames)
            for phase in range(cfg.phases):  # phase p: the episode as if recorded from frame p on
                video_index, _ = latent_alignment(n_frames - phase, cfg.frame_stride)
                per_camera = []
                for frames in clips:
                    t = time.perf_counter()
                    latents = encode_clip(vae, to_pixels(frames[phase + video_index]))[0]  # (z, L, h, w)
                    encode_s += time.perf_counter() - t
                    frames_encoded += len(video_index)
                    per_camera.append(latents.transpose(0, 1))  # (L, z, h, w)
                actions, mask, states = align_episode(*(a[phase:] for a in arrays[ep]), cfg.frame_stride)
                name = sequence_key(ep, phase)
                tensors[f"{name}/video"] = torch.stack(per_camera, dim=1).contiguous()  # (L, cams, z, h, w)
                tensors[f"{name}/actions"] = torch.from_numpy(actions)
                tensors[f"{name}/action_mask"] = torch.from_numpy(mask)
                tensors[f"{name}/state"] = torch.from_numpy(states)
            bar.update(1)
        with atomic_file(out / manifest["shards"][s]) as tmp:
            save_file(tensors, str(tmp), metadata={"format": FORMAT})
        del tensors  # memory holds one shard at a time
    bar.close()
    return {
        "episodes": len(episodes),
        "shards": len(shards),
        "shards_written": len(todo),
        "frames_encoded": frames_encoded,
        "encode_frames_per_s": round(frames_encoded / encode_s, 1) if encode_s else None,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def encode_shard(demos: str, vae_dir: str, out: str, cfg: LatentsConfig, shard: tuple[int, int], threads: int) -> dict:
    """One shard of the cache (a cluster job): `build_cache` of that shard with `threads` torch threads."""
    import torch

    torch.set_num_threads(threads)
    return build_cache(Path(demos), Path(vae_dir), Path(out), cfg, shard=shard, progress=False)


def build_cache_on_cluster(demos: Path, vae_dir: Path, out: Path, cfg: LatentsConfig, cluster, threads: int,
                           rebuild: bool = False) -> dict:
    """`build_cache` with one cluster job per shard (lingbot/cluster.py): the manifest first, here, then
    every shard not yet written; a rerun after a lost worker encodes only the missing shards. The same
    bytes as one process: each shard is a function of its episodes, the manifest of the inputs."""
    from lingbot.cluster import fan_out

    t0 = time.perf_counter()
    plan = build_cache(demos, vae_dir, out, cfg, rebuild=rebuild, progress=False, prepare_only=True)
    n = plan["shards"]
    jobs = [(str(demos), str(vae_dir), str(out), cfg, (i, n), threads) for i in range(n)]
    reports = fan_out(encode_shard, jobs, cluster, "cache-latents-shard")
    frames = sum(r["frames_encoded"] for r in reports)
    busy = sum(r["frames_encoded"] / r["encode_frames_per_s"] for r in reports if r["encode_frames_per_s"])
    return {"episodes": plan["episodes"], "shards": n, "shards_written": sum(r["shards_written"] for r in reports),
            "frames_encoded": frames, "encode_frames_per_s": round(frames / busy, 1) if busy else None,
            "seconds": round(time.perf_counter() - t0, 1)}


def open_manifest(cache: Path, expect: dict | None = None) -> dict:
    """Read and check a cache's manifest; `expect` fingerprints (e.g. {"vae": ...}) must match."""
    path = Path(cache) / "manifest.json"
    if not path.is_file():
        raise LingbotError(f"{path}: missing; run `lingbot cache-latents` first")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise LingbotError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    for key, value in (expect or {}).items():
        if manifest["fingerprints"].get(key) != value:
            raise LingbotError(f"{path}: cache built from another {key} (fingerprint differs); rebuild it")
    missing = [s for s in manifest["shards"] if not (Path(cache) / s).is_file()]
    if missing:
        raise LingbotError(f"{cache}: incomplete cache, {len(missing)} shard(s) missing (first: {missing[0]})")
    return manifest


def window_start(rng: np.random.Generator, n_latent: int, length: int, episode_start_p: float) -> int:
    """The first chunk of a window of `length` chunks in an episode of `n_latent`.

    With probability `episode_start_p` the episode's first frame, else uniform. Uniform starts alone give
    the first chunks of an episode (which commit the arm to a direction from one frame) far fewer
    training slots than the middle ones, and the first chunk of a window is context only.
    """
    episode_start = rng.random() < episode_start_p
    uniform = int(rng.integers(0, n_latent - length + 1))
    return 0 if episode_start else uniform


class LatentWindows:
    """The cache read as windows of consecutive chunks, memory-mapped, ready for the model. Which
    windows a training step reads is the trainer's one sampler's choice (`lingbot.train.loop.StepSampler`).

    `window(episode, start, length, phase)`: video (n, cams, z, h, w), actions (n, k, A) and start_state
    (n, S: the robot state each chunk's actions start from) quantile-normalised, action_mask (n, k),
    task (tokens, dim), plus the episode, start and phase.
    """

    def __init__(self, cache: Path, split: str = "train", expect: dict | None = None):
        from safetensors.torch import load_file

        self.cache = Path(cache)
        self.manifest = open_manifest(self.cache, expect)
        self.episodes = sorted(int(e) for e, m in self.manifest["episodes"].items() if m["split"] == split)
        if not self.episodes:
            raise LingbotError(f"{self.cache}: no {split} episodes in the cache")
        self.tasks = load_file(str(self.cache / "tasks.safetensors"))["embeddings"]
        self._handles: dict[int, object] = {}

    def _shard(self, shard: int):
        # Opened on first use: safetensors maps the file.
        if shard not in self._handles:
            from safetensors import safe_open

            path = self.cache / self.manifest["shards"][shard]
            self._handles[shard] = safe_open(str(path), framework="pt")
        return self._handles[shard]

    def window(self, episode: int, start: int, length: int, phase: int = 0) -> dict:
        meta = self.manifest["episodes"][str(episode)]
        f = self._shard(meta["shard"])
        name = sequence_key(episode, phase)
        sl = slice(start, start + length)
        stats = self.manifest["stats"]
        # The state chunk j's actions start from is latent frame j-1's (chunk 0 has no actions: its own),
        # so a window starting at s > 0 reads one row before it.
        first = max(start - 1, 0)
        states = f.get_slice(f"{name}/state")[first : start + length]
        rows = torch.clamp(torch.arange(start, start + length) - 1, min=0) - first
        return {
            "video": f.get_slice(f"{name}/video")[sl],
            "actions": normalize(f.get_slice(f"{name}/actions")[sl], stats["action"]),
            "action_mask": f.get_slice(f"{name}/action_mask")[sl].bool(),
            "start_state": normalize(states[rows], stats["state"]),
            "task": self.tasks[meta["task_index"]],
            "episode": episode,
            "start": start,
            "phase": phase,
        }


def collate_windows(items: list[dict]) -> dict:
    """Batch windows of one length (the trainer's sampler draws them so) into tensors."""
    n = len(items[0]["video"])
    if any(len(item["video"]) != n for item in items):
        raise ValueError("collate_windows: windows of different lengths")
    batch = {key: torch.stack([item[key] for item in items])
             for key in ("video", "actions", "action_mask", "start_state")}
    batch["task"] = torch.stack([item["task"] for item in items])
    batch["episode"] = torch.tensor([item["episode"] for item in items])
    batch["start"] = torch.tensor([item["start"] for item in items])
    batch["phase"] = torch.tensor([item["phase"] for item in items])
    return batch
