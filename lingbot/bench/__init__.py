"""Benchmarks: `lingbot bench WHAT` prints a table, then one JSON object as its last line.

`speed`: data, latents, vae, train, realtime. `frames`: recorded frames against raw renders. As library
calls on a given device (what `.ci/gpu` runs on a GPU machine, docs/GPU.md): `speed.train_mfu`,
`speed.latency_modes`, and in `budget` what a fixed time of training buys, `vae_for_seconds` and
`policy_for_seconds`. Quality is not measured here: the baselines are DVC stages (baselines/dvc.yaml) and a
sweep over seeds or targets is a DVC experiment (docs/experiments.md).
Every result carries the machine it ran on (`lingbot.hardware.machine`: the CPU kernels' ISA, the GPU,
torch) and the precision it computed in.
"""

from __future__ import annotations

import json
from pathlib import Path

from lingbot.bench.speed import bench_data, bench_latents, bench_realtime, bench_train, bench_vae


def _table(rows: list[tuple[str, object]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def run(what: str, args) -> int:
    """Benchmark `what` with its command-line flags (`lingbot bench WHAT --help`: each has its own)."""
    if what == "data":
        result = bench_data(args.episodes, args.workers)
    elif what == "latents":
        result = bench_latents(args.episodes, args.workers)
    elif what == "train":
        result = bench_train(args.preset, args.steps)
    elif what == "vae":
        result = bench_vae(args.steps)
    elif what == "frames":
        from lingbot.bench.frames import bench_frames

        result = bench_frames(Path(args.params), args.episodes, args.target.split(",") if args.target else [])
    elif what == "realtime":
        result = bench_realtime(args.preset)
    else:  # argparse restricts the choices; kept for direct callers
        raise ValueError(f"unknown benchmark {what!r}")
    result = with_machine(result)
    print(_table([(k, v) for k, v in result.items() if not isinstance(v, (list, dict))]))
    print(json.dumps(result))
    return 0


def with_machine(result: dict) -> dict:
    """`result` with the machine it ran on (CPU ISA, GPU, torch) and its precision (fp32 unless it says)."""
    import torch

    from lingbot.hardware import machine

    record = machine("cuda" if torch.cuda.is_available() else "cpu")
    record.pop("device")  # a benchmark's own "device" names the GPU or the CPU
    return {**result, "precision": result.get("precision", "fp32"), **record}
