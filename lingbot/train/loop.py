"""Training: teacher-forced flow matching over windows of the latent cache.

Every random choice of step s (which episodes, which window, which noise) comes from generators seeded
by (seed, s), never from a stream consumed over time. So a run stopped after N steps and resumed
from its checkpoint takes exactly the steps an uninterrupted run takes, and N data-parallel processes
compute the same global batch as one process (each takes its rows of the same draw).

Checkpoint directory (one format, no pickles)::

    config.json             model config, train config, data shapes, step
    model.safetensors       weights            ema.safetensors   EMA weights (the released ones)
    optimizer.safetensors   AdamW moments      trainer.json      step, scheduler, loss log tail

Distributed: under `torchrun` (WORLD_SIZE > 1), on gloo (CPU) or NCCL (CUDA), `TrainConfig.parallel`
picks how the model is spread: "ddp" (default) replicates it (DDP); "fsdp" shards parameters, gradients,
AdamW moments and the EMA over the processes (FSDP2, `parallel.apply_fsdp`; bf16 all-gathers on GPUs),
for presets that do not fit one device (`pretrain: {parallel: fsdp}` in params.yaml). The checkpoint
is gathered to the format above either way, so it resumes under any layout. Rank 0 writes. In a single
process "fsdp" trains unsharded (with a warning). FSDP2 and activation checkpointing are applied by
separate functions, keeping the model file free of distributed code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from lingbot.config import ModelConfig, TrainConfig
from lingbot.errors import LingbotError
from lingbot.fsutil import atomic_dir, atomic_file, write_json
from lingbot.train.schedule import lr_factor
from lingbot.train.parallel import PARALLEL, apply_fsdp, clip_grad_norm_, full_state, load_full_state

logger = logging.getLogger("lingbot.train")


# ----------------------------------------------------------------------------------------------------
# Data: a step-indexed sampler over the cache.


class StepSampler:
    """The global batch of step s: episodes (and, in a phase-augmented cache, each one's phase) drawn
    from rng(seed, s), in windows as long as the batch's shortest episode allows (up to max_chunks)."""

    def __init__(self, data, cfg: TrainConfig, episodes: list[int]):
        from lingbot.data.latents import phase_lengths

        self.data, self.cfg, self.episodes = data, cfg, episodes
        self.lengths = {e: phase_lengths(data.manifest["episodes"][str(e)]) for e in episodes}
        self.phases = len(self.lengths[episodes[0]])
        if cfg.max_chunks < 2:
            raise LingbotError(f"train: max_chunks must be >= 2 (a window's first chunk is context only), got {cfg.max_chunks}")
        short = [e for e, n in self.lengths.items() if min(n) < 2]
        if short:
            raise LingbotError(f"train: episode {short[0]} has {min(self.lengths[short[0]])} latent frame(s); a "
                               "training window needs 2 (raise validate.min_episode_length)")

    def batch(self, step: int, rows: slice | None = None) -> dict:
        from lingbot.data.latents import collate_windows, window_start

        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, step])
        chosen = rng.choice(self.episodes, size=cfg.batch_size, replace=len(self.episodes) < cfg.batch_size)
        phases = rng.integers(0, self.phases, size=len(chosen)) if self.phases > 1 else np.zeros(len(chosen), int)
        lengths = [self.lengths[e][p] for e, p in zip(chosen, phases)]
        n = min(cfg.max_chunks, *lengths)
        starts = [window_start(rng, length, n, cfg.episode_start_p) for length in lengths]
        items = list(zip(chosen.tolist(), starts, phases.tolist()))[rows or slice(None)]
        return collate_windows([self.data.window(e, s, n, p) for e, s, p in items])


def select_episodes(manifest: dict, cfg: TrainConfig, split: str = "train") -> list[int]:
    tasks = manifest["tasks"]
    wanted = set(cfg.tasks) if cfg.tasks else set(tasks)
    unknown = wanted - set(tasks)
    if unknown:
        raise LingbotError(f"train: task {sorted(unknown)[0]!r} not in the latent cache (has: {', '.join(tasks)})")
    per_task: dict[int, list[int]] = {}
    for e, meta in sorted(manifest["episodes"].items(), key=lambda kv: int(kv[0])):
        if meta["split"] == split and tasks[meta["task_index"]] in wanted:
            per_task.setdefault(meta["task_index"], []).append(int(e))
    if cfg.max_episodes_per_task:
        per_task = {t: eps[: cfg.max_episodes_per_task] for t, eps in per_task.items()}
    episodes = sorted(e for eps in per_task.values() for e in eps)
    if not episodes:
        raise LingbotError(f"train: no {split} episodes for tasks {sorted(wanted)}")
    return episodes


# ----------------------------------------------------------------------------------------------------
# Optimisation pieces.


def make_optimizer(model, cfg: TrainConfig):
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95),
    )


@torch.no_grad()
def ema_update(ema: dict[str, torch.Tensor], model, decay: float) -> None:
    for name, p in model.named_parameters():
        ema[name].lerp_(p.detach(), 1 - decay)


def apply_activation_checkpointing(model) -> None:
    """Recompute each MoT layer in the backward pass instead of storing its activations (in place:
    the parameters keep their names). Every argument reaches the layer, keywords included (the KV
    cache of an incremental step); without gradients nothing is recomputed, so the layer runs as is."""
    for layer in model.layers:
        layer.forward = _checkpointed(layer.forward)


def _checkpointed(forward):
    from torch.utils.checkpoint import checkpoint

    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def compile_layers(model, backend: str = "inductor") -> None:
    """`torch.compile` each MoT layer in place (torchtitan's order: after activation checkpointing, before
    sharding; parameter names unchanged). The window length varies per batch: dynamo's automatic dynamic
    shapes make the second length it meets symbolic, so the lengths share one graph instead of
    recompiling for each. `backend="eager"` traces without generating code (the tests' check of the wiring)."""
    for layer in model.layers:
        layer.compile(backend=backend)


# ----------------------------------------------------------------------------------------------------
# Checkpoints.


def save_checkpoint(path: Path, model, ema, optimizer, step: int, meta: dict, log: list[dict],
                    machine: dict | None = None) -> None:
    """Write the checkpoint directory. Every process calls it (under FSDP the full tensors are gathered
    to rank 0, a collective); rank 0 writes. `machine`: the precision and machine the steps ran on
    (`lingbot.hardware.run_record`), kept in trainer.json."""
    from safetensors.torch import save_file

    weights, state, ema = full_state(model, optimizer, ema)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    tensors, slots = {}, {}
    for pid, st in state["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.contiguous()
            else:
                slots[f"{pid}.{key}"] = value
    with atomic_dir(Path(path)) as tmp:
        tmp.mkdir(parents=True)
        save_file({k: v.detach().contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"))
        save_file({k: v.contiguous() for k, v in ema.items()}, str(tmp / "ema.safetensors"))
        save_file(tensors or {"empty": torch.zeros(0)}, str(tmp / "optimizer.safetensors"))
        write_json(tmp / "config.json", {**meta, "step": step})
        trainer = {"step": step, "param_groups": state["param_groups"], "slots": slots, "log": log[-1000:]}
        if machine is not None:
            trainer["machine"] = machine
        write_json(tmp / "trainer.json", trainer)


def load_checkpoint(path: Path, model, ema, optimizer) -> tuple[int, list[dict]]:
    """Set model, EMA and optimizer from a checkpoint, whatever layout wrote it (plain, DDP or FSDP)."""
    from safetensors.torch import load_file

    trainer = json.loads((path / "trainer.json").read_text())
    tensors = load_file(str(path / "optimizer.safetensors"))
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key == "empty":
            continue
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    for key, value in trainer["slots"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    load_full_state(model, optimizer, ema, load_file(str(path / "model.safetensors")),
                    {"state": state, "param_groups": trainer["param_groups"]},
                    load_file(str(path / "ema.safetensors")))
    return int(trainer["step"]), list(trainer["log"])


def load_weights(path: Path, which: str = "ema") -> tuple[dict, dict]:
    """(state dict, config.json) of a checkpoint: `ema` or `model` weights."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "config.json").is_file():
        raise LingbotError(f"{path}: not a lingbot checkpoint (config.json missing)")
    return load_file(str(path / f"{which}.safetensors")), json.loads((path / "config.json").read_text())


# ----------------------------------------------------------------------------------------------------
# The loop.


def _distributed(device: str | None = None) -> tuple[int, int, torch.device, bool]:
    """(rank, world size, device, whether this call joined the process group) of this process; joins
    torchrun's process group when there is one. `device`: where to train (default: this process's GPU
    when there is one, else the CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device is not None:
        device = torch.device(device)
    elif torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        # Each process owns one GPU: NCCL's collectives (FSDP's in particular) run on the current device.
        torch.cuda.set_device(device)
    joined = False
    if world > 1 and not torch.distributed.is_initialized():
        # device_id binds NCCL's communicator to this process's GPU at once (no guessing, no hang on
        # the first collective when ranks disagree).
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                             device_id=device if device.type == "cuda" else None)
        joined = True
    rank = torch.distributed.get_rank() if world > 1 else 0
    return rank, world, device, joined


def rank_rows(rank: int, world: int, batch_size: int) -> slice:
    """The rows of the global batch that process `rank` of `world` computes."""
    per_rank = batch_size // world
    return slice(rank * per_rank, (rank + 1) * per_rank)


def train_step(net, model, optimizer, ema, batch: dict, noise: dict, cfg: TrainConfig, action_dim: int,
               precision: str, sync_last_only: bool) -> dict:
    """One optimizer step over this process's rows `batch` (already on the device) with their `noise`:
    grad_accum micro-batches forward in `precision` (the backward outside autocast), clipping, AdamW,
    EMA. `net` is what runs the forward (DDP-wrapped or not), `model` the plain or sharded model.
    Returns the losses and the gradient norm as tensors on the device: no host synchronisation here."""
    from lingbot.hardware import autocast
    from lingbot.model.world_model import flow_matching_loss

    device = batch["video"].device
    micro = len(batch["video"]) // cfg.grad_accum
    total = {}
    for a in range(cfg.grad_accum):
        rows = slice(a * micro, (a + 1) * micro)
        part = {key: v[rows] for key, v in batch.items()}
        part_noise = {key: v[rows] for key, v in noise.items()}
        # DDP all-reduces once, after the last micro-batch. FSDP reduce-scatters every micro-batch
        # into the sharded gradients: skipping it would hold full unsharded gradients in between.
        last = a == cfg.grad_accum - 1
        ctx = net.no_sync() if (sync_last_only and not last) else contextlib.nullcontext()
        with ctx:
            with autocast(device, precision):
                losses = flow_matching_loss(net, part, part_noise, action_dim, cfg.video_weight, cfg.action_weight)
            (losses["loss"] / cfg.grad_accum).backward()
        for key in ("loss", "video", "action"):
            total[key] = total.get(key, 0) + losses[key].detach().float() / cfg.grad_accum
    total["grad_norm"] = clip_grad_norm_(model, cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    ema_update(ema, model, cfg.ema_decay)
    return total


def train(cfg: TrainConfig, model_cfg: ModelConfig, cache: Path, out: Path, init_from: Path | None = None,
          stop_after: int | None = None, progress: bool = True, device: str | None = None) -> dict:
    """Train (or resume) into `out/checkpoint`; write `out/log.tsv`. Returns summary metrics.

    `init_from`: a checkpoint whose EMA weights start the run (finetune from pretrain).
    `stop_after`: end after this step count (simulates an interruption; the run resumes from `out`).
    `device`: where to train (default: this process's GPU when there is one, else the CPU).
    """
    if model_cfg.attention not in ("causal", "bidirectional"):
        raise LingbotError(f"train: model.attention must be causal or bidirectional, got {model_cfg.attention!r}")
    if cfg.imagined_future_p > 0 and not model_cfg.video_prediction:
        raise LingbotError("train: imagined_future_p needs a model that imagines video (model.video_prediction: true)")
    if cfg.parallel not in PARALLEL:
        raise LingbotError(f"train: parallel must be one of {', '.join(PARALLEL)}, got {cfg.parallel!r}")
    rank, world, device, joined = _distributed(device)
    try:
        return _train(cfg, model_cfg, cache, out, init_from, stop_after, progress, rank, world, device)
    finally:
        if joined and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train(cfg, model_cfg, cache, out, init_from, stop_after, progress, rank, world, device) -> dict:
    from lingbot.hardware import resolve_precision, run_record
    from lingbot.progress import progress_bar

    from lingbot.data.latents import LatentWindows
    from lingbot.model.world_model import WorldModel, count_parameters, draw_noise

    fsdp = cfg.parallel == "fsdp" and world > 1
    if cfg.parallel == "fsdp" and world == 1:
        logger.warning("train: parallel fsdp in a single process trains unsharded (launch with torchrun to shard)")
    if cfg.batch_size % (world * cfg.grad_accum):
        raise LingbotError(f"train: batch_size {cfg.batch_size} must divide into {world} processes x "
                           f"{cfg.grad_accum} accumulation steps")
    # auto: bf16 on GPUs that have it; fp32 on CPUs, native bf16 or not (TrainConfig.precision).
    precision = resolve_precision(cfg.precision, device, "train", cpu_bf16=False)
    data = LatentWindows(cache)
    manifest = data.manifest
    episodes = select_episodes(manifest, cfg)
    sampler = StepSampler(data, cfg, episodes)
    cameras, k = len(manifest["cameras"]), manifest["actions_per_latent"]
    action_dim = len(manifest["stats"]["action"]["q01"])
    if manifest["z_dim"] != model_cfg.latent_channels:
        model_cfg = dataclasses.replace(model_cfg, latent_channels=manifest["z_dim"])
    state_dim = len(manifest["stats"]["state"]["q01"])
    if action_dim > model_cfg.action_channels:
        raise LingbotError(f"train: the robot has {action_dim} action channels, the model only "
                           f"{model_cfg.action_channels}: set model.action_channels >= {action_dim} in params.yaml")
    if model_cfg.state_channels and state_dim > model_cfg.state_channels:
        raise LingbotError(f"train: the robot has {state_dim} state channels, the model only "
                           f"{model_cfg.state_channels}: set model.state_channels >= {state_dim} in params.yaml")
    latent_hw = data.window(episodes[0], 0, 1)["video"].shape[-2:]
    if any(n % p for n, p in zip(latent_hw, model_cfg.patch)):
        raise LingbotError(f"train: latent frames are {latent_hw[0]}x{latent_hw[1]}, not a multiple of model.patch "
                           f"{tuple(model_cfg.patch)}: set model.patch to [1, 1], or use images whose size is a "
                           "multiple of the VAE's compression times the patch")

    torch.manual_seed(cfg.seed)
    model = WorldModel(model_cfg, cameras=cameras, actions_per_chunk=k).to(device)
    if init_from is not None:
        weights, _ = load_weights(Path(init_from))
        model.load_state_dict(weights)
    # torchtitan's order, each per MoT layer: activation checkpointing, then compile, then sharding.
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.compile:
        compile_layers(model)
    if fsdp:
        apply_fsdp(model, device)
    # Under FSDP the EMA mirrors the sharded parameters: each process keeps the EMA of its own shard
    # (1/N of the memory, an update without communication, elementwise the same numbers as a full
    # EMA); it is gathered to full tensors only when a checkpoint is written.
    ema = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = make_optimizer(model, cfg)  # after sharding: it must hold the sharded parameters
    record = run_record(device, precision)
    meta = {
        "model": dataclasses.asdict(model_cfg), "train": dataclasses.asdict(cfg), "cameras": cameras,
        "actions_per_chunk": k, "action_dim": action_dim, "cache_fingerprints": manifest["fingerprints"],
        "tasks": manifest["tasks"], "stats": manifest["stats"], "camera_keys": manifest["cameras"],
    }
    ckpt = Path(out) / "checkpoint"
    step, log = 0, []
    if (ckpt / "trainer.json").is_file():
        step, log = load_checkpoint(ckpt, model, ema, optimizer)
    net = model
    if world > 1 and not fsdp:
        net = torch.nn.parallel.DistributedDataParallel(model)

    rows = rank_rows(rank, world, cfg.batch_size)
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = progress_bar(progress and rank == 0, total=end, initial=step, desc="train")
    t0, samples, tokens = time.perf_counter(), 0, 0
    while step < end:
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, cfg.steps, cfg.warmup, cfg.schedule)
        # Each process loads only its rows; the noise is drawn for the global batch from one seeded
        # generator and sliced, so N processes compute exactly what one would.
        batch = sampler.batch(step, rows=rows)
        noise = draw_noise(batch, model_cfg.action_channels, cfg.shift, cfg.history_noise_p,
                           torch.Generator().manual_seed(cfg.seed * 1_000_003 + step), cfg.chunk_noise_p,
                           cfg.chunk_noise_max, batch_size=cfg.batch_size,
                           action_history_dropout=cfg.action_history_dropout,
                           imagined_future_p=cfg.imagined_future_p)
        part = {key: v.to(device) for key, v in batch.items() if torch.is_tensor(v)}
        part_noise = {key: v[rows] for key, v in noise.items()}
        total = train_step(net, model, optimizer, ema, part, part_noise, cfg, action_dim, precision,
                           sync_last_only=world > 1 and not fsdp)
        step += 1
        n_chunks = batch["video"].shape[1]
        samples += cfg.batch_size
        tokens += cfg.batch_size * 2 * n_chunks * (model.layout(1, *batch["video"].shape[-2:], "cpu")["Tv"] + k)
        total = {key: float(v) for key, v in total.items()}  # the step's one host synchronisation
        entry = {"step": step, "loss": round(total["loss"], 6), "video_loss": round(total["video"], 6),
                 "action_loss": round(total["action"], 6), "lr": optimizer.param_groups[0]["lr"],
                 "grad_norm": round(total["grad_norm"], 4)}
        log.append(entry)
        bar.update(1)
        bar.set_postfix(loss=f"{entry['loss']:.3f}", act=f"{entry['action_loss']:.3f}",
                        sps=f"{samples / (time.perf_counter() - t0):.1f}")
        if step % cfg.checkpoint_every == 0 or step == end:
            save_checkpoint(ckpt, model, ema, optimizer, step, meta, log, record)
    bar.close()
    elapsed = time.perf_counter() - t0
    if rank == 0:
        with atomic_file(Path(out) / "log.tsv") as tmp:
            with open(tmp, "w") as f:
                f.write("step\tloss\tvideo_loss\taction_loss\tlr\tgrad_norm\n")
                for e in log:
                    f.write(f"{e['step']}\t{e['loss']}\t{e['video_loss']}\t{e['action_loss']}\t{e['lr']:.6g}\t{e['grad_norm']}\n")
    counts = count_parameters(model)
    tail = log[-20:] if log else [{"loss": float("nan"), "action_loss": float("nan"), "video_loss": float("nan")}]
    return {
        "steps": step,
        "episodes": len(episodes),
        "final_loss": round(float(np.mean([e["loss"] for e in tail])), 5),
        "final_action_loss": round(float(np.mean([e["action_loss"] for e in tail])), 5),
        "final_video_loss": round(float(np.mean([e["video_loss"] for e in tail])), 5),
        "params_video": counts["video"],
        "params_action": counts["action"],
        "samples_per_s": round(samples / elapsed, 2) if samples else None,
        "tokens_per_s": round(tokens / elapsed, 1) if samples else None,
        "world_size": world,
        "machine": record,
    }
