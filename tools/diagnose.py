"""Closed-loop diagnostics behind docs/experiments.md ("What push's gap is"): where a policy that
predicts held-out demonstrations well fails in closed loop.

    .ci/env python -m tools.diagnose demo-seeds models/policy [--bc] [--task push-v3]
    .ci/env python -m tools.diagnose latent-bc . [--task push-v3]

`demo-seeds`: roll the bundle out from the seeds the task's demonstrations were collected from
(`collect.seed`, attempts 0..episodes-1: the initial scenes it was trained on, the expert's rare
failures among them) instead of the held-out 100000+. A policy that fails there fails to reproduce
its own training scenes, which no lack of generalisation explains.

`latent-bc`: a reactive policy on the workspace's VAE latents: the latent frame the next chunk starts
from (every phase of every fine-tuning demo, encoded as `cache_latents` does) read by the world model's
keypoint stack (`lingbot.model.keypoints.LatentKeypoints`) and a flat projection, with the robot state,
into an MLP regressing the chunk's 4 actions under an L1 loss: plain BC's recipe on the latents instead
of the pixels. No history, no video prediction, no flow matching. Rolled out with the streaming
encoder, as a session grounds frames, on the demo seeds and on `evaluate`'s held-out seeds.

Each prints a table and a final JSON line. Workspace paths follow dvc.yaml (params.yaml, data/demos,
models/vae).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lingbot.eval.metrics import success_metrics


def demo_seed_list(params: Path, task: str) -> list[int]:
    from lingbot.config import load_run_config
    from lingbot.data.collect import attempt_seed

    cfg = load_run_config(params).collect
    return [attempt_seed(cfg.seed, task, a) for a in range(cfg.episodes)]


def demo_seeds(bundle: Path, task: str, params: Path, bc: bool) -> dict:
    from lingbot.config import load_run_config
    from lingbot.sim import evaluate as sim

    load = None
    if bc:
        from lingbot.baselines.bc import load_bc as load
    eval_cfg = load_run_config(params).evaluate
    seeds = demo_seed_list(params, task)
    jobs = [(task, seed, eval_cfg, False) for seed in seeds]
    results = sim._rollout_pool(bundle, jobs, max(1, eval_cfg.workers), eval_cfg.threads, load, False)
    ok = {r["seed"]: r["success"] for r in results}
    return {"task": task, "bundle": str(bundle), **success_metrics([ok[s] for s in seeds], prefix="demo_seeds/"),
            "per_seed": [int(ok[s]) for s in seeds]}


class LatentBC(nn.Module):
    """Latent frame (B, cams, z, h, w) + normalised state (B, S) -> normalised actions (B, K, A)."""

    def __init__(self, cams: int, z: int, h: int, w: int, state_dim: int, K: int, A: int, channels: int = 64):
        from lingbot.model.keypoints import LatentKeypoints

        super().__init__()
        self.K, self.A = K, A
        self.keypoints = LatentKeypoints(z, channels)
        self.flat = nn.Linear(cams * z * h * w, 128)
        self.head = nn.Sequential(nn.Linear(cams * 2 * channels + 128 + state_dim, 256), nn.ReLU(),
                                  nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, K * A))

    def forward(self, latent: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        features = [self.keypoints(latent), torch.relu(self.flat(latent.flatten(1))), state]
        return self.head(torch.cat(features, 1)).view(-1, self.K, self.A)


def latent_samples(workspace: Path, task: str, phases: int = 4):
    """(latents, start states, next chunks' actions) of every train episode of `task`, raw units."""
    from lingbot.data.latents import align_episode, latent_alignment
    from lingbot.data.lerobot_io import episode_tasks, iter_episode_frames, open_layout, read_state_action
    from lingbot.sim.suite import task_description
    from lingbot.vae.wan import encode_clip, load_vae, to_pixels

    demos = workspace / "data" / "demos"
    keys = json.loads((demos / "lingbot.json").read_text())["keys"]
    layout = open_layout(demos / "dataset")
    vae = load_vae(workspace / "models" / "vae")
    train = json.loads((demos / "split.json").read_text())["train"]
    of_task = episode_tasks(layout)
    episodes = [e for e in train if of_task[e] == task_description(task)]
    index, states, actions = read_state_action(layout, keys["state"], keys["action"])
    X, S, Y = [], [], []
    for e in episodes:
        clips = [next(iter(iter_episode_frames(layout, c, [e])))[1] for c in keys["cameras"]]
        a, s = actions[index == e].astype(np.float32), states[index == e].astype(np.float32)
        for p in range(phases):  # the episode from dataset frame p on, as latents.phases encodes it
            video, n = latent_alignment(len(a) - p, 1)
            latent = torch.stack([encode_clip(vae, to_pixels(c[p + video]))[0].transpose(0, 1) for c in clips], 1)
            chunk_actions, _, start_states = align_episode(a[p:], s[p:], 1)
            for j in range(n - 1):
                X.append(latent[j])
                S.append(start_states[j])
                Y.append(chunk_actions[j + 1])
    return vae, keys, torch.stack(X).float(), np.stack(S), np.stack(Y), len(episodes)


def latent_bc(workspace: Path, task: str, steps: int = 3000, seed: int = 0) -> dict:
    from lingbot.config import load_run_config
    from lingbot.data.normalization import normalize, unnormalize
    from lingbot.sim.suite import camera_names, make_env
    from lingbot.vae.wan import StreamingEncoder, to_pixels

    torch.manual_seed(seed)
    t0 = time.perf_counter()
    vae, keys, X, S_raw, Y_raw, n_episodes = latent_samples(workspace, task)
    stats = json.loads((workspace / "data" / "demos" / "stats.json").read_text())
    s_stats, a_stats = stats[keys["state"]], stats[keys["action"]]
    S = torch.from_numpy(normalize(S_raw, s_stats)).float()
    Y = torch.from_numpy(normalize(Y_raw, a_stats)).float()
    net = LatentBC(*X.shape[1:], S.shape[1], *Y.shape[1:])
    opt = torch.optim.AdamW(net.parameters(), 1e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = 1e-3 * 0.5 * (1 + np.cos(np.pi * step / steps))
        rows = torch.randint(0, len(X), (64,), generator=g)
        loss = (net(X[rows], S[rows]) - Y[rows]).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    train_s = time.perf_counter() - t0
    params = workspace / "params.yaml"
    cfg = load_run_config(params)
    cams = camera_names(keys["cameras"])

    def rollout(episode_seed: int) -> bool:
        env = make_env(task, cfg.collect.image_size, cams, cfg.collect.image_size)
        encoder = StreamingEncoder(vae)
        raw, steps_done, success = env.reset(episode_seed), 0, False

        def frame():
            images = env.render()
            return to_pixels(np.stack([images[c] for c in cams])[:, None])[:, :, 0]

        latent = encoder.push(frame())
        while steps_done < cfg.evaluate.max_steps and not success:
            with torch.no_grad():
                state = torch.from_numpy(normalize(env.state(raw)[None].astype(np.float32), s_stats)).float()
                chunk = unnormalize(net(latent[None], state)[0].numpy(), a_stats)
            for action in chunk:
                raw, reached = env.step(env.clip(action), cfg.collect.action_repeat)
                steps_done += 1
                success = success or reached
                if success or steps_done >= cfg.evaluate.max_steps:
                    break
                out = encoder.push(frame())  # a latent frame after every 4th frame: the next chunk's start
                latent = latent if out is None else out
        env.close()
        return success

    demo = [rollout(s) for s in demo_seed_list(params, task)]
    held_out = [rollout(cfg.evaluate.seed + i) for i in range(cfg.evaluate.episodes)]
    return {"task": task, "demos": n_episodes, "samples": len(X), "steps": steps, "final_loss": round(loss.item(), 4),
            "train_s": round(train_s, 1), **success_metrics(held_out),
            **success_metrics(demo, prefix="demo_seeds/"), "held_out_seed": cfg.evaluate.seed}


def main(argv: list[str] | None = None) -> None:
    warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high")
    parser = argparse.ArgumentParser(prog="tools.diagnose", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo-seeds", help="roll a bundle out from its demonstrations' own seeds")
    p.add_argument("bundle", type=Path)
    p.add_argument("--bc", action="store_true", help="the bundle is plain BC's (models/baselines/bc)")
    p.add_argument("--task", default="push-v3")
    p.add_argument("--params", type=Path, default=Path("params.yaml"))
    p = sub.add_parser("latent-bc", help="a reactive policy on the workspace's VAE latents")
    p.add_argument("workspace", type=Path)
    p.add_argument("--task", default="push-v3")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    if args.command == "demo-seeds":
        result = demo_seeds(args.bundle, args.task, args.params, args.bc)
    else:
        result = latent_bc(args.workspace, args.task)
    print("| what | successes |\n|---|---|")
    for key in ("", "demo_seeds/"):
        if f"{key}success_rate" in result:
            n = result[f"{key}episodes"]
            print(f"| {key.rstrip('/').replace('_', ' ') or 'held-out seeds'} | {round(result[f'{key}success_rate'] * n)}/{n} "
                  f"[{result[f'{key}success_ci_low']}, {result[f'{key}success_ci_high']}] |")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
