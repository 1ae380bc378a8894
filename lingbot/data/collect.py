"""Scripted-expert demonstrations: a suite's experts (MetaWorld's, or ALOHA's bimanual ones,
`lingbot/sim/suite.py`) rolled out in parallel, written as LeRobot v3.

Every attempt has its own seed (from the run seed, the task and the attempt number), so the set of
episodes, and the bytes of the parquet files, depend only on the config, not on scheduling. Attempts
run in worker processes; the parent writes successful episodes through `LeRobotDataset` in attempt
order. Failed expert episodes are dropped and counted.
"""

from __future__ import annotations

import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from lingbot.config import CollectConfig
from lingbot.errors import LingbotError
from lingbot.fsutil import atomic_dir

@dataclass
class Episode:
    task: str
    seed: int
    success: bool
    states: np.ndarray  # (T, state channels) float32
    objects: np.ndarray | None  # (T, 6) float32: the task's object and goal positions (world metres); ALOHA: None
    actions: np.ndarray  # (T, action channels) float32
    images: dict[str, np.ndarray]  # camera -> (T, H, W, 3) uint8
    render_s: float
    sim_s: float


def attempt_seed(seed: int, task: str, attempt: int) -> int:
    """A stable 31-bit seed per (run seed, task, attempt), independent of worker scheduling."""
    task_key = int.from_bytes(task.encode()[:16].ljust(16, b"\0"), "little") % (2**31)
    return int(np.random.SeedSequence([seed, task_key, attempt]).generate_state(1)[0] % (2**31))


_ENVS: dict[tuple, object] = {}


def rollout_expert(task: str, seed: int, cfg: CollectConfig) -> Episode:
    """Run the scripted expert once; record (obs, action) pairs at fps = sim Hz / action_repeat."""
    import warnings

    from lingbot.sim.metaworld import object_positions
    from lingbot.sim.suite import expert_policy, make_env, suite_of

    # MetaWorld's experts warn on every construction that their gains exceed the action range; the
    # env clips, and so do we, explicitly.
    warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high")
    key = (task, cfg.image_size, cfg.image_width, cfg.cameras)
    if key not in _ENVS:  # env construction costs ~0.2 s: reuse one per task in each worker
        _ENVS[key] = (make_env(task, cfg.image_size, cfg.cameras, cfg.image_width), expert_policy(task))
    env, policy = _ENVS[key]
    with_objects = bool(suite_of(task).object_names)
    obs = env.reset(seed)
    if hasattr(policy, "reset"):  # our experts keep a phase or a plan; MetaWorld's are stateless
        policy.reset(obs)
    states, objects, actions, frames = [], [], [], {c: [] for c in cfg.cameras}
    render_s = sim_s = 0.0
    success_at = None
    horizon = min(cfg.max_steps, env.max_path_length // cfg.action_repeat)
    for step in range(horizon):
        t0 = time.perf_counter()
        for cam, image in env.render().items():
            frames[cam].append(image)
        t1 = time.perf_counter()
        action = env.clip(policy.get_action(obs)).astype(np.float32)
        states.append(env.state(obs).astype(np.float32))
        if with_objects:
            objects.append(object_positions(obs))
        actions.append(action)
        obs, success = env.step(action, cfg.action_repeat)
        sim_s += time.perf_counter() - t1
        render_s += t1 - t0
        if success and success_at is None:
            success_at = step
        if success_at is not None and step - success_at >= cfg.settle_steps:
            break
    return Episode(
        task=task,
        seed=seed,
        success=success_at is not None,
        states=np.stack(states),
        objects=np.stack(objects) if with_objects else None,
        actions=np.stack(actions),
        images={c: np.stack(v) for c, v in frames.items()},
        render_s=render_s,
        sim_s=sim_s,
    )


def _rollout_job(job: tuple[str, int, CollectConfig]) -> Episode:
    return rollout_expert(*job)


def quiet_encoders() -> None:
    """Keep SVT-AV1's banner, FFmpeg's muxer chatter and datasets' per-episode bars off the console."""
    import os

    import av
    import datasets

    os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1: errors only
    av.logging.set_level(av.logging.ERROR)
    datasets.disable_progress_bars()


def dataset_features(cfg: CollectConfig) -> dict:
    from lingbot.sim.suite import image_width, suite_of

    suite = suite_of(cfg.tasks)
    features = {"observation.state": {"dtype": "float32", "shape": (len(suite.state_names),),
                                      "names": list(suite.state_names)}}
    if suite.object_names:
        # Privileged: where the task's object and goal are (LeRobot's name for it, as in its pusht
        # dataset). No policy reads it; it scores what the VAE keeps of the objects.
        features["observation.environment_state"] = {"dtype": "float32", "shape": (len(suite.object_names),),
                                                     "names": list(suite.object_names)}
    features["action"] = {"dtype": "float32", "shape": (len(suite.action_names),), "names": list(suite.action_names)}
    width = image_width(cfg.tasks[0], cfg.image_size, cfg.image_width)
    for cam in cfg.cameras:
        features[f"observation.images.{cam}"] = {
            "dtype": "video",
            "shape": (cfg.image_size, width, 3),
            "names": ["height", "width", "channels"],
        }
    return features


def canonical_stats(path: Path) -> None:
    """LeRobot aggregates the dataset stats over a set of feature names, so their order in stats.json
    follows the process's string hashing; the same stats are rewritten with sorted keys (as LeRobot
    indents them), making the file a function of the data alone."""
    import json

    stats = json.loads(path.read_text())
    path.write_text(json.dumps(stats, indent=4, sort_keys=True))


def _check(cfg: CollectConfig) -> None:
    from lingbot.sim.suite import suite_of, task_names

    known = set(task_names())
    for task in cfg.tasks:
        if task not in known:
            raise LingbotError(f"collect: unknown task {task!r} (e.g. drawer-open-v3, push-v3, aloha-transfer-cube)")
    if not cfg.tasks:
        raise LingbotError("collect: no tasks given")
    try:
        sim_hz = suite_of(cfg.tasks).sim_hz
    except ValueError as exc:
        raise LingbotError(f"collect: {exc}") from None
    if cfg.episodes < 1:
        raise LingbotError(f"collect: episodes must be >= 1, got {cfg.episodes}")
    if sim_hz % cfg.action_repeat:
        raise LingbotError(f"collect: action_repeat must divide {sim_hz}, got {cfg.action_repeat}")
    if cfg.image_size < 16 or (cfg.image_width and cfg.image_width < 16):
        raise LingbotError(f"collect: image_size and image_width must be >= 16, got {cfg.image_size}, {cfg.image_width}")
    from lerobot.configs.video import RGBEncoderConfig

    try:
        RGBEncoderConfig(vcodec=cfg.video_codec, pix_fmt=cfg.pix_fmt, crf=cfg.crf)
    except ValueError as exc:
        raise LingbotError(f"collect: video_codec {cfg.video_codec!r} / pix_fmt {cfg.pix_fmt!r} / crf {cfg.crf}: "
                           f"{str(exc).splitlines()[0]}") from None


def collect(cfg: CollectConfig, out: Path, progress: bool = True, cluster=None) -> dict:
    """Roll out the experts and write a LeRobot v3 dataset at `out` (replaced atomically).

    `cluster` (a ClusterConfig, lingbot/cluster.py): the attempts run as Prefect tasks on a Dask
    cluster instead of the local pool; they come back in submission order and are written here, so
    the dataset is the same. Returns a report: episodes kept and dropped per task, frames, throughput.
    """
    from lerobot.configs.video import RGBEncoderConfig
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    from lingbot.progress import progress_bar
    from lingbot.sim.suite import suite_of, task_description

    _check(cfg)
    quiet_encoders()
    suite = suite_of(cfg.tasks)
    fps = suite.sim_hz // cfg.action_repeat
    max_attempts = cfg.episodes * cfg.max_attempts_factor
    kept = {t: 0 for t in cfg.tasks}
    dropped = {t: 0 for t in cfg.tasks}
    frames = 0
    rendered_steps = 0  # every recorded step, kept or dropped: what the render time paid for
    render_s = sim_s = 0.0
    t_start = time.perf_counter()
    # Workers are spawned (not forked): each owns its GL context and MuJoCo state.
    ctx = get_context("spawn")
    with atomic_dir(Path(out)) as tmp, ProcessPoolExecutor(cfg.workers, mp_context=ctx) as pool:
        dataset = LeRobotDataset.create(
            repo_id=cfg.repo_id,
            fps=fps,
            features=dataset_features(cfg),
            root=tmp,
            robot_type=suite.robot_type,
            use_videos=True,
            video_backend="pyav",  # torchcodec needs system FFmpeg libraries; PyAV ships its own
            rgb_encoder=RGBEncoderConfig(vcodec=cfg.video_codec, pix_fmt=cfg.pix_fmt, crf=cfg.crf),
            # Encode while collecting (no PNG round trip). LeRobot's encoder *drops* frames when its
            # queue is full, which happens on a busy 2-core machine at the default size (30): the
            # queue must hold a whole episode (validate's video frame count caught this).
            streaming_encoding=True,
            encoder_queue_maxsize=cfg.max_steps + 1,
            # One encoder thread per camera stream: the encoded bytes then do not depend on how the
            # encoder's threads were scheduled (the streams still encode in parallel, one per camera).
            encoder_threads=1,
        )
        bar = progress_bar(progress, total=cfg.episodes * len(cfg.tasks), desc="collect", unit="ep")
        next_attempt = {t: 0 for t in cfg.tasks}
        while True:
            # Submit exactly the attempts still needed, in a fixed order, so results are scheduling-free.
            jobs = []
            for task in cfg.tasks:
                need = cfg.episodes - kept[task]
                budget = max_attempts - next_attempt[task]
                for _ in range(min(need, budget)):
                    jobs.append((task, attempt_seed(cfg.seed, task, next_attempt[task]), cfg))
                    next_attempt[task] += 1
            if not jobs:
                break
            if cluster is not None:
                from lingbot.cluster import fan_out

                episodes = fan_out(_rollout_job, [(job,) for job in jobs], cluster, "collect-episode")
            else:
                episodes = pool.map(_rollout_job, jobs)
            for episode in episodes:
                render_s += episode.render_s
                sim_s += episode.sim_s
                rendered_steps += len(episode.actions)
                if not episode.success:
                    dropped[episode.task] += 1
                    continue
                instruction = task_description(episode.task)
                for t in range(len(episode.actions)):
                    frame = {"observation.state": episode.states[t]}
                    if episode.objects is not None:
                        frame["observation.environment_state"] = episode.objects[t]
                    frame |= {"action": episode.actions[t], "task": instruction}
                    for cam in cfg.cameras:
                        frame[f"observation.images.{cam}"] = episode.images[cam][t]
                    dataset.add_frame(frame)
                dataset.save_episode()
                kept[episode.task] += 1
                frames += len(episode.actions)
                bar.update(1)
                bar.set_postfix(dropped=sum(dropped.values()), frames=frames)
        bar.close()
        short = [t for t in cfg.tasks if kept[t] < cfg.episodes]
        if short:
            dataset.finalize()
            raise LingbotError(
                "collect: the expert succeeded too rarely for "
                + ", ".join(f"{t} ({kept[t]}/{cfg.episodes} after {next_attempt[t]} attempts)" for t in short)
            )
        dataset.finalize()
        canonical_stats(Path(tmp) / "meta" / "stats.json")
    elapsed = time.perf_counter() - t_start
    rendered = rendered_steps * len(cfg.cameras)
    return {
        "episodes": sum(kept.values()),
        "episodes_dropped": sum(dropped.values()),
        "kept_per_task": kept,
        "dropped_per_task": dropped,
        "frames": frames,
        "fps": fps,
        "seconds": round(elapsed, 3),
        "collect_frames_per_s": round(frames / elapsed, 2),
        # Per core: rendered camera images per second of render time inside the workers.
        "render_images_per_s_per_core": round(rendered / render_s, 2) if render_s else None,
        "sim_steps_per_s_per_core": round(rendered_steps * cfg.action_repeat / sim_s, 2) if sim_s else None,
    }
