"""Speed benchmarks: data collection, latent caching, training throughput (and MFU against a measured
peak), real-time chunk latency (in several precisions side by side), on this machine or a given device."""

from __future__ import annotations

import dataclasses
import resource
import tempfile
import time
from pathlib import Path


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

    from lingbot.config import TrainConfig, preset
    from lingbot.data.collect import collect
    from lingbot.data.ingest import ingest
    from lingbot.data.latents import LatentWindows, build_cache
    from lingbot.data.lerobot_io import iter_episode_frames, open_layout
    from lingbot.train.loop import StepSampler
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

        # Windows of 4 chunks as training draws them: the trainer's sampler, one window a batch.
        data = LatentWindows(tmp / "latents")
        sampler = StepSampler(data, TrainConfig(batch_size=1, max_chunks=4), data.episodes)
        n = 200
        t0 = time.perf_counter()
        for i in range(n):
            sampler.batch(i)
        cached = n / (time.perf_counter() - t0)

        # The same windows computed on the fly: decode the episode's frames and encode the window.
        n_online = 6
        t0 = time.perf_counter()
        for i in range(n_online):
            batch = sampler.batch(i)
            episode, start, length = int(batch["episode"][0]), int(batch["start"][0]), batch["video"].shape[1]
            first = max(0, 4 * start - 3)
            for cam in layout.video_keys:
                ((_, frames, _),) = list(iter_episode_frames(layout, cam, [episode]))
                window = frames[first : 1 + 4 * (start + length - 1)]
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
    of the cache's shapes, in the precision `train` resolves (bf16 autocast on a CUDA GPU with bf16, fp32
    on a CPU). `bench train` and `train_mfu` share it."""
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
    from lingbot.hardware import autocast as precision_autocast, resolve_precision

    precision = resolve_precision(tcfg.precision, device, "train", cpu_bf16=False)  # as `train` resolves it

    def step(i):
        noise = draw_noise(data, cfg.action_channels, tcfg.shift, tcfg.history_noise_p, torch.Generator().manual_seed(i))
        with precision_autocast(device, precision):
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
    result = {"precision": precision, "batch_size": B, "chunks": n, "tokens_per_sample": seq,
              "params_video": counts["video"],
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


def device_info(device) -> dict:
    """The device a measurement ran on: torch's version and the GPU (name, SMs, memory) or the CPU's threads."""
    import torch

    device = torch.device(device)
    info = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device=torch.cuda.get_device_name(device), sms=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1))
    else:
        info.update(device="cpu", threads=torch.get_num_threads())
    return info


def measure_matmul_peak(device, n: int, dtype, repeats: int = 10) -> float:
    """Dense matmul rate (FLOP/s) on random data: the median of `repeats` timed products after warm-ups."""
    import statistics

    import torch

    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def train_mfu(run_cfg, device, batches=(8, 32, 128), steps: int = 10, latent_hw: int = 8,
              report=lambda result: None) -> dict:
    """`train_throughput` of `run_cfg`'s world model at each batch size side by side, with its MFU against
    the dense matmul peak measured on `device` in the training's matmul dtype (bf16 8192^3 on a GPU, fp32
    512^3 on a CPU). A batch that fails (out of memory, say) is recorded and leaves the others.
    `report(result)` is called each time the result grows, so a caller can save what was measured."""
    import torch

    device = torch.device(device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    peak = measure_matmul_peak(device, 8192 if cuda else 512, dtype)
    result = {**device_info(device), "peak_dtype": str(dtype).removeprefix("torch."),
              "peak_tflops": round(peak / 1e12, 2), "variants": {}}
    report(result)
    for batch in batches:
        try:
            r = train_throughput(run_cfg, batch, steps, device, latent_hw=latent_hw)
            r["mfu"] = round(r["tflops"] * 1e12 / peak, 4)
        except Exception as exc:  # one variant's failure (out of memory, say) leaves the others
            r = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        if cuda:
            torch.cuda.empty_cache()
        result["variants"][f"{run_cfg.preset}-b{batch}"] = r
        report(result)
    ok = [v for v in result["variants"].values() if "mfu" in v]
    if not ok:
        raise RuntimeError("no training variant ran")
    best = max(ok, key=lambda v: v["mfu"])
    result.update(preset=run_cfg.preset, best_mfu=best["mfu"], best_samples_per_s=best["samples_per_s"],
                  best_tokens_per_s=best["tokens_per_s"], best_batch=best["batch_size"])
    report(result)
    return result


def random_world_model(model_cfg, cameras: int, actions_per_chunk: int, device):
    """A world model of `model_cfg`'s shapes with random weights, built where it runs (the paper's ~5B
    parameters are initialised on the GPU), in eval mode; its output and state heads are drawn too
    (zero at initialisation, never so once trained)."""
    import torch

    from lingbot.model.world_model import WorldModel

    torch.manual_seed(0)
    with torch.device(device):
        model = WorldModel(model_cfg, cameras=cameras, actions_per_chunk=actions_per_chunk).eval()
    for head in (model.video_out, model.action_out, model.state_in):
        if head is not None:
            torch.nn.init.normal_(head.weight, std=0.02)
    return model


def chunk_latency(model, run_cfg, policy_cfg, mode: str, cameras: int, latent_hw: int, histories,
                  repeats: int, diff_history: int, device, reference=None, time_recompute: bool = False) -> dict:
    """Chunk latency of the policy's denoising (`lingbot.policy.denoise`) with `model` as it is, under
    `mode` (fp32, bf16-autocast, bf16-weights: the caller converts the weights), at each history length;
    full and half-way video denoising at the longest; the cached chunk against the no-cache recompute at
    `diff_history` chunks (timed too with `time_recompute`). `bench realtime` and `latency_modes` share it."""
    import statistics

    import torch

    from lingbot.model.world_model import KVCache
    from lingbot.policy.denoise import chunk_noise, denoise_chunk, recompute_sequence, write_history

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


LATENCY_MODES = ("fp32", "bf16-autocast", "bf16-weights", "bf16-compile")


def latency_modes(run_cfg, device, modes=LATENCY_MODES, latent_frames: int = 4, cameras: int = 2, latent_hw: int = 8,
                  actions_per_chunk: int = 16, window: int = 30, action_steps: int = 50, repeats: int = 3,
                  diff_history: int = 4, report=lambda result: None) -> dict:
    """`chunk_latency` of `run_cfg`'s world model (random weights) on `device` in each of `modes` side
    by side: fp32, bf16 autocast, bf16 weights, bf16 weights with each expert's projections and FFN
    `torch.compile`d (`compile_experts`; their token counts are fixed per kind of step, so each shape
    compiles once in an untimed pass whose seconds are reported; on a CPU only traced, with the eager
    backend: the wiring, not the speed). History 1 and `window` chunks, `action_steps` action denoising
    steps, bf16 actions against fp32's; the best mode's latency at the longest history.

    The defaults are LIBERO's shapes: 128x128 images of 2 cameras, which Wan2.2's VAE (16x) makes 8x8
    latents, 4 latent frames and 16 actions per chunk. The model holds one latent frame per chunk, so
    the 4 frames of 2 cameras enter as 8 camera slots: the same video tokens, attention and FLOPs.
    `report(result)` is called after each mode, with the best so far."""
    import torch

    from lingbot.model.world_model import compile_experts, count_parameters

    device = torch.device(device)
    slots = latent_frames * cameras
    policy_cfg = dataclasses.replace(run_cfg.policy, history_chunks=window, action_steps=action_steps)
    histories = (1, window)
    result = {**device_info(device), "preset": run_cfg.preset, "cameras": cameras,
              "latent_frames_per_chunk": latent_frames, "latent_hw": latent_hw, "actions_per_chunk": actions_per_chunk,
              "window_chunks": window, "video_steps": policy_cfg.video_steps, "action_steps": policy_cfg.action_steps,
              "tokens_per_chunk": slots * (latent_hw // 2) ** 2 + actions_per_chunk, "variants": {}}
    model = random_world_model(run_cfg.model, slots, actions_per_chunk, device)
    result["params"] = count_parameters(model)
    report(result)
    reference = None
    for mode in modes:
        try:
            if mode in ("bf16-weights", "bf16-compile"):
                model.to(torch.bfloat16)
            if mode == "bf16-compile":
                compile_experts(model, backend="inductor" if device.type == "cuda" else "eager")
                t0 = time.perf_counter()
                chunk_latency(model, run_cfg, policy_cfg, mode, slots, latent_hw, histories, 1, diff_history,
                              device)  # compiles every shape the timed pass meets
                compile_s = round(time.perf_counter() - t0, 1)
            r = chunk_latency(model, run_cfg, policy_cfg, mode, slots, latent_hw, histories, repeats, diff_history,
                              device, reference)
            if mode == "bf16-compile":
                r["compile_s"] = compile_s
            if mode == "fp32":
                reference = r.get("_actions")
            r.pop("_actions", None)
            if device.type == "cuda":
                r["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        except Exception as exc:
            r = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        result["variants"][mode] = r
        ok = {m: v for m, v in result["variants"].items() if f"latency_ms_hist{window}" in v}
        if ok:  # the best so far, reported with each mode: a caller stopped mid-way keeps it
            best = min(ok, key=lambda m: ok[m][f"latency_ms_hist{window}"])
            result.update(best_mode=best, best_latency_ms=ok[best][f"latency_ms_hist{window}"],
                          best_latency_ms_half_video=ok[best]["latency_ms_half_video_denoise"])
        report(result)
    if "best_mode" not in result:
        raise RuntimeError("no realtime variant ran")
    return result


def bench_realtime(preset_name: str, repeats: int = 5, latent_hw: int = 8, cameras: int = 2,
                   histories: tuple[int, ...] = (1, 32)) -> dict:
    """Chunk latency of the policy's denoising with the KV cache at several history lengths, against
    recomputing the whole sequence without a cache, and full vs partial (stopped half way) video denoising.

    Model part only (random weights of the preset's shapes; the VAE's per-frame encode is separate):
    what a robot waits for between sending its boundary frame and receiving the action chunk.
    """
    import torch

    from lingbot.config import preset

    run_cfg = preset(preset_name)
    cfg = dataclasses.replace(run_cfg.policy, history_chunks=0)  # the whole history: what is measured
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = random_world_model(run_cfg.model, cameras, 4, device)
    K, longest = model.K, max(histories)
    result = {"bench": "realtime", "preset": preset_name, "precision": "fp32",
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


def bench_vae(steps: int = 4, image_size: int = 64) -> dict:
    """The VAE's training step (the small preset's config, one camera's clips at `image_size`) in each
    precision this machine can run, and the one `fit_vae` picks (`vae.precision: auto`): where bf16 is
    emulated it is many times slower than fp32 (the ISA caps ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA
    rehearse such a CPU)."""
    import numpy as np
    import torch

    from lingbot.config import preset
    from lingbot.hardware import native_bf16, resolve_precision
    from lingbot.vae.fit import train
    from lingbot.vae.wan import build_vae

    cfg = dataclasses.replace(preset("small").vae, steps=1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rng = np.random.default_rng(0)
    clips = [rng.integers(0, 256, (cfg.clip_frames + 8, image_size, image_size, 3), dtype=np.uint8) for _ in range(4)]
    result = {"bench": "vae", "image_size": image_size, "clip_frames": cfg.clip_frames, "batch_size": cfg.batch_size,
              "native_bf16": native_bf16(device)[0], "precision": resolve_precision(cfg.precision, device, "fit_vae")}
    for precision in ("fp32", "bf16"):
        vae = build_vae(cfg).to(device)
        train(vae, clips, cfg, progress=False, precision=precision)  # warm-up: oneDNN picks its kernels
        t0 = time.perf_counter()
        train(vae, clips, dataclasses.replace(cfg, steps=steps), progress=False, precision=precision)
        result[f"step_s_{precision}"] = round((time.perf_counter() - t0) / steps, 3)
    result["bf16_over_fp32"] = round(result["step_s_bf16"] / result["step_s_fp32"], 2)
    result["step_s_auto"] = result[f"step_s_{result['precision']}"]
    result["fit_vae_1400_steps_min"] = round(1400 * result["step_s_auto"] / 60, 1)
    return result
