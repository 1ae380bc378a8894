"""Benchmarks: `lingbot bench WHAT` prints a table, then one JSON object as its last line."""

from __future__ import annotations

import dataclasses
import json
import resource
import tempfile
from pathlib import Path


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


def run(what: str, args) -> int:
    if what == "data":
        result = bench_data(args.episodes, args.workers)
    else:  # argparse restricts the choices; kept for direct callers
        raise ValueError(f"unknown benchmark {what!r}")
    print(_table([(k, v) for k, v in result.items()]))
    print(json.dumps(result))
    return 0
