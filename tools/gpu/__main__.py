"""The command line of `.ci/gpu`: prepare, run, and (internal) step."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import tools.gpu
from lingbot.errors import LingbotError
from tools.gpu import REPO, STEPS, mib
from tools.gpu.prepare import LIMIT_MIB, prepare
from tools.gpu.schedule import CPU_LIMITS, GPU_LIMITS, run
from tools.gpu.steps import run_step


def _limits(pairs: list[str], cpu: bool) -> dict[str, float]:
    limits = dict(CPU_LIMITS if cpu else GPU_LIMITS)
    for pair in pairs or []:
        name, _, value = pair.partition("=")
        if name not in limits:
            raise LingbotError(f"--limit {pair!r}: unknown step (steps: {', '.join(STEPS)})")
        limits[name] = float(value)
    return limits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=".ci/gpu", description=tools.gpu.__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="gather what the GPU machine lacks into one folder (here)")
    p.add_argument("--from", dest="src", default=".", help="project directory with a completed `dvc repro`")
    p.add_argument("--dir", default=str(REPO / ".gpu"), help="folder to fill (replaced; default .gpu)")
    p.add_argument("--params", help="params.yaml of the run (default: --from's params.yaml)")
    p.add_argument("--preset", help="a named preset instead of a params file (tests: tiny)")
    p.add_argument("--limit-mib", type=float, default=LIMIT_MIB, help="refuse above this, repository included")
    p.add_argument("--no-wheels", action="store_true", help="carry no wheels (no PyPI access; tests)")
    p.add_argument("--no-gl", action="store_true", help="carry no GL loader packages (tests)")
    p.add_argument("--vae-episodes", type=int, help="at most this many extra training episodes of frames")
    p = sub.add_parser("run", help="run the steps (there; --cpu: here, tiny)")
    p.add_argument("--cpu", action="store_true", help="tiny preset and budgets on this CPU")
    p.add_argument("--dir", default=str(REPO / ".gpu"), help="the prepared folder (default .gpu)")
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu-out",
                   help="output folder (default: $OUT when set, else gpu-out)")
    p.add_argument("--total", type=float, help="total seconds for all steps (default 520 GPU, 330 CPU)")
    p.add_argument("--limit", action="append", metavar="STEP=SECONDS", help="a step's time limit (repeatable)")
    p.add_argument("--only", action="append", choices=STEPS, help="run only this step (repeatable)")
    p.add_argument("--install-note", help="(from .ci/gpu) how the wheel install went")
    p.add_argument("--train-seconds", type=float, help="policy: world-model (and BC) training seconds")
    p.add_argument("--episodes", type=int, help="policy: evaluation episodes per task")
    p.add_argument("--override", help='policy: JSON overrides of the run config, e.g. {"pretrain": {"lr": 1e-4}}')
    p = sub.add_parser("step", help="(internal) one step, in its own process")
    p.add_argument("name", choices=STEPS)
    p.add_argument("--inputs", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--result", required=True)
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--seconds", type=float, default=100.0)
    p.add_argument("--train-seconds", type=float)
    p.add_argument("--episodes", type=int)
    p.add_argument("--workers", type=int)
    p.add_argument("--override")
    p.add_argument("--batches", type=int, nargs="*")
    p.add_argument("--modes", nargs="*")
    p.add_argument("--repeats", type=int)
    p.add_argument("--action-steps", type=int)
    args = parser.parse_args(argv)
    try:
        if args.command == "prepare":
            from lingbot.config import load_run_config, preset

            src = Path(args.src)
            if args.preset:
                run_cfg = preset(args.preset)
            else:
                params = Path(args.params) if args.params else src / "params.yaml"
                run_cfg = load_run_config(params if params.is_file() else REPO / "params.yaml")
            t0 = time.perf_counter()
            record = prepare(src, Path(args.dir), int(args.limit_mib * 2**20), run_cfg, wheels=not args.no_wheels,
                             gl=not args.no_gl, vae_episodes=args.vae_episodes)
            for name, size in record["bytes"].items():
                print(f"  {name:<16} {mib(size)}")
            unused = [w.removeprefix("wheel ") for w, why in record["left_out"].items()
                      if w.startswith("wheel ") and why == "not imported by the GPU steps"]
            for what, why in record["left_out"].items():
                if what.removeprefix("wheel ") not in unused:
                    print(f"  left out: {what}: {why}")
            if unused:
                print(f"  left out, not imported by the GPU steps: {len(unused)} pinned packages the image lacks "
                      f"({', '.join(unused)})")
            print(f"prepare: {args.dir}: {mib(record['total_bytes'])} with the repository's "
                  f"{mib(record['repository_bytes'])} (limit {mib(record['limit_bytes'])}) in "
                  f"{time.perf_counter() - t0:.0f} s")
            return 0
        if args.command == "step":
            return run_step(args)
        step_args = []
        for flag in ("train_seconds", "episodes", "override"):
            if getattr(args, flag) is not None:
                step_args += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
        summary = run(Path(args.out), Path(args.dir), args.cpu, _limits(args.limit, args.cpu),
                      args.total or (330 if args.cpu else 520), args.only or [], step_args, args.install_note)
        return 0 if all(d.get("status") == "ok" for d in summary["steps"].values()) else 1
    except LingbotError as exc:
        print(f"gpu: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
