"""Simulation evaluation: roll a policy bundle out in its suite (MetaWorld or ALOHA, by task id), in
parallel processes, and score it.

Each episode: reset the task with a held-out seed (EvalConfig.seed + episode number: collect's seeds are
derived from small run seeds), stream every rendered frame to the policy session, execute each action
chunk at the dataset's rate (control steps per action = the suite's Hz / fps: MetaWorld 80 Hz, ALOHA
50 Hz), stop at success or `max_steps`.

Outputs (directory `out`)::

    episodes.json          one record per episode: task, seed, success, length, and on a memory task
                           the presses made (a function of the bundle and the params: the same bytes on
                           every run)
    timings.json           per episode: per-chunk latency (ms) and wall time; these change every run,
                           so `.dvcignore` keeps them out of the stage's hashed output
    videos/<task>-<i>.mp4  real camera frames (top) over the model's imagined video (bottom), first camera

Metrics (`summarize`): success rate with a 95% Wilson interval per task and overall, mean episode
length (on a memory task also the episodes by presses made, 0 to 3 or more: a failure at 1 press
forgot or missed the second, one at 3 forgot the first), mean and p95 policy latency per chunk (the
time a control loop waits for a chunk), and the achieved control frequency (executed steps per second
of the rollout loop: sim, rendering and policy).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from lingbot.config import EvalConfig
from lingbot.errors import LingbotError
from lingbot.eval.metrics import success_metrics
from lingbot.fsutil import atomic_dir, is_timing, write_json
from lingbot.sim.suite import camera_names, make_env, suite_of, task_description


def run_episode(policy, task: str, seed: int, cfg: EvalConfig, record: bool = False) -> dict:
    """One rollout of `policy` (a loaded Policy) on `task`; frames kept when `record`."""
    meta = policy.meta
    height, width = (int(v) for v in meta["image_size"])
    env = make_env(task, height, camera_names(policy.cameras), width)
    repeat = max(1, round(suite_of(task).sim_hz / meta["fps"]))
    session = policy.new_session(task_description(task), seed=seed)
    keys = dict(zip(camera_names(policy.cameras), policy.cameras))
    frames = []

    def observation(raw):
        images = env.render()
        if record:
            frames.append(images[next(iter(keys))])
        return {**{keys[name]: image for name, image in images.items()}, policy.state_key: env.state(raw)}

    try:
        obs = observation(env.reset(seed))
        steps, success = 0, False
        start = time.perf_counter()
        while steps < cfg.max_steps and not success:
            chunk = session.infer(obs)
            for i, action in enumerate(chunk):
                raw, reached = env.step(env.clip(action), repeat)
                steps += 1
                success = success or reached
                obs = observation(raw)
                if success or steps >= cfg.max_steps:
                    break
                if i < len(chunk) - 1:
                    session.observe(obs)
        wall = time.perf_counter() - start
        result = {"task": task, "seed": seed, "success": bool(success), "length": steps,
                  "latency_ms": [round(x, 3) for x in session.latency_ms], "wall_s": wall}
        if env.counter is not None:  # a memory task: how far the policy got tells forgetting from missing
            result["presses"] = env.counter.presses
        if record:
            result["frames"] = np.stack(frames)
            result["imagined"] = session.imagined_video()  # (1 + 4(T-1), H, W, 3): first camera
        return result
    finally:
        session.close()
        env.close()


# ----------------------------------------------------------------------------------------------------
# Parallel rollouts: each worker process loads the bundle once.

_WORKER: dict = {}


def _init_worker(bundle: str, threads: int, load) -> None:
    import torch

    if load is None:
        from lingbot.policy.runtime import load_policy as load

    torch.set_num_threads(threads)
    _WORKER["policy"] = load(bundle)


def _work(job: tuple[str, int, EvalConfig, bool]) -> dict:
    task, seed, cfg, record = job
    return run_episode(_WORKER["policy"], task, seed, cfg, record)


def rollout(bundle: str, threads: int, load, job: tuple) -> dict:
    """One episode as a cluster job (`evaluate` with a cluster): each worker process loads the bundle once."""
    if _WORKER.get("key") != (bundle, load):
        _init_worker(bundle, threads, load)
        _WORKER["key"] = (bundle, load)
    return _work(job)


def _rollout_pool(bundle: Path, jobs: list, workers: int, threads: int, load, progress: bool) -> list[dict]:
    """The local pool: `workers` spawned processes, each loading the bundle once."""
    import multiprocessing as mp

    from lingbot.progress import progress_bar

    results = []
    with mp.get_context("spawn").Pool(workers, _init_worker, (str(bundle), threads, load)) as pool:
        bar = progress_bar(progress, total=len(jobs), desc="evaluate", unit="episode")
        for result in pool.imap_unordered(_work, jobs):
            results.append(result)
            bar.update()
            bar.set_postfix(success=f"{sum(r['success'] for r in results)}/{len(results)}")
        bar.close()
    return results


def evaluate(bundle: Path, cfg: EvalConfig, out: Path, progress: bool = True, load=None, cluster=None) -> dict:
    """Roll out every (task, episode) of `cfg`, write `out` (see module docstring), return the summary.

    `load(path)` makes the policy in each worker (a module-level function): by default a world-model
    bundle's `load_policy`; `lingbot.baselines.bc.load_bc` rolls out the BC baseline (no videos).
    `cluster` (a ClusterConfig, lingbot/cluster.py): one Prefect task per episode on a Dask cluster
    instead of the local pool; an episode is a function of its seed, so the outcomes are the same.
    """
    from lingbot.policy.bundle import read_bundle
    from lingbot.sim.suite import task_names

    if load is None:
        read_bundle(bundle)  # fail fast, in this process, on a broken bundle
    elif cfg.videos:
        raise LingbotError("evaluate: videos need a world-model bundle (its imagined video)")
    known = set(task_names())
    for task in cfg.tasks:
        if task not in known:
            raise LingbotError(f"evaluate: unknown task {task!r} (e.g. drawer-open-v3, aloha-transfer-cube)")
    if cfg.episodes < 1:
        raise LingbotError("evaluate: episodes must be >= 1")
    jobs = [(task, cfg.seed + i, cfg, i < cfg.videos) for task in cfg.tasks for i in range(cfg.episodes)]
    if cluster is not None:
        from lingbot.cluster import fan_out

        results = fan_out(rollout, [(str(bundle), cfg.threads, load, job) for job in jobs], cluster, "evaluate-episode")
    else:
        results = _rollout_pool(bundle, jobs, max(1, min(cfg.workers, len(jobs))), cfg.threads, load, progress)
    results.sort(key=lambda r: (cfg.tasks.index(r["task"]), r["seed"]))
    with atomic_dir(Path(out)) as tmp:
        (tmp / "videos").mkdir(parents=True)
        recorded = [r for r in results if "frames" in r]
        if recorded:
            write_videos(recorded, tmp / "videos")
        write_json(tmp / "episodes.json", [{k: v for k, v in r.items() if k not in ("frames", "imagined")
                                            and not is_timing(k)} for r in results])
        write_json(tmp / "timings.json", [{k: v for k, v in r.items() if k in ("task", "seed") or is_timing(k)}
                                          for r in results])
    return summarize(results, cfg.tasks)


def summarize(results: list[dict], tasks: tuple[str, ...]) -> dict:
    """Flat metrics: overall and `<task>/...` success rates with Wilson intervals, length, latency, Hz."""
    def block(rows: list[dict]) -> dict:
        metrics = success_metrics([r["success"] for r in rows]) | {
            "mean_episode_length": float(np.mean([r["length"] for r in rows]))}
        if rows and all("presses" in r for r in rows):  # memory task: episodes by presses made (3: 3 or more)
            for n in range(4):
                metrics[f"episodes_{n}_presses"] = sum(min(r["presses"], 3) == n for r in rows)
        return metrics

    latencies = np.array([x for r in results for x in r["latency_ms"]])
    summary = block(results) | {
        "latency_ms_mean": round(float(latencies.mean()), 2),
        "latency_ms_p95": round(float(np.percentile(latencies, 95)), 2),
        "control_hz": round(sum(r["length"] for r in results) / sum(r["wall_s"] for r in results), 2),
    }
    for task in tasks:
        for key, value in block([r for r in results if r["task"] == task]).items():
            summary[f"{task}/{key}"] = value
    return summary


def write_videos(recorded: list[dict], out: Path) -> None:
    """MP4 per recorded episode: real frames of the first camera over the session's imagined video."""
    import av

    for r in recorded:
        real, imagined = r["frames"], r["imagined"]
        n = min(len(real), len(imagined))
        frames = np.concatenate([real[:n], imagined[:n]], axis=1)  # (n, 2H, W, 3)
        path = out / f"{r['task']}-{r['seed']}.mp4"
        with av.open(str(path), "w") as container:
            # One encoder thread: x264's output depends on its thread count (by default, the cores).
            stream = container.add_stream("libx264", rate=10, options={"threads": "1"})
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "yuv420p"
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)


def write_plots(summary: dict, results_dir: Path, tasks: tuple[str, ...], tasks_tsv: Path, latency_tsv: Path,
                error_tsv: Path | None = None, simulated: bool = True) -> None:
    """DVC plots: per-task success bars (and each task's open-loop action error), the mean policy
    latency per chunk index, and the open-loop action error per horizon step (`error_tsv`).

    `tasks`: the simulated ones; none (offline evaluation) lists the tasks scored open loop, without
    success columns. `results_dir` holds the timings.json the latencies come from.
    """
    from lingbot.fsutil import atomic_file

    def fmt(key: str, spec: str = ".4f") -> str:
        return format(summary[key], spec) if key in summary else "nan"

    offline_tasks = sorted({k[len("offline/"):].rpartition("/")[0] for k in summary
                            if k.startswith("offline/") and k.endswith("/task_action_error")})
    rows = [(t, task_description(t) if simulated else t) for t in tasks] or [(t, t) for t in offline_tasks]
    with atomic_file(tasks_tsv) as tmp:
        lines = ["task\tsuccess_rate\tci_low\tci_high\tepisodes\taction_error"]
        lines += [f"{t}\t{fmt(f'{t}/success_rate')}\t{fmt(f'{t}/success_ci_low')}\t{fmt(f'{t}/success_ci_high')}\t"
                  f"{fmt(f'{t}/episodes', 'g')}\t{fmt(f'offline/{d}/task_action_error', '.5f')}" for t, d in rows]
        tmp.write_text("\n".join(lines) + "\n")
    episodes = json.loads((results_dir / "timings.json").read_text())
    longest = max((len(e["latency_ms"]) for e in episodes), default=0)
    with atomic_file(latency_tsv) as tmp:
        lines = ["chunk\tlatency_ms\tepisodes"]
        for k in range(longest):
            values = [e["latency_ms"][k] for e in episodes if len(e["latency_ms"]) > k]
            lines.append(f"{k}\t{np.mean(values):.3f}\t{len(values)}")
        tmp.write_text("\n".join(lines) + "\n")
    if error_tsv is not None:
        steps = sorted(int(k.rpartition("step")[2]) for k in summary if k.startswith("offline/action_error_step"))
        with atomic_file(error_tsv) as tmp:
            lines = ["step\taction_error"] + [f"{i}\t{summary[f'offline/action_error_step{i}']:.5f}" for i in steps]
            tmp.write_text("\n".join(lines) + "\n")
