"""What a fixed time of training buys on a device: a VAE fitted for so many seconds, and the world model
against plain image BC each trained for as long, evaluated on the same held-out episodes.

The steps of each run come from a measured step time, so a measurement fits its time whatever the
device. `report(result)` is called each time the result grows, so a caller can save what was measured
before a limit stops it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import shutil
import time
from pathlib import Path

from lingbot.bench.speed import device_info


def vae_for_seconds(cfg, demos: Path, out: Path, seconds: float, device, frames=None, calibration=(3, 10),
                    reserve: float = 20.0, max_steps: int | None = None, report=lambda result: None) -> dict:
    """A VAE of `cfg` (a VAEConfig) fitted by `fit_vae` on the training episodes of `demos` (an ingest
    directory) for about `seconds` on `device`, and its held-out PSNR/SSIM. The steps follow from a
    measured step time: `calibration` = (warm-up steps, timed steps); `reserve` seconds are left for
    the held-out scoring, the latent statistics and the save; `max_steps` caps them. `frames`: as
    `fit_vae`'s (default: the dataset's videos)."""
    from lingbot.hardware import resolve_precision
    from lingbot.vae import fit
    from lingbot.vae.wan import build_vae

    demos, out = Path(demos), Path(out)
    load_frames = frames or fit.load_frames
    t0 = time.perf_counter()
    manifest, split, layout = fit.read_demos(demos)
    result = {**device_info(device), "config": dataclasses.asdict(cfg), "train_episodes": len(split["train"]),
              "val_episodes": len(split["val"]), "seconds_budget": seconds}
    report(result)
    clips = load_frames(layout, manifest["keys"]["cameras"], split["train"])
    vae = build_vae(cfg).to(device)
    warm, timed = calibration
    precision = resolve_precision(cfg.precision, device, "fit_vae")  # as fit_vae resolves it
    fit.train(vae, clips, dataclasses.replace(cfg, steps=warm), progress=False, precision=precision)
    t1 = time.perf_counter()
    fit.train(vae, clips, dataclasses.replace(cfg, steps=timed), progress=False, precision=precision)
    per_step = (time.perf_counter() - t1) / timed
    steps = max(1, int((seconds - (time.perf_counter() - t0) - reserve) / per_step))
    if max_steps is not None:
        steps = min(steps, max_steps)
    result.update(seconds_per_step=round(per_step, 4), steps_planned=steps)
    report(result)
    fitted = fit.fit_vae(dataclasses.replace(cfg, steps=steps), demos, out, progress=False, device=str(device),
                         frames=frames)
    result.update(**{k: fitted[k] for k in ("psnr_db", "ssim", "eval_frames", "params", "z_dim", "steps",
                                            "train_clips", "machine")},
                  fit_seconds=fitted["seconds"], reached_28db=fitted["psnr_db"] >= 28.0)
    report(result)
    return result


def load_policy_cuda(path):
    """`evaluate`'s loader for a world-model bundle on the GPU (module level: worker processes import it)."""
    from lingbot.policy.runtime import load_policy

    return load_policy(path, device="cuda", dtype="auto")  # bf16 weights where the GPU has bf16, as served


def seconds_per_train_step(cfg, model_cfg, latents: Path, work: Path, steps=(2, 8), device=None) -> float:
    """Seconds per optimizer step of `train`: two short runs, so start-up and the final save cancel.
    Where noise makes the difference implausible (a loaded CPU), the longer run's mean step, which
    counts its start-up and save too: fewer steps, never a run past its budget."""
    from lingbot.train.loop import train

    walls = []
    for n in steps:
        out = Path(work) / f"calibrate-{n}"
        t0 = time.perf_counter()
        train(dataclasses.replace(cfg, steps=n, checkpoint_every=n), model_cfg, latents, out, progress=False,
              device=device)
        walls.append(time.perf_counter() - t0)
        shutil.rmtree(out, ignore_errors=True)
    difference = (walls[1] - walls[0]) / (steps[1] - steps[0])
    mean = walls[1] / steps[1]
    return difference if difference > 0.25 * mean else mean


def policy_for_seconds(run_cfg, latents: Path, vae: Path, demos: Path, work: Path, seconds: float, device,
                       episodes: int | None = None, workers: int | None = None, frames=None,
                       calibration=((2, 8), 20), max_steps: int | None = None, report=lambda result: None) -> dict:
    """The world model against plain image BC after the same `seconds` of training on `device`.

    The world model: pretrain (60% of the seconds) then finetune (40%) of `run_cfg` on the latent cache
    `latents`, bundled with the VAE `vae`. BC (`lingbot.baselines.bc`): the same fine-tuning demos
    (`demos`: an ingest directory; `frames` as `load_demos`'), as many seconds. Steps follow from
    measured step times: `calibration` = (the world model's two short runs, BC's timed steps); `max_steps`
    caps them. Both are evaluated at once on `run_cfg.evaluate`'s tasks and held-out seeds, `episodes`
    per task, in `workers` rollout processes: two thirds roll out the world model (its policy on `device`,
    in bf16 weights where a GPU has bf16, as `lingbot serve --device cuda` serves), the rest BC (on the CPU).
    Everything is written under `work`."""
    import numpy as np
    import torch

    from lingbot.baselines.bc import BCConfig, load_bc, load_demos, save_bc, train_bc
    from lingbot.policy.bundle import write_bundle
    from lingbot.sim.evaluate import evaluate
    from lingbot.train.loop import train

    device, work = torch.device(device), Path(work)
    cap = max_steps or 10**9
    eval_cfg = dataclasses.replace(run_cfg.evaluate, episodes=episodes or run_cfg.evaluate.episodes, videos=0,
                                   workers=workers or run_cfg.evaluate.workers)
    result = {**device_info(device), "model": dataclasses.asdict(run_cfg.model),
              "pretrain": dataclasses.asdict(run_cfg.pretrain), "finetune": dataclasses.asdict(run_cfg.finetune),
              "tasks": list(eval_cfg.tasks), "episodes_per_task": eval_cfg.episodes, "eval_seed": eval_cfg.seed,
              "train_seconds_budget": seconds}
    report(result)

    # World model: steps from a measured step time, 60% of the seconds pretraining, 40% fine-tuning.
    wm_calibration, bc_calibration = calibration
    per_step = seconds_per_train_step(run_cfg.pretrain, run_cfg.model, latents, work, wm_calibration, device)
    pre_steps = min(cap, max(2, int(0.6 * seconds / per_step)))
    fine_steps = min(cap, max(2, int(0.4 * seconds / per_step)))
    result.update(world_model_seconds_per_step=round(per_step, 4), pretrain_steps=pre_steps, finetune_steps=fine_steps)
    report(result)
    t0 = time.perf_counter()
    # A timed run saves once, at its end.
    pre = train(dataclasses.replace(run_cfg.pretrain, steps=pre_steps, checkpoint_every=pre_steps), run_cfg.model,
                latents, work / "pretrain", progress=False, device=device)
    fine = train(dataclasses.replace(run_cfg.finetune, steps=fine_steps, checkpoint_every=fine_steps), run_cfg.model,
                 latents, work / "finetune", init_from=work / "pretrain" / "checkpoint", progress=False, device=device)
    wm_seconds = time.perf_counter() - t0
    write_bundle(work / "policy", work / "finetune" / "checkpoint", vae, latents, run_cfg.policy)
    result.update(world_model_train_wall_s=round(wm_seconds, 1),
                  world_model_step_seconds=round(pre_steps * run_cfg.pretrain.batch_size / pre["samples_per_s"]
                                                 + fine_steps * run_cfg.finetune.batch_size / fine["samples_per_s"], 1),
                  pretrain_final_loss=pre["final_loss"], finetune_final_loss=fine["final_loss"],
                  finetune_final_action_loss=fine["final_action_loss"], params_video=pre["params_video"],
                  params_action=pre["params_action"])
    report(result)

    # Plain BC on the same fine-tuning demos, for the world model's training seconds.
    bc_cfg = BCConfig()
    data = load_demos(demos, latents, run_cfg.finetune, bc_cfg.chunk, frames=frames)
    _, _, calibration_s = train_bc(data, dataclasses.replace(bc_cfg, steps=bc_calibration), False, device)
    bc_steps = min(cap, max(2, int(seconds / (calibration_s / bc_calibration))))
    model, losses, bc_seconds = train_bc(data, dataclasses.replace(bc_cfg, steps=bc_steps), False, device)
    save_bc(model, data, dataclasses.replace(bc_cfg, steps=bc_steps), work / "bc")
    result.update(bc_steps=bc_steps, bc_train_s=round(bc_seconds, 1),
                  bc_final_loss=round(float(np.mean(losses[-50:])), 4), bc_train_episodes=len(data["episodes"]))
    report(result)

    # Both evaluated at once on the same held-out episodes: the world model's rollouts get two thirds of
    # the workers (its policy runs on the device), BC's the rest (its small network runs on the CPU).
    wm_workers = max(1, (2 * eval_cfg.workers) // 3)
    bc_workers = max(1, eval_cfg.workers - wm_workers)
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        wm = pool.submit(evaluate, work / "policy", dataclasses.replace(eval_cfg, workers=wm_workers),
                         work / "eval-world-model", False, load_policy_cuda if device.type == "cuda" else None)
        bc = pool.submit(evaluate, work / "bc", dataclasses.replace(eval_cfg, workers=bc_workers),
                         work / "eval-bc", False, load_bc)
        for name, future in (("world_model", wm), ("bc", bc)):
            try:
                summary = future.result()
                result.update(**{f"{name}_{k.replace('/', '_')}": v for k, v in summary.items()})
            except Exception as exc:
                result[f"{name}_eval_error"] = f"{type(exc).__name__}: {exc}"[:500]
            report(result)
    result["eval_wall_s"] = round(time.perf_counter() - t0, 1)
    report(result)
    if "world_model_success_rate" not in result or "bc_success_rate" not in result:
        raise RuntimeError("an evaluation failed: " + str(result.get("world_model_eval_error")
                                                          or result.get("bc_eval_error")))
    return result
