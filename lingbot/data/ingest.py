"""Ingest any LeRobot v3 dataset: pin it, choose its keys, split it, and measure normalisation stats.

Output directory (the contract every later stage reads)::

    DIR/
      dataset/          the LeRobot v3 dataset (meta/, data/, videos/ of the chosen cameras), hard-linked;
                        with `ingest.episodes`, the chosen episodes only: meta/episodes, info.json's
                        totals and the data tables keep their rows alone, videos are linked whole
                        (segments of other episodes packed in the same file go unused)
      lingbot.json      source (spec, repo id, revision, commit), content fingerprint, fps,
                        the chosen keys {cameras, state, action}, their shapes, the task strings
      stats.json        per key: q01, q99 (the normalisation bounds, as LingBot-VA uses), mean, std,
                        min, max; measured on the train episodes only
      split.json        {"train": [episode indices], "val": [...]}, stratified by task
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from lingbot.config import IngestConfig
from lingbot.data.lerobot_io import (
    DatasetLayout,
    check_keys,
    episode_meta_files,
    episode_rows,
    episode_tasks,
    fingerprint,
    open_layout,
    parse_episodes,
    read_state_action,
    resolve_source,
)
from lingbot.errors import LingbotError
from lingbot.fsutil import atomic_dir, link_or_copy, write_json

DATASET_DIR = "dataset"


def split_episodes(episode_tasks: dict[int, str], val_fraction: float, seed: int) -> dict[str, list[int]]:
    """Stratified episode split: per task, a seeded shuffle; >= 1 validation episode once a task has 2."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    by_task: dict[str, list[int]] = {}
    for ep, task in sorted(episode_tasks.items()):
        by_task.setdefault(task, []).append(ep)
    for task in sorted(by_task):
        eps = np.array(by_task[task])
        rng.shuffle(eps)
        n_val = int(round(len(eps) * val_fraction))
        if val_fraction > 0 and len(eps) >= 2:
            n_val = max(1, n_val)
        n_val = min(n_val, len(eps) - 1)
        val += eps[:n_val].tolist()
        train += eps[n_val:].tolist()
    return {"train": sorted(train), "val": sorted(val)}


def vector_stats(values: np.ndarray, quantiles: tuple[float, float]) -> dict[str, list[float]]:
    lo, hi = np.quantile(values, quantiles, axis=0)
    return {
        "q01": lo.tolist(),
        "q99": hi.tolist(),
        "mean": values.mean(0).tolist(),
        "std": values.std(0).tolist(),
        "min": values.min(0).tolist(),
        "max": values.max(0).tolist(),
        "count": int(len(values)),
    }


def ingest(cfg: IngestConfig, out: Path) -> dict:
    """Resolve `cfg.source`, check it, and write the ingest directory at `out` atomically."""
    chosen = parse_episodes(cfg.episodes)
    source = resolve_source(cfg.source, cfg.cameras, chosen)
    layout = open_layout(source.root, chosen)
    cameras = list(cfg.cameras) or layout.video_keys
    if not cameras:
        raise LingbotError(f"{source.root}: dataset has no video cameras (image datasets are not supported)")
    check_keys(layout, [cfg.state, cfg.action, *cameras])
    for key in cameras:
        if layout.features[key].get("dtype") != "video":
            raise LingbotError(f"{source.root}: feature {key!r} is not a video camera")

    episode_index, state, action = read_state_action(layout, cfg.state, cfg.action)
    where = layout.data_files[0].parent
    for name, values in ((cfg.state, state), (cfg.action, action)):
        bad = ~np.isfinite(values).all(axis=1)
        if bad.any():
            raise LingbotError(
                f"{where}: column {name!r} has NaN/inf in episode {int(episode_index[bad][0])}"
            )

    tasks_of = episode_tasks(layout)
    split = split_episodes(tasks_of, cfg.val_fraction, cfg.seed)
    in_train = np.isin(episode_index, split["train"])
    stats = {
        cfg.state: vector_stats(state[in_train], cfg.quantiles),
        cfg.action: vector_stats(action[in_train], cfg.quantiles),
    }
    manifest = {
        "source": {
            "spec": source.spec,
            "repo_id": source.repo_id,
            "revision": source.revision,
            "commit": source.commit,
        },
        "fingerprint": fingerprint(source.root) if chosen is None else None,  # a subset's: of what is written
        "codebase_version": layout.info["codebase_version"],
        "robot_type": layout.info.get("robot_type"),
        "fps": layout.fps,
        "keys": {"cameras": cameras, "state": cfg.state, "action": cfg.action},
        "shapes": {k: list(layout.features[k]["shape"]) for k in [*cameras, cfg.state, cfg.action]},
        "names": {k: layout.features[k].get("names") for k in (cfg.state, cfg.action)},
        "tasks": sorted(set(tasks_of.values())),
        "episodes": len(tasks_of),
        "frames": int(len(episode_index)),
    }
    if chosen is not None:
        manifest["source"]["episodes"] = cfg.episodes
    with atomic_dir(Path(out)) as tmp:
        tmp.mkdir(parents=True)
        # Hard links where possible (a large dataset is not stored twice); the videos of cameras not
        # taken are left behind.
        skipped = {key for key in layout.video_keys if key not in cameras}

        def ignore(directory: str, names: list[str]) -> set[str]:
            dropped = {n for n in names if n.startswith(".") and (n == ".cache" or n.endswith("lock"))}
            if Path(directory) == source.root / "videos":
                dropped |= {n for n in names if n in skipped}
            return dropped

        if chosen is None:
            shutil.copytree(source.root, tmp / DATASET_DIR, ignore=ignore, copy_function=link_or_copy)
        else:
            write_subset(layout, cameras, tmp / DATASET_DIR)
            manifest["fingerprint"] = fingerprint(tmp / DATASET_DIR)
        write_json(tmp / "lingbot.json", manifest)
        write_json(tmp / "stats.json", stats)
        write_json(tmp / "split.json", split)
    return {
        "episodes": manifest["episodes"],
        "frames": manifest["frames"],
        "train_episodes": len(split["train"]),
        "val_episodes": len(split["val"]),
        "tasks": len(manifest["tasks"]),
    }


def _meta_files(root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in sorted((root / "meta").rglob("*")) if p.is_file()]


def write_subset(layout: DatasetLayout, cameras: list[str], dest: Path) -> None:
    """The restricted `layout` as a dataset at `dest`: its episodes' rows of meta/episodes and of the
    data tables, info.json's totals for them, the other meta files and the videos hard-linked."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = layout.root
    for rel in _meta_files(root):
        if rel.startswith(("meta/episodes/", "meta/info.json")):
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        link_or_copy(root / rel, dest / rel)
    episodes = pa.concat_tables(pq.read_table(p) for p in episode_meta_files(root))
    (dest / "meta" / "episodes" / "chunk-000").mkdir(parents=True)
    pq.write_table(episode_rows(episodes, layout, root / "meta" / "episodes"),
                   dest / "meta" / "episodes" / "chunk-000" / "file-000.parquet")
    info = dict(layout.info, total_episodes=len(layout.episodes), total_frames=int(layout.episodes["length"].sum()))
    write_json(dest / "meta" / "info.json", info)
    for rel in layout.files(cameras):
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        if rel.startswith("data/"):
            pq.write_table(episode_rows(pq.read_table(root / rel), layout, root / rel), dest / rel)
        else:
            link_or_copy(root / rel, dest / rel)
