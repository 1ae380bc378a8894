"""Rollouts in LeRobot's environments (`lerobot.envs`: metaworld, pusht, aloha, libero, ...), scored like
lingbot's own.

`evaluate.env: lerobot` hands the bundle to LeRobot's own evaluation loop (`lerobot-eval`) as a LeRobot
policy: a copy of the bundle with LeRobot's config.json and processors (the plugin's
`write_lerobot_files`), `evaluate.camera_map` routing LeRobot's image keys to the bundle's cameras, the
env's `observation.state` as the robot state, actions back in robot units. Success is the env's own
(`info["is_success"]`, as LeRobot counts it); the held-out seed is `evaluate.seed`. LeRobot's per-task
successes come back as lingbot's metrics: success rate with its Wilson interval, per task and overall.

The bundle acts at its dataset's fps; an env stepping faster (LeRobot's MetaWorld: 80 Hz control
steps, a bundle collected at `action_repeat` 2: 40 Hz) holds each action for env fps / bundle fps steps
(the plugin's `env_fps`), and the episode ends after `evaluate.max_steps` bundle steps, as in lingbot's
own rollouts (LeRobot's MetaWorld env ignores its `episode_length`; the time limit is set on the envs
lerobot-eval makes, see `main`).

LIBERO (`lerobot_env: libero`) downloads its assets at first use: run it where the network reaches the
Hub once (`HF_HUB_OFFLINE=1` afterwards).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lingbot.config import EvalConfig
from lingbot.errors import LingbotError
from lingbot.fsutil import atomic_dir, write_json


def camera_map(cfg: EvalConfig) -> dict[str, str]:
    """`evaluate.camera_map` ("bundle_key=lerobot_key" entries) as LeRobot's --policy.camera_map."""
    mapping = {}
    for entry in cfg.camera_map:
        bundle_key, sep, source = entry.partition("=")
        if not sep or not bundle_key or not source:
            raise LingbotError(f"evaluate.camera_map: {entry!r} is not bundle_camera=lerobot_key")
        mapping[bundle_key] = source
    return mapping


def evaluate_lerobot(bundle: Path, cfg: EvalConfig, out: Path) -> dict:
    """Roll `bundle` out in LeRobot env `cfg.lerobot_env` on each of `cfg.tasks`; write `out`, return metrics."""
    from lerobot_policy_lingbot.export import write_lerobot_files

    from lingbot.sim import aloha
    from lingbot.eval.metrics import success_metrics
    from lingbot.sim.suite import is_aloha

    if cfg.episodes < 1:
        raise LingbotError("evaluate: episodes must be >= 1")
    env_fps, hold = action_hold(bundle, cfg.lerobot_env)
    results, seconds = [], 0.0
    with tempfile.TemporaryDirectory(prefix="lingbot-lerobot-eval-") as tmp:
        policy = Path(tmp) / "policy"
        shutil.copytree(bundle, policy)
        write_lerobot_files(policy)
        for task in cfg.tasks:
            run = Path(tmp) / f"eval-{len(results)}"
            lerobot_task = aloha.lerobot_task(task) if is_aloha(task) else task  # ALOHA: LeRobot's gym id
            args = [sys.executable, "-m", "lingbot.sim.lerobot_env", str(cfg.max_steps * hold),
                    f"--policy.path={policy}", f"--policy.env_fps={env_fps}",
                    f"--policy.camera_map={json.dumps(camera_map(cfg))}", "--policy.device=cpu",
                    f"--env.type={cfg.lerobot_env}", f"--env.task={lerobot_task}", f"--eval.n_episodes={cfg.episodes}",
                    "--eval.batch_size=1", "--eval.use_async_envs=false", f"--seed={cfg.seed}",
                    f"--output_dir={run}"]
            env = {**os.environ, "OMP_NUM_THREADS": str(cfg.threads)}
            start = time.perf_counter()
            proc = subprocess.run(args, capture_output=True, text=True, env=env)
            seconds += time.perf_counter() - start
            if proc.returncode != 0:
                tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-12:])
                raise LingbotError(f"evaluate: lerobot-eval on {cfg.lerobot_env} {task} failed:\n{tail}")
            info = json.loads((run / "eval_info.json").read_text())
            successes = [s for entry in info["per_task"] for s in entry["metrics"]["successes"]]
            results += [{"task": task, "seed": cfg.seed + i, "success": bool(s)} for i, s in enumerate(successes)]
    with atomic_dir(Path(out)) as target:
        target.mkdir()
        write_json(target / "episodes.json", results)
        write_json(target / "timings.json", [{"task": "all", "latency_ms": [], "wall_s": round(seconds, 1)}])
    summary = {}
    for name, rows in [("", results)] + [(f"{t}/", [r for r in results if r["task"] == t]) for t in cfg.tasks]:
        summary |= success_metrics([r["success"] for r in rows], name)
    return summary


def action_hold(bundle: Path, lerobot_env: str) -> tuple[int, int]:
    """(the LeRobot env's fps, env steps per bundle action) for `bundle` rolled out in `lerobot_env`."""
    from lerobot.envs.configs import EnvConfig

    from lingbot.policy.bundle import read_bundle

    try:
        env_fps = int(EnvConfig.get_choice_class(lerobot_env).fps)
    except KeyError:
        raise LingbotError(f"evaluate.lerobot_env: {lerobot_env!r} is not a lerobot.envs type "
                           f"({', '.join(sorted(EnvConfig.get_known_choices()))})") from None
    return env_fps, held_steps(env_fps, int(read_bundle(bundle)["fps"]), f"LeRobot's {lerobot_env} env")


def held_steps(env_fps: int, fps: int, what: str) -> int:
    """Env steps each bundle action is held for: `what` steps at env_fps, a whole multiple of `fps`."""
    if env_fps < fps or env_fps % fps:
        raise LingbotError(f"{what} steps at {env_fps} Hz, not a multiple of the bundle's {fps} fps: its "
                           "actions cannot be held for whole env steps")
    return env_fps // fps


def main(argv: list[str]) -> None:
    """`python -m lingbot.sim.lerobot_env MAX_STEPS ARGS...`: lerobot-eval with ARGS, every env's episode
    cut at MAX_STEPS env steps (its own limit when that is shorter)."""
    from lerobot.scripts import lerobot_eval

    max_steps, make_env = int(argv[0]), lerobot_eval.make_env

    def make_limited_env(*args, **kwargs):
        envs = make_env(*args, **kwargs)
        for group in envs.values():
            for vec_env in group.values():
                own = min(vec_env.get_attr("_max_episode_steps"))
                vec_env.set_attr("_max_episode_steps", min(own, max_steps))
        return envs

    argv_before, sys.argv, lerobot_eval.make_env = sys.argv, ["lerobot-eval", *argv[1:]], make_limited_env
    try:
        lerobot_eval.main()
    finally:
        sys.argv, lerobot_eval.make_env = argv_before, make_env


if __name__ == "__main__":
    main(sys.argv[1:])
