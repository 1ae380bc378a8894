"""Benchmarks: `lingbot bench WHAT` prints a table, then one JSON object as its last line."""

from __future__ import annotations

import dataclasses
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np


def _table(rows: list[tuple[str, object]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def bench_data(episodes: int, workers: int) -> dict:
    """collect -> ingest -> validate on the default tasks and cameras, `episodes` per task."""
    from lingbot.config import preset
    from lingbot.data.collect import collect
    from lingbot.data.ingest import ingest
    from lingbot.data.validate import validate

    cfg = preset("small")
    collect_cfg = dataclasses.replace(cfg.collect, episodes=episodes, workers=workers)
    with tempfile.TemporaryDirectory(prefix="lingbot-bench-") as tmp:
        tmp = Path(tmp)
        collected = collect(collect_cfg, tmp / "collected", progress=False)
        ingested = ingest(dataclasses.replace(cfg.ingest, source=str(tmp / "collected")), tmp / "demos")
        validated = validate(tmp / "demos", cfg.validate)
    if not validated["success"]:
        raise RuntimeError("bench data: the collected dataset failed validation: " + validated["failures_text"][0])
    return {
        "bench": "data",
        "tasks": len(collect_cfg.tasks),
        "episodes": collected["episodes"],
        "frames": collected["frames"],
        "cameras": len(collect_cfg.cameras),
        "image_size": collect_cfg.image_size,
        "workers": workers,
        "collect_seconds": collected["seconds"],
        "collect_frames_per_s": collected["collect_frames_per_s"],
        "render_images_per_s_per_core": collected["render_images_per_s_per_core"],
        "sim_steps_per_s_per_core": collected["sim_steps_per_s_per_core"],
        "ingest_frames": ingested["frames"],
        "validate_seconds": validated["seconds"],
        "validate_frames_per_s": validated["validate_frames_per_s"],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def _cache_peak_rss(demos: Path, vae_dir: Path, out: Path, episodes: list[int], cfg) -> float:
    """Peak RSS (MB) of a child process that builds the cache for `episodes` only."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_child_cache, (str(demos), str(vae_dir), str(out), episodes, cfg))


def _child_cache(demos, vae_dir, out, episodes, cfg) -> float:
    from lingbot.data.latents import build_cache

    build_cache(Path(demos), Path(vae_dir), Path(out), cfg, progress=False, only=episodes)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_latents(episodes: int, workers: int) -> dict:
    """VAE encode throughput, streaming = batch, cached vs on-the-fly loading, memory vs episode count."""
    import time

    import torch

    from lingbot.config import preset
    from lingbot.data.collect import collect
    from lingbot.data.ingest import ingest
    from lingbot.data.latents import LatentWindows, build_cache
    from lingbot.data.lerobot_io import iter_episode_frames, open_layout
    from lingbot.vae.wan import StreamingEncoder, build_vae, encode_clip, load_vae, to_pixels

    cfg = preset("small")
    with tempfile.TemporaryDirectory(prefix="lingbot-bench-") as tmp:
        tmp = Path(tmp)
        collect(dataclasses.replace(cfg.collect, episodes=episodes, workers=workers), tmp / "collected",
                progress=False)
        ingest(dataclasses.replace(cfg.ingest, source=str(tmp / "collected")), tmp / "demos")
        vae = build_vae(cfg.vae).eval()  # throughput does not depend on training
        vae.save_pretrained(tmp / "vae")
        vae = load_vae(tmp / "vae")
        built = build_cache(tmp / "demos", tmp / "vae", tmp / "latents", cfg.latents, progress=False)

        layout = open_layout(tmp / "demos" / "dataset")
        key = layout.video_keys[0]
        ((_, frames, _),) = list(iter_episode_frames(layout, key, [0]))
        clip = to_pixels(frames[:17])
        whole = encode_clip(vae, clip)
        stream = StreamingEncoder(vae)
        streamed = torch.stack([o for t in range(17) if (o := stream.push(clip[:, :, t])) is not None], dim=2)
        stream_diff = float((streamed - whole).abs().max())

        data = LatentWindows(tmp / "latents", min_chunks=4, max_chunks=4)
        n = 200
        t0 = time.perf_counter()
        for i in range(n):
            data[i % len(data)]
        cached = n / (time.perf_counter() - t0)

        # The same windows computed on the fly: decode the episode's frames and encode the window.
        n_online = 6
        t0 = time.perf_counter()
        for i in range(n_online):
            item = data[i % len(data)]
            first = max(0, 4 * item["start"] - 3)
            for cam in layout.video_keys:
                ((_, frames, _),) = list(iter_episode_frames(layout, cam, [item["episode"]]))
                window = frames[first : 1 + 4 * (item["start"] + len(item["video"]) - 1)]
                encode_clip(vae, to_pixels(window[: 1 + 4 * ((len(window) - 1) // 4)]))
        online = n_online / (time.perf_counter() - t0)

        # The whole cache again on a local Dask cluster of 2 workers through Prefect (lingbot/cluster.py),
        # one job per shard of 2 episodes: the same bytes, and the scaling on this machine's 2 cores.
        from lingbot.config import ClusterConfig
        from lingbot.data.latents import build_cache_on_cluster

        sharded = dataclasses.replace(cfg.latents, episodes_per_shard=2)
        t0 = time.perf_counter()
        one = build_cache(tmp / "demos", tmp / "vae", tmp / "one", sharded, progress=False)
        one_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        two = build_cache_on_cluster(tmp / "demos", tmp / "vae", tmp / "two", sharded, ClusterConfig(workers=2), 1)
        two_s = time.perf_counter() - t0
        same = all((tmp / "one" / f.name).read_bytes() == f.read_bytes() for f in (tmp / "two").iterdir())

        all_eps = sorted(int(e) for e in layout.episodes["episode_index"])
        half = all_eps[: len(all_eps) // 2]
        rss_half = _cache_peak_rss(tmp / "demos", tmp / "vae", tmp / "rss-half", half, cfg.latents)
        rss_full = _cache_peak_rss(tmp / "demos", tmp / "vae", tmp / "rss-full", all_eps, cfg.latents)
    return {
        "bench": "latents",
        "episodes": built["episodes"],
        "frames_encoded": built["frames_encoded"],
        "encode_frames_per_s": built["encode_frames_per_s"],
        "stream_vs_batch_max_abs_diff": stream_diff,
        "loader_samples_per_s_cached": round(cached, 1),
        "loader_samples_per_s_online": round(online, 2),
        "cached_vs_online_speedup": round(cached / online, 1),
        "peak_rss_mb_half_episodes": round(rss_half, 1),
        "peak_rss_mb": round(rss_full, 1),
        "cache_seconds_1_process": round(one_s, 1),
        "cache_seconds_2_dask_workers": round(two_s, 1),
        "cache_frames_per_s_1_process": round(one["frames_encoded"] / one_s, 1),
        "cache_frames_per_s_2_dask_workers": round(two["frames_encoded"] / two_s, 1),
        "cluster_cache_identical": same,
    }


def train_throughput(run_cfg, batch: int, steps: int, device, latent_hw: int = 8, cameras: int = 2) -> dict:
    """Teacher-forced training steps of `run_cfg`'s world model at batch size `batch` on synthetic latents
    of the cache's shapes, bf16 autocast on CUDA, fp32 on a CPU. `bench train` and the GPU run share it."""
    import torch

    from lingbot.model.world_model import WorldModel, count_parameters, draw_noise, flow_matching_loss
    from lingbot.train.loop import make_optimizer

    cfg, tcfg = run_cfg.model, dataclasses.replace(run_cfg.pretrain, batch_size=batch)
    torch.manual_seed(0)
    with torch.device(device):
        model = WorldModel(cfg, cameras=cameras)
    opt = make_optimizer(model, tcfg)
    B, n, K = batch, tcfg.max_chunks, model.K
    g = torch.Generator().manual_seed(0)
    data = {
        "video": torch.randn(B, n, cameras, cfg.latent_channels, latent_hw, latent_hw, generator=g),
        "actions": torch.rand(B, n, K, 7, generator=g) * 2 - 1,
        "action_mask": torch.ones(B, n, K, dtype=torch.bool),
        "task": torch.randn(B, 1, cfg.text_dim, generator=g),
        "start_state": torch.rand(B, n, 4, generator=g) * 2 - 1,
    }
    data = {k: v.to(device) for k, v in data.items()}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step(i):
        noise = draw_noise(data, cfg.action_channels, tcfg.shift, tcfg.history_noise_p, torch.Generator().manual_seed(i))
        with autocast:
            loss = flow_matching_loss(model, data, noise, 7)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for i in range(2):
        step(i)
    sync()
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    sync()
    elapsed = time.perf_counter() - t0
    counts = count_parameters(model)
    Tv = cameras * (latent_hw // cfg.patch[0]) * (latent_hw // cfg.patch[1])
    seq = 2 * n * Tv + 2 * n * K  # noisy + clean copies of video and action tokens
    # Training FLOPs per sample: 6 x params x tokens per expert, plus attention (QK^T and AV, fwd+bwd).
    flops = 6 * (counts["video"] * 2 * n * Tv + counts["action"] * 2 * n * K)
    flops += 3 * 4 * seq * seq * cfg.heads * cfg.head_dim * cfg.depth
    samples_per_s = B * steps / elapsed
    result = {"batch_size": B, "chunks": n, "tokens_per_sample": seq, "params_video": counts["video"],
              "params_action": counts["action"], "step_ms": round(1000 * elapsed / steps, 2),
              "samples_per_s": round(samples_per_s, 2), "tokens_per_s": round(samples_per_s * seq, 1),
              "tflops": round(samples_per_s * flops / 1e12, 4)}
    if device.type == "cuda":
        result["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result


def bench_train(preset_name: str, steps: int = 10, latent_hw: int = 8, cameras: int = 2) -> dict:
    """Teacher-forced training steps of a preset's world model on synthetic latents of cache shapes."""
    import torch

    from lingbot.config import preset

    run_cfg = preset(preset_name)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    measured = train_throughput(run_cfg, run_cfg.pretrain.batch_size, steps, device, latent_hw, cameras)
    result = {"bench": "train", "preset": preset_name,
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", **measured, "mfu": None}
    if device.type == "cuda":  # bf16 dense peak of the card (H100/H200 SXM: 989 TFLOP/s)
        peak = 989e12 if ("H100" in result["device"] or "H200" in result["device"]) else None
        result["mfu"] = round(measured["tflops"] * 1e12 / peak, 3) if peak else None
    return result


def chunk_latency(model, run_cfg, policy_cfg, mode: str, cameras: int, latent_hw: int, histories,
                  repeats: int, diff_history: int, device, reference=None, time_recompute: bool = False) -> dict:
    """Chunk latency of the policy's denoising (`lingbot.policy.runtime`) with `model` as it is, under
    `mode` (fp32, bf16-autocast, bf16-weights: the caller converts the weights), at each history length;
    full and half-way video denoising at the longest; the cached chunk against the no-cache recompute at
    `diff_history` chunks (timed too with `time_recompute`). `bench realtime` and the GPU run share it."""
    import statistics

    import torch

    from lingbot.model.world_model import KVCache
    from lingbot.policy.runtime import chunk_noise, denoise_chunk, recompute_sequence, write_history

    K, A, z = model.K, run_cfg.model.action_channels, run_cfg.model.latent_channels
    S = run_cfg.model.state_channels
    g = torch.Generator().manual_seed(0)
    text = torch.randn(1, 1, run_cfg.model.text_dim, generator=g).to(device)
    longest, chunks = max(histories), max(*histories, diff_history)
    real = torch.randn(1, chunks, cameras, z, latent_hw, latent_hw, generator=g).to(device)
    executed = (torch.rand(1, chunks, K, A, generator=g) * 2 - 1).to(device)
    states = (torch.rand(1, chunks + 1, S, generator=g) * 2 - 1).to(device) if S else None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode != "fp32")

    def start(k):
        return None if states is None else states[:, k]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn) -> float:
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append((time.perf_counter() - t0) * 1000)
        return round(statistics.median(times), 2)

    out = {}
    with torch.no_grad(), autocast:
        ctx = model.encode_text(text)
        for hist in sorted(set(histories) | {diff_history}):
            cache = KVCache(run_cfg.model.depth)
            for k in range(hist):
                write_history(model, cache, k, ctx, real[:, k], executed[:, k], policy_cfg.history_chunks,
                              state=start(k))
            x, a, _ = chunk_noise(torch.Generator().manual_seed(hist), real.shape[2:], K, A, device)

            def cached(cfg=policy_cfg, cache=cache, hist=hist, x=x, a=a):
                size = len(cache)
                actions, imagined = denoise_chunk(model, cache, hist, ctx, x, a, cfg, start(hist))
                cache.truncate(size)  # drop the imagined chunk: the next repeat starts alike
                return actions, imagined

            if hist in histories:
                out[f"latency_ms_hist{hist}"] = timed(cached)
            if hist == longest:
                full = dataclasses.replace(policy_cfg, video_exec_step=policy_cfg.video_steps)
                half = dataclasses.replace(policy_cfg, video_exec_step=max(1, policy_cfg.video_steps // 2))
                out["latency_ms_full_video_denoise"] = timed(lambda: cached(cfg=full))
                out["latency_ms_half_video_denoise"] = timed(lambda: cached(cfg=half))
            if hist == diff_history:
                history = None if states is None else states[:, : hist + 1]

                def recompute(hist=hist, x=x, a=a, history=history):
                    return recompute_sequence(model, real[:, :hist], executed[:, :hist], text, x, a, policy_cfg,
                                              history)

                if time_recompute:
                    out[f"recompute_latency_ms_hist{hist}"] = timed(recompute)
                ref_actions, ref_x = recompute()
                actions, imagined = cached()
                out["cache_vs_recompute_max_abs_diff_actions"] = float(abs(actions - ref_actions).max())
                out["cache_vs_recompute_max_abs_diff_video"] = float((imagined.float() - ref_x.float()).abs().max())
                out["_actions"] = actions
    if reference is not None and "_actions" in out:
        out["actions_max_abs_diff_vs_fp32"] = float(abs(out["_actions"] - reference).max())
    out["partial_denoise_speedup"] = round(out["latency_ms_full_video_denoise"] / out["latency_ms_half_video_denoise"], 3)
    return out



def bench_realtime(preset_name: str, repeats: int = 5, latent_hw: int = 8, cameras: int = 2,
                   histories: tuple[int, ...] = (1, 32)) -> dict:
    """Chunk latency of the policy's denoising with the KV cache at several history lengths, against
    recomputing the whole sequence without a cache, and full vs partial (stopped half way) video denoising.

    Model part only (random weights of the preset's shapes; the VAE's per-frame encode is separate):
    what a robot waits for between sending its boundary frame and receiving the action chunk.
    """
    import torch

    from lingbot.config import preset
    from lingbot.model.world_model import WorldModel

    run_cfg = preset(preset_name)
    cfg = dataclasses.replace(run_cfg.policy, history_chunks=0)  # the whole history: what is measured
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = WorldModel(run_cfg.model, cameras=cameras).to(device).eval()
    for head in (model.video_out, model.action_out, model.state_in):  # trained heads are not zero: nor are these
        if head is not None:
            torch.nn.init.normal_(head.weight, std=0.02)
    K, longest = model.K, max(histories)
    result = {"bench": "realtime", "preset": preset_name,
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "video_steps": cfg.video_steps, "video_exec_step": cfg.video_exec_step,
              "action_steps": cfg.action_steps, "tokens_per_chunk": cameras * (latent_hw // 2) ** 2 + K}
    result |= chunk_latency(model, run_cfg, cfg, "fp32", cameras, latent_hw, histories, repeats, longest, device,
                            time_recompute=True)
    result.pop("_actions", None)
    h1, hl = result[f"latency_ms_hist{histories[0]}"], result[f"latency_ms_hist{longest}"]
    result[f"hist{longest}_over_hist{histories[0]}"] = round(hl / h1, 3)
    result["recompute_over_cached"] = round(result[f"recompute_latency_ms_hist{longest}"] / hl, 2)
    chunk_s = K / 40  # the embedded default records at 40 Hz
    result["realtime_factor_at_40hz"] = round(1000 * chunk_s / hl, 2)
    return result


def bench_bc(params: Path, steps: int | None, episodes: int | None, workers: int, seeds: list[int],
             targets: list[str], out: Path, demos: int | None = None) -> dict:
    """Plain image BC against the world model, per target, over chain seeds: the quality table.

    For each target (the params' evaluation tasks when none is given) and chain seed, the world model's
    recipe runs through `bench_seeds` (the dvc repro run stands for the params' own seed on its own
    tasks) and plain BC (`lingbot/baselines/bc.py`, seeded by the chain seed) trains on the same
    fine-tuning demos (the first `demos` of them when set); both are scored on the same held-out
    episodes. Runs are kept under `out/seed-<s>/<run_name>/` (BC in `bc/`) and not redone. Reads the
    workspace's data/demos, data/latents and models/vae: run `dvc repro` first.
    """
    from lingbot.baselines.bc import BCConfig, load_bc, load_demos, save_bc, train_bc
    from lingbot.config import chain_seeds, load_run_config
    from lingbot.fsutil import write_json
    from lingbot.sim.evaluate import evaluate, wilson_interval

    run_cfg = load_run_config(params)
    own = tuple(run_cfg.evaluate.tasks)
    result, per_target = {"bench": "bc", "seeds": ",".join(map(str, seeds))}, {}
    for target in targets or ["-".join(own)]:
        target_cfg = retarget(run_cfg, None if target == "-".join(own) else target, demos)
        tasks, finetune = tuple(target_cfg.evaluate.tasks), target_cfg.finetune
        key = run_name(tasks, demos)
        eval_cfg = dataclasses.replace(target_cfg.evaluate, videos=0, workers=workers,
                                       episodes=episodes or run_cfg.evaluate.episodes)
        with_run = tasks == own and run_cfg.seed in seeds and demos is None
        wm = bench_seeds(params, [s for s in seeds if not (with_run and s == run_cfg.seed)], workers, out,
                         with_run, None if tasks == own else target, episodes=eval_cfg.episodes, demos=demos)
        data = None
        bc_rows = []
        for seed in seeds:
            path = Path(out) / f"seed-{seed}" / key / "bc" / "result.json"
            if not path.is_file():
                seeded = chain_seeds(run_cfg, seed, sections=("finetune",)).finetune.seed
                cfg = BCConfig(seed=seeded) if steps is None else BCConfig(steps=steps, seed=seeded)
                data = data or load_demos(Path("data/demos"), Path("data/latents"), finetune, cfg.chunk)
                model, losses, seconds = train_bc(data, cfg, progress=False)
                save_bc(model, data, cfg, path.parent / "policy")
                summary = evaluate(path.parent / "policy", eval_cfg, path.parent / "eval", progress=False, load=load_bc)
                write_json(path, {"seed": seed, "bc_seed": seeded, "steps": cfg.steps, "batch_size": cfg.batch_size,
                                  "params": sum(p.numel() for p in model.parameters()),
                                  "demos": len(data["episodes"]), "train_seconds": round(seconds, 1),
                                  "final_loss": round(float(np.mean(losses[-50:])), 4),
                                  "success_rate": summary["success_rate"], "episodes": summary["episodes"]})
            bc_rows.append(json.loads(path.read_text()))
        entry = {"demos": bc_rows[0]["demos"], "eval_seed": eval_cfg.seed, "episodes": eval_cfg.episodes}
        for name, rows in (("wm", wm["per_seed"]), ("bc", bc_rows)):
            wins = [round(r["success_rate"] * r["episodes"]) for r in rows]
            rates = np.array([r["success_rate"] for r in rows])
            low, high = wilson_interval(sum(wins), sum(r["episodes"] for r in rows))
            entry |= {f"{name}_success": round(float(rates.mean()), 4),
                      f"{name}_std": round(float(rates.std(ddof=1)), 4) if len(rows) > 1 else None,
                      f"{name}_wins_per_seed": wins, f"{name}_ci_low": round(low, 4), f"{name}_ci_high": round(high, 4)}
            seconds = [r["train_seconds"] for r in rows if r.get("train_seconds")]
            entry[f"{name}_train_seconds"] = round(float(np.mean(seconds)), 1) if seconds else None
        if entry["wm_train_seconds"] is None:  # the dvc repro run alone: its pretrain + finetune time
            entry["wm_train_seconds"] = round(sum(world_model_train_seconds(run_cfg).values()), 1) or None
        per_target[key] = entry
        for name in ("wm", "bc"):
            result[f"{key} {name}"] = (f"{entry[f'{name}_success']:.2f} over {len(seeds)} seed(s) "
                                       f"{entry[f'{name}_wins_per_seed']}, pooled [{entry[f'{name}_ci_low']:.2f}, "
                                       f"{entry[f'{name}_ci_high']:.2f}]")
    result["targets"] = per_target
    return result


def retarget(run_cfg, target: str | None, demos: int | None = None):
    """The run with MetaWorld task `target` as its fine-tuning and evaluation task (None: as it is),
    fine-tuned on its first `demos` training episodes (None: finetune.max_episodes_per_task as it is)."""
    from lingbot.sim.metaworld import task_description

    if demos is not None:
        if demos < 1:
            from lingbot.errors import LingbotError

            raise LingbotError(f"--demos {demos}: fine-tune on at least 1 demo")
        run_cfg = dataclasses.replace(run_cfg, finetune=dataclasses.replace(run_cfg.finetune,
                                                                            max_episodes_per_task=demos))
    if not target or (target,) == tuple(run_cfg.evaluate.tasks):
        return run_cfg
    return dataclasses.replace(
        run_cfg, finetune=dataclasses.replace(run_cfg.finetune, tasks=(task_description(target),)),
        evaluate=dataclasses.replace(run_cfg.evaluate, tasks=(target,)))


def run_name(tasks, demos: int | None) -> str:
    """A benchmark run's directory under its seed: the evaluated tasks, and the demo count when set
    (`push-v3`, `push-v3-10demos`), so a few-demo run never reads back a run on all the demos."""
    return "-".join(tasks) + (f"-{demos}demos" if demos is not None else "")


def world_model_train_seconds(run_cfg) -> dict[str, float]:
    """{stage: seconds} of the workspace run's pretrain and finetune (steps x batch / samples per s, from
    reports/<stage>.json and its timings); a stage without both files is left out."""
    from lingbot.fsutil import timings_path

    out = {}
    for name in ("pretrain", "finetune"):
        path = Path(f"reports/{name}.json")
        if path.is_file() and timings_path(path).is_file():
            r = json.loads(path.read_text()) | json.loads(timings_path(path).read_text())
            out[name] = r["steps"] * getattr(run_cfg, name).batch_size / r["samples_per_s"]
    return out


def _same_recipe(checkpoint: Path, model_cfg, train_cfg) -> bool:
    """Whether `checkpoint` was trained with this model and training config (fields it predates at
    their defaults): only then may a benchmark reuse it instead of training its own."""
    from lingbot.config import to_dict

    path = checkpoint / "config.json"
    if not (checkpoint / "trainer.json").is_file() or not path.is_file():
        return False
    saved = json.loads(path.read_text())
    for key, cfg in (("model", model_cfg), ("train", train_cfg)):
        defaults = json.loads(json.dumps(to_dict(type(cfg)())))
        wanted = json.loads(json.dumps(to_dict(cfg)))
        if any(saved[key].get(name, defaults[name]) != value for name, value in wanted.items()):
            return False
    return True


def bench_seeds(params: Path, seeds: list[int], workers: int, out: Path, with_run: bool,
                target: str | None = None, episodes: int | None = None, demos: int | None = None) -> dict:
    """The recipe, not one draw of it: pretrain -> finetune -> bundle -> evaluate once per chain seed.

    Each seed derives the seeds of pretrain, finetune and the policy (`chain_seeds`; the params' own
    seed is the `dvc repro` run, whose models/pretrain is then reused: same seed, same bytes) and
    trains on the workspace's data/latents and models/vae (run `dvc repro` first); every seed is scored
    on the same held-out evaluation episodes. `target`: fine-tune on and evaluate this MetaWorld task
    instead of the params' (from the same pretraining); `demos`: fine-tune on its first `demos` training
    episodes. A seed's pretraining goes to `out/seed-<s>/pretrain`, each run to
    `out/seed-<s>/<run_name>/`; finished parts are not run again (a stopped bench resumes), and a
    finished run of another recipe there (other params) is an error, not a result. `with_run`: add
    the workspace's own evaluation (reports/eval.json) as the row of the run's seed.
    """
    import torch

    from lingbot.config import chain_seeds, load_run_config
    from lingbot.errors import LingbotError
    from lingbot.fsutil import write_json
    from lingbot.policy.bundle import write_bundle
    from lingbot.sim.evaluate import evaluate, wilson_interval
    from lingbot.train.loop import train

    run_cfg = retarget(load_run_config(params), target, demos)
    if with_run and demos is not None:
        raise LingbotError("bench seeds: --with-run adds the workspace's run, fine-tuned on all its demos; "
                           "drop --with-run or --demos")
    torch.set_num_threads(run_cfg.threads)
    latents, vae = Path("data/latents"), Path("models/vae")
    eval_cfg = dataclasses.replace(run_cfg.evaluate, videos=0, workers=workers,
                                   episodes=episodes or run_cfg.evaluate.episodes)
    name = run_name(eval_cfg.tasks, demos)
    rows = []
    if with_run:
        reported = json.loads(Path("reports/eval.json").read_text())
        if any(f"{task}/success_rate" not in reported for task in eval_cfg.tasks):
            raise LingbotError("bench seeds --with-run: reports/eval.json did not evaluate these tasks")
        rows.append({"seed": run_cfg.seed, "source": "reports/eval.json", "success_rate": reported["success_rate"],
                     "episodes": reported["episodes"]})
    for seed in seeds:
        work = Path(out) / f"seed-{seed}"
        result = work / name / "result.json"
        cfg = chain_seeds(run_cfg, seed, sections=("pretrain", "finetune", "policy"))
        if result.is_file() and not _same_recipe(work / name / "finetune" / "checkpoint", cfg.model, cfg.finetune):
            raise LingbotError(f"{result.parent}: fine-tuned by another recipe than {params}'s (model or finetune "
                               "differ); pass another --out")
        if not result.is_file():
            pretrain = work / "pretrain" / "checkpoint"
            pretrain_s = None
            if seed == run_cfg.seed and _same_recipe(Path("models/pretrain/checkpoint"), cfg.model, cfg.pretrain):
                pretrain = Path("models/pretrain/checkpoint")  # the dvc repro run's: its own training time
                pretrain_s = world_model_train_seconds(run_cfg).get("pretrain")
            pretrain_time = pretrain.parent / "seconds.json"  # a seed's pretraining, shared by its targets
            if not (pretrain / "trainer.json").is_file() or json.loads(
                    (pretrain / "trainer.json").read_text())["step"] < cfg.pretrain.steps:
                t0 = time.perf_counter()
                train(cfg.pretrain, cfg.model, latents, pretrain.parent, progress=False)
                write_json(pretrain_time, {"seconds": round(time.perf_counter() - t0, 1)})
            if pretrain_s is None and pretrain_time.is_file():
                pretrain_s = json.loads(pretrain_time.read_text())["seconds"]
            t0 = time.perf_counter()
            train(cfg.finetune, cfg.model, latents, work / name / "finetune", init_from=pretrain, progress=False)
            finetune_s = time.perf_counter() - t0
            write_bundle(work / name / "policy", work / name / "finetune" / "checkpoint", vae, latents, cfg.policy)
            summary = evaluate(work / name / "policy", eval_cfg, work / name / "eval", progress=False)
            write_json(result, {"seed": seed, "source": str(work / name), "success_rate": summary["success_rate"],
                                "episodes": summary["episodes"],
                                "train_seconds": round(finetune_s + pretrain_s, 1) if pretrain_s is not None else None,
                                "finetune_seconds": round(finetune_s, 1), "latency_ms": summary["latency_ms_p95"],
                                "pretrain_seed": cfg.pretrain.seed, "finetune_seed": cfg.finetune.seed})
        rows.append(json.loads(result.read_text()))
    rates = np.array([r["success_rate"] for r in rows])
    wins = [round(r["success_rate"] * r["episodes"]) for r in rows]
    per_seed = {}
    for r, k in zip(rows, wins):
        low, high = wilson_interval(k, r["episodes"])
        label = f"seed{r['seed']}" + (" (dvc repro)" if r["source"] == "reports/eval.json" else "")
        per_seed[label] = f"{k}/{r['episodes']} [{low:.2f}, {high:.2f}]"
    pooled = wilson_interval(sum(wins), sum(r["episodes"] for r in rows))
    return {
        "bench": "seeds",
        "tasks": ",".join(eval_cfg.tasks),
        "eval_seed": eval_cfg.seed,
        "runs": len(rows),
        **per_seed,
        "success_mean": round(float(rates.mean()), 4),
        "success_std": round(float(rates.std(ddof=1)), 4) if len(rows) > 1 else None,
        "success_min": round(float(rates.min()), 4),
        "success_max": round(float(rates.max()), 4),
        "pooled_ci_low": round(pooled[0], 4),
        "pooled_ci_high": round(pooled[1], 4),
        "per_seed": [dict(r, wins=k) for r, k in zip(rows, wins)],
    }


def _world_model_row(run_cfg, target: str) -> dict:
    """The world model's row of the peers table: the workspace's `dvc repro` run (reports/)."""
    from lingbot.fsutil import timings_path

    reported = json.loads(Path("reports/eval.json").read_text())
    timings = json.loads(timings_path(Path("reports/eval.json")).read_text())
    trained = world_model_train_seconds(run_cfg)
    if len(trained) != 2:
        from lingbot.errors import LingbotError

        raise LingbotError("bench peers: reports/pretrain.json and reports/finetune.json (with their timings) are "
                           "missing; run `dvc repro` first")
    seconds = sum(trained.values())
    return {"method": "lingbot world model", "target": target,
            "demos": json.loads(Path("reports/finetune.json").read_text())["episodes"], "train_s": round(seconds, 1),
            "success": reported[f"{target}/success_rate"], "ci_low": reported[f"{target}/success_ci_low"],
            "ci_high": reported[f"{target}/success_ci_high"], "latency_ms": timings.get("latency_ms_p95")}


def bench_peers(params: Path, peers: list[str], budget_s: float | None, workers: int, out: Path,
                target: str | None = None, seeds_out: Path = Path("models/seeds"), demos: int | None = None) -> dict:
    """LeRobot's ACT and Diffusion Policy trained by `lerobot-train` on the target task's training
    demos (finetune's episodes, the first `demos` of them when set) for the world model's training
    time, rolled out by `evaluate` on its held-out seeds. The world model's row is the workspace's run
    (run `dvc repro` first) when it is this recipe; otherwise (another `target`, `demos` or model) the
    recipe fine-tuned by `bench_seeds` at the params' seed (kept in `seeds_out`, shared with bench
    seeds and bench bc). Peers are kept in `out/<kind>/<run_name>/`.

    Each peer's steps come from a calibration: a 40-step `lerobot-train` run, whose own log gives the
    seconds per step after the warm-up (its update and data-loading times) and whose wall time less
    those steps the start-up; steps = (budget - start-up) / seconds per step. (Two short runs' wall
    times differenced, as before, gave 695k steps when the shorter run was slowed by another process.)
    A peer already trained
    under `out` is not trained again (a stopped bench resumes).
    """
    from lingbot.baselines.lerobot_peers import load_peer, train_peer
    from lingbot.data.latents import LatentWindows
    from lingbot.config import load_run_config
    from lingbot.fsutil import write_json
    from lingbot.sim.evaluate import evaluate, wilson_interval
    from lingbot.train.loop import select_episodes

    run_cfg = load_run_config(params)
    own = tuple(run_cfg.evaluate.tasks)
    run_cfg = retarget(run_cfg, target, demos)
    eval_cfg = dataclasses.replace(run_cfg.evaluate, videos=0, workers=workers)
    if len(eval_cfg.tasks) != 1:
        raise ValueError("bench peers: evaluate one task (evaluate.tasks) at a time")
    target, name = eval_cfg.tasks[0], run_name(eval_cfg.tasks, demos)
    episodes = select_episodes(LatentWindows(Path("data/latents")).manifest, run_cfg.finetune)
    if eval_cfg.tasks == own and _same_recipe(Path("models/finetune/checkpoint"), run_cfg.model, run_cfg.finetune):
        rows = [_world_model_row(run_cfg, target)]
    else:
        wm = bench_seeds(params, [run_cfg.seed], workers, seeds_out, False, None if eval_cfg.tasks == own else target,
                         demos=demos)["per_seed"][0]
        low, high = wilson_interval(wm["wins"], wm["episodes"])
        rows = [{"method": "lingbot world model", "target": target, "demos": len(episodes),
                 "train_s": wm["train_seconds"], "success": wm["success_rate"], "ci_low": round(low, 4),
                 "ci_high": round(high, 4), "latency_ms": wm["latency_ms"]}]
    budget = budget_s or rows[0]["train_s"]
    if not budget:
        from lingbot.errors import LingbotError

        raise LingbotError(f"bench peers: the world model's training time on {target} is not known (its "
                           "pretraining was not timed here); pass --budget-s")
    for kind in peers:
        work = Path(out) / kind / name
        result = work / "result.json"
        trained = work / "model" / "lingbot_peer.json"
        if trained.is_file() and json.loads(trained.read_text())["episodes"] != sorted(episodes):
            from lingbot.errors import LingbotError

            raise LingbotError(f"{work}: trained on other episodes than {params}'s {target} demos; pass another --out")
        if not result.is_file():
            if not trained.is_file():
                with tempfile.TemporaryDirectory(prefix="lingbot-calibrate-") as tmp:
                    probe = train_peer(kind, Path("data/demos"), episodes, Path(tmp) / "probe", 40,
                                       threads=run_cfg.threads)
                start_up = max(0.0, probe["train_seconds"] - 40 * probe["step_seconds"])
                steps = max(10, int((budget - start_up) / probe["step_seconds"]))
                train_peer(kind, Path("data/demos"), episodes, work / "model", steps, threads=run_cfg.threads)
            meta = json.loads(trained.read_text())
            summary = evaluate(work / "model", eval_cfg, work / "eval", progress=False, load=load_peer)
            low, high = wilson_interval(round(summary["success_rate"] * summary["episodes"]), summary["episodes"])
            write_json(result, {"method": f"LeRobot {kind}", "target": target, "demos": len(episodes),
                                "train_s": meta["train_seconds"], "steps": meta["steps"],
                                "success": summary["success_rate"], "ci_low": round(low, 4),
                                "ci_high": round(high, 4), "latency_ms": summary["latency_ms_p95"]})
        rows.append(json.loads(result.read_text()))
    table = {f"{r['method']} ({r['target']})": f"{r['success']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}], "
             f"{r['train_s']:.0f} s" for r in rows}
    return {"bench": "peers", "eval_seed": eval_cfg.seed, "episodes": eval_cfg.episodes, **table, "rows": rows}


def run(what: str, args) -> int:
    if what == "data":
        result = bench_data(args.episodes or 4, args.workers)
    elif what == "latents":
        result = bench_latents(args.episodes or 4, args.workers)
    elif what == "train":
        result = bench_train(args.preset, args.steps or 10)
    elif what == "bc":
        result = bench_bc(Path(args.params), args.steps, args.episodes, args.workers,
                          [int(v) for v in (args.seeds or "0").split(",")],
                          args.target.split(",") if args.target else [], Path(args.out or "models/seeds"), args.demos)
    elif what == "realtime":
        result = bench_realtime(args.preset)
    elif what == "peers":
        peers = args.peers.split(",") if args.peers else ["act", "diffusion"]
        result = bench_peers(Path(args.params), peers, args.budget_s, args.workers, Path(args.out or "models/peers"),
                             args.target, demos=args.demos)
    elif what == "seeds":
        seeds = [int(v) for v in (args.seeds or "1,2").split(",")]
        result = bench_seeds(Path(args.params), seeds, args.workers, Path(args.out or "models/seeds"), args.with_run,
                             args.target, demos=args.demos)
    else:  # argparse restricts the choices; kept for direct callers
        raise ValueError(f"unknown benchmark {what!r}")
    print(_table([(k, v) for k, v in result.items() if not isinstance(v, (list, dict))]))
    print(json.dumps(result))
    return 0
