"""`bench frames`: how far the recorded camera frames are from the renders evaluation feeds the policy.

collect writes each camera as a video through LeRobot's encoder; training (the VAE, the world model, BC
and the peers) sees the decoded frames, a rollout sees raw renders. For the params' encoder and
LeRobot's default (AV1, 4:2:0, crf 30) it collects the same expert episodes, decodes them and scores
them against a second, raw rollout of the same seeds: PSNR over whole frames and in a box around the
task's object and goal (`lingbot.eval.objects`), disk and time.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np

LEROBOT_DEFAULT = {"video_codec": "libsvtav1", "pix_fmt": "yuv420p", "crf": 30}


def bench_frames(params: Path, episodes: int, tasks: list[str]) -> dict:
    from lingbot.config import load_run_config
    from lingbot.data.collect import attempt_seed, collect, rollout_expert
    from lingbot.data.lerobot_io import iter_episode_frames, open_layout
    from lingbot.eval.objects import box_psnr, camera_projection, point_masks

    run = load_run_config(params)
    base = dataclasses.replace(run.collect, tasks=tuple(tasks or run.collect.tasks[:2]), episodes=episodes, workers=1)
    raw: dict[str, list] = {}
    for task in base.tasks:  # the episodes collect keeps: the first successful attempts, in order
        attempt = 0
        while len(raw.setdefault(task, [])) < episodes:
            episode = rollout_expert(task, attempt_seed(base.seed, task, attempt), base)
            attempt += 1
            if episode.success:
                raw[task].append(episode)
    ours = {k: getattr(base, k) for k in LEROBOT_DEFAULT}
    result = {"bench": "frames", "tasks": ",".join(base.tasks), "episodes_per_task": episodes,
              "image_size": base.image_size}
    for name, encoder in (("lerobot_default", LEROBOT_DEFAULT), ("params", ours)):
        cfg = dataclasses.replace(base, **encoder)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            collect(cfg, Path(tmp) / "ds", progress=False)
            seconds = time.perf_counter() - start
            videos = sorted((Path(tmp) / "ds" / "videos").rglob("*.mp4"))
            size = sum(p.stat().st_size for p in videos)
            layout = open_layout(Path(tmp) / "ds")
            frames = int(layout.episodes["length"].sum())
            scores = {"frame": [], "object": [], "goal": []}
            ep = 0
            for task in base.tasks:
                for episode in raw[task]:
                    for cam in cfg.cameras:
                        ((_, decoded, error),) = list(iter_episode_frames(layout, f"observation.images.{cam}", [ep]))
                        if error:
                            raise RuntimeError(error)
                        truth = episode.images[cam]
                        scores["frame"].append((truth, decoded, np.ones(truth.shape[:3], bool)))
                        matrix = camera_projection(task, cam, cfg.image_size)  # cached; None: the camera moves
                        if matrix is not None:
                            for point, masks in point_masks(matrix, episode.objects, cfg.image_size).items():
                                scores[point].append((truth, decoded, masks))
                    ep += 1
        label = f"{encoder['video_codec']} {encoder['pix_fmt']} crf {encoder['crf']}"
        result[f"{name}_encoder"] = label
        for point, items in scores.items():
            truth = np.concatenate([t for t, _, _ in items])
            decoded = np.concatenate([d for _, d, _ in items])
            masks = np.concatenate([m for _, _, m in items])
            result[f"{name}_{point}_psnr_db"] = round(box_psnr(truth, decoded, masks), 2)
        result[f"{name}_max_abs_error"] = int(max(np.abs(t.astype(int) - d.astype(int)).max() for t, d, _ in scores["frame"]))
        result[f"{name}_kib_per_frame"] = round(size / 1024 / frames / len(cfg.cameras), 2)
        result[f"{name}_collect_s"] = round(seconds, 1)
    return result
