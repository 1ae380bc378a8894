"""The data gate: Great Expectations suites over the frame table and the episode table.

Structural damage (missing or truncated parquet, another LeRobot version, an empty dataset) is caught
first by `lerobot_io.open_layout` with a one-line error. Then two suites run in an ephemeral GX
context:

- frames: required columns; no NaN/inf in state and action; actions and states inside the declared
  bounds; timestamps strictly increasing at 1/fps within each episode; frame_index contiguous from 0;
  task and episode indices known.
- episodes: length in range and equal to the frames found; a task string; for every camera, the video
  file present and decodable with exactly `length` frames in the episode's segment.

Per-episode and per-frame facts that GX cannot compute itself (timestamp steps, decoded frame counts)
are measured here and added as columns, so every rule is a plain GX expectation with the episode index
reported for each failing row.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from lingbot.config import ValidateConfig
from lingbot.data.lerobot_io import DatasetLayout, column_array, iter_episode_frames, open_layout, read_frames
from lingbot.fsutil import atomic_dir, is_timing, write_json

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

FRAME_COLUMNS = ("index", "episode_index", "frame_index", "timestamp", "task_index")
MAX_LISTED_EPISODES = 10


def _keys(root: Path) -> tuple[Path, dict]:
    """(dataset root, chosen keys) for an ingest directory or a bare LeRobot dataset directory."""
    manifest = root / "lingbot.json"
    if manifest.is_file():
        keys = json.loads(manifest.read_text())["keys"]
        return root / "dataset", keys
    return root, {"cameras": None, "state": "observation.state", "action": "action"}


def count_video_frames(layout: DatasetLayout, key: str) -> dict[int, int]:
    """Frames per episode found in camera `key`'s video segments; -1 where the file is missing or broken."""
    return {ep: (-1 if error else n) for ep, n, error in iter_episode_frames(layout, key, rgb=False)}


def _flatten(table, key: str, columns: dict) -> None:
    if key in table.column_names:
        values = column_array(table, key, Path(key))
        for i in range(values.shape[1]):
            columns[f"{key}[{i}]"] = values[:, i]


def frame_table(layout: DatasetLayout, keys: dict):
    """The frame table as pandas, vector columns flattened, with derived per-frame checks added."""
    import pandas as pd

    table = read_frames(layout, [*FRAME_COLUMNS, keys["state"], keys["action"]])
    columns: dict = {c: table.column(c).to_numpy() for c in FRAME_COLUMNS if c in table.column_names}
    _flatten(table, keys["state"], columns)
    _flatten(table, keys["action"], columns)
    df = pd.DataFrame(columns)
    if {"episode_index", "timestamp"} <= set(df.columns):
        step = df.groupby("episode_index", sort=False)["timestamp"].diff()
        first = df.groupby("episode_index", sort=False).cumcount() == 0
        # The first frame has no predecessor: its step is the nominal one by definition.
        df["timestamp_step"] = step.where(~first, 1.0 / layout.fps)
    if {"episode_index", "frame_index"} <= set(df.columns):
        df["frame_index_expected"] = df.groupby("episode_index", sort=False).cumcount()
    return df


def episode_table(layout: DatasetLayout, keys: dict, frames, cfg: ValidateConfig):
    import pandas as pd

    eps = layout.episodes
    df = pd.DataFrame({
        "episode_index": eps["episode_index"].astype(int).to_numpy(),
        "length": eps["length"].astype(int).to_numpy(),
    })
    df["task"] = [
        (str(t[0]) if t is not None and len(t) else None) for t in eps.get("tasks", [None] * len(eps))
    ]
    if "episode_index" in frames.columns:
        found = frames.groupby("episode_index").size()
        df["frames_found"] = df["episode_index"].map(found).fillna(0).astype(int)
    cameras = keys["cameras"] if keys["cameras"] is not None else layout.video_keys
    video_columns = []
    if cfg.check_videos:
        for key in cameras:
            counts = count_video_frames(layout, key)
            column = f"video_frames[{key}]"
            df[column] = df["episode_index"].map(counts).astype(int)
            video_columns.append(column)
    return df, video_columns


def _frame_suite(gxe, layout: DatasetLayout, keys: dict, df, cfg: ValidateConfig) -> list:
    suite = []
    for column in FRAME_COLUMNS:
        suite.append(gxe.ExpectColumnToExist(column=column))
    for key, shape in ((keys["state"], layout.features.get(keys["state"], {}).get("shape", [1])),
                       (keys["action"], layout.features.get(keys["action"], {}).get("shape", [1]))):
        dims = int(np.prod(shape))
        for i in range(dims):
            column = f"{key}[{i}]"
            suite.append(gxe.ExpectColumnToExist(column=column))
            if column not in df.columns:
                continue
            suite.append(gxe.ExpectColumnValuesToNotBeNull(column=column))
            if key == keys["action"]:
                low, high = cfg.action_min, cfg.action_max
            else:
                low, high = -cfg.state_abs_max, cfg.state_abs_max
            # Between also rejects +-inf, which pandas does not count as null.
            suite.append(gxe.ExpectColumnValuesToBeBetween(column=column, min_value=low, max_value=high))
    if "timestamp_step" in df.columns:
        nominal = 1.0 / layout.fps
        suite.append(gxe.ExpectColumnValuesToBeBetween(
            column="timestamp_step",
            min_value=nominal - cfg.timestamp_tolerance_s,
            max_value=nominal + cfg.timestamp_tolerance_s,
        ))
    if "frame_index_expected" in df.columns:
        suite.append(gxe.ExpectColumnPairValuesToBeEqual(
            column_A="frame_index", column_B="frame_index_expected"
        ))
    if "task_index" in df.columns:
        suite.append(gxe.ExpectColumnValuesToBeInSet(column="task_index", value_set=sorted(layout.tasks)))
    if "episode_index" in df.columns:
        suite.append(gxe.ExpectColumnValuesToBeInSet(
            column="episode_index", value_set=layout.episodes["episode_index"].astype(int).tolist()
        ))
    return suite


def _episode_suite(gxe, df, video_columns: list[str], cfg: ValidateConfig) -> list:
    suite = []
    suite.append(gxe.ExpectColumnValuesToBeBetween(
        column="length", min_value=cfg.min_episode_length, max_value=cfg.max_episode_length
    ))
    if "frames_found" in df.columns:
        suite.append(gxe.ExpectColumnPairValuesToBeEqual(column_A="length", column_B="frames_found"))
    suite.append(gxe.ExpectColumnValuesToNotBeNull(column="task"))
    suite.append(gxe.ExpectColumnValueLengthsToBeBetween(column="task", min_value=1))
    for column in video_columns:
        suite.append(gxe.ExpectColumnPairValuesToBeEqual(column_A="length", column_B=column))
    return suite


def _describe(result, df, table: str) -> dict:
    config = result.expectation_config
    kwargs = dict(config.kwargs)
    columns = [kwargs[k] for k in ("column", "column_A", "column_B") if k in kwargs]
    details = result.result or {}
    index = details.get("unexpected_index_list") or []
    episodes: list[int] = []
    for row in index:
        ep = row.get("episode_index") if isinstance(row, dict) else None
        if ep is None and isinstance(row, (int, np.integer)) and "episode_index" in df.columns:
            ep = df["episode_index"].iloc[int(row)]
        if ep is not None and int(ep) not in episodes:
            episodes.append(int(ep))
    exception = (result.exception_info or {}).get("exception_message")
    return {
        "table": table,
        "expectation": config.type,
        "columns": columns,
        "episodes": sorted(episodes),
        "unexpected_count": details.get("unexpected_count"),
        "observed": details.get("observed_value"),
        "exception": exception,
    }


def _failure_line(f: dict) -> str:
    eps = f["episodes"]
    shown = ", ".join(map(str, eps[:MAX_LISTED_EPISODES])) + (" ..." if len(eps) > MAX_LISTED_EPISODES else "")
    where = f"episode {shown}" if eps else "all episodes"
    count = f" ({f['unexpected_count']} {f['table']} rows)" if f["unexpected_count"] else ""
    if f["exception"] and not eps:
        where = f["exception"].splitlines()[0]
    return f"FAILED {f['expectation']} column={','.join(f['columns'])} {where}{count}"


def run_suites(suites: list[tuple[str, list, object]], docs_dir: Path | None) -> list[tuple[str, object, object]]:
    """Run (name, expectations, dataframe) through GX; build HTML data docs into `docs_dir` when given."""
    import great_expectations as gx

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = gx.data_context.types.base.ProgressBarsConfig(globally=False)
    if docs_dir is not None:
        context.add_data_docs_site(
            site_name="lingbot",
            site_config={
                "class_name": "SiteBuilder",
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            },
        )
    source = context.data_sources.add_pandas("lingbot")
    results = []
    for name, expectations, df in suites:
        batch_definition = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe(name)
        suite = context.suites.add(gx.ExpectationSuite(name=name, expectations=expectations))
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=name, data=batch_definition, suite=suite)
        )
        actions = []
        if docs_dir is not None:
            actions.append(gx.checkpoint.UpdateDataDocsAction(name="docs", site_names=["lingbot"]))
        checkpoint = context.checkpoints.add(
            gx.Checkpoint(
                name=f"{name}-gate",
                validation_definitions=[definition],
                actions=actions,
                result_format={
                    "result_format": "COMPLETE",
                    "unexpected_index_column_names": ["episode_index"],
                    "partial_unexpected_count": 20,
                },
            )
        )
        run = checkpoint.run(batch_parameters={"dataframe": df})
        (validation,) = run.run_results.values()
        results.append((name, validation, df))
    return results


def validate(path: Path, cfg: ValidateConfig, report_dir: Path | None = None) -> dict:
    """Run both suites over an ingest directory (or bare dataset); write report.json + data docs."""
    import great_expectations.expectations as gxe

    t0 = time.perf_counter()
    root, keys = _keys(Path(path))
    layout = open_layout(root)
    frames = frame_table(layout, keys)
    episodes, video_columns = episode_table(layout, keys, frames, cfg)
    suites = [
        ("frames", _frame_suite(gxe, layout, keys, frames, cfg), frames),
        ("episodes", _episode_suite(gxe, episodes, video_columns, cfg), episodes),
    ]

    if report_dir is None:
        return _report(run_suites(suites, None), frames, episodes, t0)
    with atomic_dir(Path(report_dir)) as tmp:
        tmp.mkdir(parents=True)
        report = _report(run_suites(suites, tmp / "data_docs"), frames, episodes, t0)
        # The report holds what the data is, not how long it took: the same dataset, the same bytes.
        # (GX stamps its data docs with the run's time; `.dvcignore` keeps them out of the stage's hash.)
        write_json(tmp / "report.json", {k: v for k, v in report.items() if not is_timing(k)})
    return report


def _report(results, frames, episodes, t0: float) -> dict:
    failed, total = [], 0
    for name, validation, df in results:
        for r in validation.results:
            total += 1
            if not r.success:
                failed.append(_describe(r, df, name))
    elapsed = time.perf_counter() - t0
    return {
        "success": not failed,
        "expectations": total,
        "frames": int(len(frames)),
        "episodes": int(len(episodes)),
        "failed": failed,
        "failures_text": [_failure_line(f) for f in failed],
        "seconds": round(elapsed, 3),
        "validate_frames_per_s": round(len(frames) / elapsed, 1),
    }

