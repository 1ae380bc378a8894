"""Offline evaluation: a policy scored open loop on the held-out episodes of its own dataset.

For a robot with no simulator that matches its data, the held-out episodes of the split are the test
set. Per episode the recorded camera frames and states stream into a policy session exactly as a
robot's would (`infer` at each chunk boundary, `observe` in between); the chunk returned at boundary
t is compared with the recorded actions t..t+K-1, and the recorded actions (not the predicted ones)
are what the session grounds as executed (`Session.correct_executed`), so the history stays the
real one at every step: the error of chunk k is not compounded by the errors before it.

Metrics (`summarize`), all over every scored chunk of every held-out episode:

    action_error                   mean |predicted - recorded| in normalised units (the dataset's
                                   q01..q99 mapped to -1..1): the publish gate's figure
    action_error_step<i>           the same per horizon step i = 1..K (error grows along the chunk)
    action_error/<joint>           per action channel, normalised; action_error_robot/<joint> in the
                                   robot's own units (the dataset's, e.g. rad or m)
    <task>/task_action_error       per task (the task's instruction)
    imagined_psnr_db               the imagined video, decoded, against the real camera frames it
                                   foresaw (every camera); reconstruction_psnr_db is the VAE's own
                                   ceiling (the real latents decoded) on the same frames
    latency_ms_mean / _p95         per chunk (timings: kept out of the hashed results)

Outputs (directory `out`)::

    episodes.json          per episode: task, episode index, chunks, action error, PSNRs
    timings.json           per episode: per-chunk latency (ms)
    figures/episode-<e>.png  recorded (grey) and predicted (one colour per chunk) action per joint
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lingbot.errors import LingbotError
from lingbot.fsutil import atomic_dir, atomic_file, write_json


def held_out_episodes(demos: Path, layout, tasks: tuple[str, ...] = (), limit: int = 0) -> list[tuple[int, str]]:
    """(episode index, task) of the split's held-out episodes (`layout`: the ingested dataset's), of
    `tasks` only when given."""
    from lingbot.data.lerobot_io import episode_tasks

    split = Path(demos) / "split.json"
    if not split.is_file():
        raise LingbotError(f"{split}: missing; offline evaluation needs the ingested split (run ingest)")
    task_of = episode_tasks(layout)
    val = [int(e) for e in json.loads(split.read_text())["val"]]
    known = set(task_of[e] for e in val)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise LingbotError(f"offline evaluation: no held-out episode of task {unknown[0]!r} in {split} "
                           f"(held-out tasks: {', '.join(sorted(known)) or 'none'})")
    chosen = [(e, task_of[e]) for e in sorted(val) if not tasks or task_of[e] in tasks]
    if not chosen:
        raise LingbotError(f"{split}: no held-out episodes to evaluate on (raise ingest.val_fraction)")
    return chosen[:limit] if limit else chosen


def _read_episode(layout, keys: dict, table: tuple, episode: int) -> dict:
    """Recorded frames per camera (T, H, W, 3), states (T, S) and actions (T, A) of one episode;
    `table`: read_state_action's (episode index, states, actions) of the whole dataset."""
    from lingbot.data.lerobot_io import iter_episode_frames

    index, states, actions = table
    frames = {}
    for camera in keys["cameras"]:
        for _, video, error in iter_episode_frames(layout, camera, [episode]):
            if error:
                raise LingbotError(error)
            frames[camera] = video
    rows = index == episode
    T = min([int(rows.sum())] + [len(v) for v in frames.values()])
    return {"frames": {c: v[:T] for c, v in frames.items()}, "states": states[rows][:T].astype(np.float32),
            "actions": actions[rows][:T].astype(np.float32)}


def score_episode(policy, task: str, recorded: dict, seed: int, decode: bool = True) -> dict:
    """Stream one recorded episode through a session of `policy`; per-chunk errors and the PSNRs."""
    K = policy.K
    frames, states, actions = recorded["frames"], recorded["states"], recorded["actions"]
    T = len(actions)
    if T < K + 1:
        raise LingbotError(f"offline evaluation: episode of {T} frames is shorter than one chunk ({K} actions)")
    session = policy.new_session(task, seed=seed)

    def observation(t: int) -> dict:
        return {**{c: frames[c][t] for c in policy.cameras}, policy.state_key: states[t]}

    predicted, starts = [], []
    try:
        for t in range(0, T - K + 1, K):  # every boundary with a whole recorded chunk after it
            for u in range(max(0, t - K + 1), t):
                session.observe(observation(u))
            predicted.append(session.infer(observation(t)))
            session.correct_executed(actions[t : t + K])
            starts.append(t)
        result = {"predicted": np.stack(predicted), "recorded": np.stack([actions[t : t + K] for t in starts]),
                  "starts": starts, "latency_ms": [round(x, 3) for x in session.latency_ms]}
        if decode:
            result |= _psnr(policy, session, frames)
        return result
    finally:
        session.close()


def _psnr(policy, session, frames: dict) -> dict:
    """Imagined and reconstructed video against the real frames they stand for, every camera."""
    n = session.chunk  # grounded chunks: the imagined video's chunk k foresaw the real chunk k
    if n < 2:
        return {}
    stride = policy.frame_stride
    out = {}
    compared = [("imagined_psnr_db", session.imagined_video), ("reconstruction_psnr_db", session.reconstructed_video)]
    if not policy.model.cfg.video_prediction:  # the no-video ablation imagines nothing
        compared = compared[1:]
    for name, decoded in compared:
        errors = []
        for c, camera in enumerate(policy.cameras):
            video = decoded(c, chunks=n)
            index = np.arange(1, len(video)) * stride  # frame 0 is the real first frame in both
            keep = index < len(frames[camera])
            truth = frames[camera][index[keep]].astype(np.float64)
            errors.append(((video[1:][keep].astype(np.float64) - truth) ** 2).mean())
        out[name] = float(10 * np.log10(255.0**2 / max(float(np.mean(errors)), 1e-10)))
    return out


def evaluate_offline(bundle: Path, demos: Path, out: Path, tasks: tuple[str, ...] = (), episodes: int = 0,
                     seed: int = 100_000, figures: int = 2, progress: bool = True, policy=None,
                     missing_ok: bool = False) -> dict:
    """Score `bundle` on the held-out episodes of `demos` (see the module docstring); returns the summary.
    `missing_ok`: no held-out episode of `tasks` (a split without validation episodes) scores nothing
    and returns {} instead of failing (the closed-loop evaluation still ran)."""
    from lingbot.progress import progress_bar

    from lingbot.data.lerobot_io import channel_names, open_layout, read_state_action
    from lingbot.policy.runtime import load_policy

    demos = Path(demos)
    policy = policy or load_policy(bundle)
    manifest = json.loads((demos / "lingbot.json").read_text())
    keys = manifest["keys"]
    if list(keys["cameras"]) != list(policy.cameras) or keys["action"] != policy.meta["action_key"]:
        raise LingbotError(f"{demos}: cameras {keys['cameras']} / action {keys['action']!r} are not the policy's "
                           f"({policy.cameras} / {policy.meta['action_key']!r})")
    layout = open_layout(demos / "dataset")
    try:
        chosen = held_out_episodes(demos, layout, tasks, episodes)
    except LingbotError:
        if missing_ok:
            return {}
        raise
    table = read_state_action(layout, keys["state"], keys["action"])
    names = channel_names((manifest.get("names") or {}).get(keys["action"]), policy.meta["action_dim"])
    results = []
    for i, (episode, task) in enumerate(progress_bar(progress, iterable=chosen, desc="offline", unit="episode")):
        scored = score_episode(policy, task, _read_episode(layout, keys, table, episode), seed + i)
        scored |= {"episode": episode, "task": task}
        scored["errors"], scored["robot_errors"] = _errors(policy, scored)
        results.append(scored)
    with atomic_dir(Path(out)) as tmp:
        (tmp / "figures").mkdir(parents=True)
        for r in results[:figures]:
            plot_episode(r, names, tmp / "figures" / f"episode-{r['episode']}.png")
        write_json(tmp / "episodes.json", [_episode_record(r) for r in results])
        write_json(tmp / "timings.json", [{"episode": r["episode"], "latency_ms": r["latency_ms"]} for r in results])
    return summarize(results, names)


def _errors(policy, r: dict) -> tuple[np.ndarray, np.ndarray]:
    """(chunks, K, A) absolute errors in normalised and in robot units."""
    A = policy.meta["action_dim"]
    to_model = policy.layout.to_model
    pred, rec = r["predicted"], r["recorded"]
    normalised = np.abs(np.stack([to_model(p)[:, :A] - to_model(q)[:, :A] for p, q in zip(pred, rec)]))
    return normalised, np.abs(pred - rec)


def _episode_record(r: dict) -> dict:
    record = {"task": r["task"], "episode": r["episode"], "chunks": len(r["starts"]),
              "action_error": round(float(r["errors"].mean()), 5)}
    return record | {k: round(r[k], 3) for k in ("imagined_psnr_db", "reconstruction_psnr_db") if k in r}


def summarize(results: list[dict], names: list[str]) -> dict:
    """Flat metrics (module docstring), with the timings under their `latency_ms` keys; `results`
    carry their `_errors` (errors, robot_errors)."""
    normalised = np.concatenate([r["errors"] for r in results])  # (chunks, K, A)
    robot = np.concatenate([r["robot_errors"] for r in results])
    summary = {"episodes": len(results), "chunks": int(len(normalised)),
               "action_error": round(float(normalised.mean()), 5)}
    for i, value in enumerate(normalised.mean(axis=(0, 2)), 1):
        summary[f"action_error_step{i}"] = round(float(value), 5)
    for j, name in enumerate(names):
        summary[f"action_error/{name}"] = round(float(normalised[..., j].mean()), 5)
        summary[f"action_error_robot/{name}"] = round(float(robot[..., j].mean()), 6)
    for task in sorted({r["task"] for r in results}):
        rows = [r["errors"] for r in results if r["task"] == task]
        summary[f"{task}/task_action_error"] = round(float(np.concatenate(rows).mean()), 5)
    for key in ("imagined_psnr_db", "reconstruction_psnr_db"):
        values = [r[key] for r in results if key in r]
        if values:
            summary[key] = round(float(np.mean(values)), 3)
    latencies = np.array([x for r in results for x in r["latency_ms"]])
    summary["latency_ms_mean"] = round(float(latencies.mean()), 2)
    summary["latency_ms_p95"] = round(float(np.percentile(latencies, 95)), 2)
    return summary


def plot_episode(r: dict, names: list[str], path: Path) -> None:
    """PNG: per joint, the recorded action (grey) and each predicted chunk (coloured) over time."""
    from PIL import Image, ImageDraw

    pred, rec, starts = r["predicted"], r["recorded"], r["starts"]
    K, A = pred.shape[1:]
    T = starts[-1] + K
    truth = np.concatenate(list(rec))  # the recorded actions over the scored span, in order
    cols = min(A, 4)
    rows = -(-A // cols)
    pw, ph, pad = 240, 110, 18
    image = Image.new("RGB", (cols * pw, rows * ph + pad), "white")
    draw = ImageDraw.Draw(image)
    draw.text((4, 2), f"{r['task']} (episode {r['episode']}): recorded grey, predicted chunks coloured", fill="black")
    palette = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]
    for j in range(A):
        x0, y0 = (j % cols) * pw, pad + (j // cols) * ph
        values = np.concatenate([truth[:, j], pred[:, :, j].ravel()])
        lo, hi = float(values.min()), float(values.max())
        span = hi - lo if hi > lo else 1.0

        def xy(t, v):
            return (x0 + 6 + (pw - 12) * t / max(1, T - 1), y0 + ph - 8 - (ph - 24) * (v - lo) / span)

        draw.rectangle([x0 + 2, y0 + 14, x0 + pw - 3, y0 + ph - 3], outline=(200, 200, 200))
        draw.text((x0 + 6, y0 + 1), names[j] if j < len(names) else f"a{j}", fill="black")
        draw.line([xy(t, truth[t, j]) for t in range(len(truth))], fill=(150, 150, 150), width=2)
        for c, s in enumerate(starts):
            points = [xy(s + i, pred[c, i, j]) for i in range(K)]
            draw.line(points, fill=palette[c % len(palette)], width=1)
    with atomic_file(path) as tmp:
        image.save(tmp, format="PNG")
