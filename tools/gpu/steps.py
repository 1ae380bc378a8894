"""The four steps of `.ci/gpu run`, each a thin call into `lingbot.bench` on the prepared folder.

Each runs in its own process (`python -m tools.gpu step NAME ...`) and writes its JSON as the
measurement grows, so a step stopped at its limit still leaves what it had measured. On a CPU
(`--cpu`) the same calls run with the `tiny` preset and tiny budgets.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

from tools.gpu.frames import FramePack


class StepResult:
    def __init__(self, path: Path, name: str):
        self.path, self.data = Path(path), {"step": name, "status": "running"}
        self.save()

    def update(self, **values) -> None:
        self.data.update(values)
        self.save()

    def report(self, measured: dict) -> None:
        """What `lingbot.bench`'s functions call as their result grows."""
        self.update(**measured)

    def save(self) -> None:
        from lingbot.fsutil import write_json

        write_json(self.path, self.data)


def run_config(prepared: dict, cpu: bool, extra: dict | None = None):
    """The run `prepare` recorded (the project's params), its world model sized to the carried cache,
    on one GPU (`lingbot.config.on_one_gpu`: the `gpu` preset's model and batches). On a CPU the tiny
    world model instead, and 2 warm-up steps (its runs are ~20 steps). `extra`: overrides on top."""
    from lingbot.config import TINY_MODEL, on_one_gpu, override, preset

    raw = dict(prepared["params"])
    run = override(preset(raw.pop("preset")), raw)
    dims = {"text_dim": prepared["text_dim"], "latent_channels": prepared["z_dim"]}
    if cpu:
        run = dataclasses.replace(run, model=dataclasses.replace(TINY_MODEL, **dims),
                                  pretrain=dataclasses.replace(run.pretrain, warmup=2),
                                  finetune=dataclasses.replace(run.finetune, warmup=2))
    else:
        run = on_one_gpu(dataclasses.replace(run, model=dataclasses.replace(run.model, **dims)))
    return override(run, extra) if extra else run


def _device(args):
    import torch

    return torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")


def step_train(result: StepResult, args, prepared: dict) -> None:
    """Training throughput of the base preset (tiny on a CPU) at several batch sizes, MFU against the
    measured matmul peak."""
    from lingbot.bench.speed import train_mfu
    from lingbot.config import preset

    batches = args.batches or ([8] if args.cpu else [8, 32, 128])
    train_mfu(preset("tiny" if args.cpu else "base"), _device(args), batches, steps=2 if args.cpu else 10,
              latent_hw=4 if args.cpu else 8, report=result.report)


def step_realtime(result: StepResult, args, prepared: dict) -> None:
    """The paper preset's chunk latency at LIBERO-like shapes (tiny shapes on a CPU)."""
    from lingbot.bench.speed import LATENCY_MODES, latency_modes
    from lingbot.config import preset

    if args.cpu:
        shapes = {"latent_frames": 1, "latent_hw": 4, "actions_per_chunk": 4, "window": 3, "diff_history": 2}
    else:
        shapes = {}  # latency_modes' defaults: LIBERO's
    latency_modes(preset("tiny" if args.cpu else "paper"), _device(args), args.modes or LATENCY_MODES,
                  action_steps=args.action_steps or (2 if args.cpu else 50),
                  repeats=args.repeats or (2 if args.cpu else 3),
                  report=result.report, **shapes)


def _work_demos(inputs: Path, work: Path, train: list[int], val: list[int]) -> Path:
    """An ingest directory whose split holds the carried episodes (fit_vae trains on split['train'])."""
    demos = work / "demos"
    if demos.exists():
        shutil.rmtree(demos)
    demos.mkdir(parents=True)
    for name in ("lingbot.json", "stats.json"):
        shutil.copyfile(inputs / "demos" / name, demos / name)
    (demos / "dataset").symlink_to((inputs / "demos" / "dataset").resolve())
    (demos / "split.json").write_text(json.dumps({"train": train, "val": val}))
    return demos


def step_vae(result: StepResult, args, prepared: dict) -> None:
    """A VAE fit on the carried frames for a fixed time."""
    from lingbot.bench.budget import vae_for_seconds

    inputs, work = Path(args.inputs), Path(args.work)
    frames = prepared["frames"]
    pack = FramePack(inputs / "frames")
    val = frames["vae_val_episodes"]
    train = sorted(set(frames["vae_train_episodes"]) | set(frames["bc_episodes"]))
    demos = _work_demos(inputs, work, [e for e in train if e not in val], val)
    result.update(frames_psnr_db_vs_dataset=frames["psnr_db_vs_dataset_frames"])
    vae_for_seconds(run_config(prepared, args.cpu).vae, demos, work / "vae", args.seconds, _device(args),
                    frames=pack.load_frames, calibration=(1, 1) if args.cpu else (3, 10),
                    reserve=5 if args.cpu else 20,
                    max_steps=3 if args.cpu else None,  # a loaded 2-core CPU's step times are noise
                    report=result.report)


def step_policy(result: StepResult, args, prepared: dict) -> None:
    """Pretrain + finetune the world model for a fixed time, plain BC for as long, evaluate both."""
    from lingbot.bench.budget import policy_for_seconds

    inputs = Path(args.inputs)
    cfg = run_config(prepared, args.cpu, json.loads(args.override) if args.override else None)
    policy_for_seconds(cfg, inputs / "latents", inputs / "vae", inputs / "demos", Path(args.work),
                       args.train_seconds or (6 if args.cpu else 50), _device(args), episodes=args.episodes,
                       workers=args.workers or (2 if args.cpu else max(2, os.cpu_count() or 2)),
                       frames=FramePack(inputs / "frames").load_frames,
                       calibration=((1, 3), 3) if args.cpu else ((2, 8), 20),
                       max_steps=20 if args.cpu else None,  # a CPU run exercises the path; its step times are noise
                       report=result.report)


STEP_FUNCTIONS = {"train": step_train, "realtime": step_realtime, "vae": step_vae, "policy": step_policy}


def run_step(args) -> int:
    result = StepResult(Path(args.result), args.name)
    t0 = time.perf_counter()
    try:
        import torch

        if args.cpu:
            torch.set_num_threads(2)
        prepared = json.loads((Path(args.inputs).parent / "prepare.json").read_text())
        Path(args.work).mkdir(parents=True, exist_ok=True)
        STEP_FUNCTIONS[args.name](result, args, prepared)
        result.update(status="ok", seconds=round(time.perf_counter() - t0, 1))
        return 0
    except BaseException as exc:
        result.update(status="failed", seconds=round(time.perf_counter() - t0, 1),
                      error=f"{type(exc).__name__}: {exc}"[:1000], traceback=traceback.format_exc()[-3000:])
        print(traceback.format_exc(), file=sys.stderr)
        return 1
