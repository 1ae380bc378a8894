"""The Great Expectations gate: a clean dataset passes; each kind of damage is caught and named."""

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lingbot.config import ValidateConfig
from lingbot.data.validate import validate
from lingbot.errors import LingbotError


def _data_file(demos):
    (path,) = sorted((demos / "dataset" / "data").rglob("*.parquet"))
    return path


def _rewrite_frames(demos, change):
    """Apply `change(columns: dict[str, np.ndarray])` to the frame parquet, keeping its schema."""
    path = _data_file(demos)
    table = pq.read_table(path)
    columns = {}
    for name in table.column_names:
        values = table.column(name).to_pylist()
        columns[name] = np.array(values)
    change(columns)
    arrays = []
    for field in table.schema:
        values = columns[field.name]
        arrays.append(pa.array(values.tolist(), type=field.type))
    pq.write_table(pa.Table.from_arrays(arrays, schema=table.schema), path)


def _episode_rows(columns, episode):
    return np.nonzero(columns["episode_index"] == episode)[0]


def test_clean_dataset_passes_and_writes_report(ingested, tmp_path):
    report = validate(ingested, ValidateConfig(), report_dir=tmp_path / "report")
    assert report["success"], report["failures_text"]
    assert report["expectations"] > 20
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    assert saved["success"] and saved["frames"] == report["frames"]
    assert (tmp_path / "report" / "data_docs" / "index.html").is_file()


@pytest.mark.parametrize(
    "damage, expectation, column",
    [
        ("action_out_of_bounds", "expect_column_values_to_be_between", "action[2]"),
        ("state_nan", "expect_column_values_to_not_be_null", "observation.state[1]"),
        ("state_inf", "expect_column_values_to_be_between", "observation.state[0]"),
        ("timestamp_gap", "expect_column_values_to_be_between", "timestamp_step"),
        ("frame_index_gap", "expect_column_pair_values_to_be_equal", "frame_index"),
    ],
)
def test_frame_damage_names_expectation_column_and_episode(demos_copy, damage, expectation, column):
    episode = 2

    def change(c):
        rows = _episode_rows(c, episode)
        if damage == "action_out_of_bounds":
            c["action"][rows[3], 2] = 1.7
        elif damage == "state_nan":
            c["observation.state"][rows[4], 1] = np.nan
        elif damage == "state_inf":
            c["observation.state"][rows[4], 0] = np.inf
        elif damage == "timestamp_gap":
            c["timestamp"][rows[5]:rows[-1] + 1] += 0.5
        elif damage == "frame_index_gap":
            c["frame_index"][rows[6]:rows[-1] + 1] += 1

    _rewrite_frames(demos_copy, change)
    report = validate(demos_copy, ValidateConfig())
    assert not report["success"]
    first = report["failures_text"][0]
    assert expectation in first and column in first and f"episode {episode}" in first, first
    assert all(f["episodes"] == [episode] for f in report["failed"])


def test_missing_video_is_caught(demos_copy):
    (video, *_) = sorted((demos_copy / "dataset" / "videos").rglob("*.mp4"))
    camera = video.relative_to(demos_copy / "dataset" / "videos").parts[0]
    video.unlink()
    report = validate(demos_copy, ValidateConfig())
    assert not report["success"]
    assert any(f"video_frames[{camera}]" in line for line in report["failures_text"])


def test_undecodable_video_is_caught(demos_copy):
    (video, *_) = sorted((demos_copy / "dataset" / "videos").rglob("*.mp4"))
    video.write_bytes(video.read_bytes()[: video.stat().st_size // 3])
    report = validate(demos_copy, ValidateConfig())
    assert not report["success"]
    assert any("video_frames[" in line for line in report["failures_text"])


def test_short_episode_and_empty_task_are_caught(demos_copy):
    (path,) = sorted((demos_copy / "dataset" / "meta" / "episodes").rglob("*.parquet"))
    table = pq.read_table(path)
    tasks = table.column("tasks").to_pylist()
    tasks[1] = [""]
    table = table.set_column(table.schema.get_field_index("tasks"), "tasks", pa.array(tasks, table.schema.field("tasks").type))
    pq.write_table(table, path)
    report = validate(demos_copy, ValidateConfig(min_episode_length=1000))
    lines = "\n".join(report["failures_text"])
    assert "expect_column_values_to_be_between column=length" in lines
    assert "expect_column_value_lengths_to_be_between column=task episode 1" in lines


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncated_parquet", "unreadable or truncated parquet"),
        ("missing_parquet", "parquet file missing"),
        ("old_version", "LeRobot dataset version 'v2.1'"),
        ("empty", "dataset is empty"),
        ("no_info", "is not a LeRobot dataset"),
    ],
)
def test_structural_damage_is_one_clear_line(demos_copy, damage, message):
    data = _data_file(demos_copy)
    info_path = demos_copy / "dataset" / "meta" / "info.json"
    info = json.loads(info_path.read_text())
    if damage == "truncated_parquet":
        data.write_bytes(data.read_bytes()[:200])
    elif damage == "missing_parquet":
        data.unlink()
    elif damage == "old_version":
        info["codebase_version"] = "v2.1"
        info_path.write_text(json.dumps(info))
    elif damage == "empty":
        info["total_episodes"] = 0
        info["total_frames"] = 0
        info_path.write_text(json.dumps(info))
    elif damage == "no_info":
        info_path.unlink()
    with pytest.raises(LingbotError, match=message.replace("(", r"\(")):
        validate(demos_copy, ValidateConfig())
    # The CLI turns it into a single line on stderr and exit code 2, no traceback.
    proc = subprocess.run(
        [sys.executable, "-m", "lingbot.cli", "validate", str(demos_copy)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("lingbot: error: ") and message in proc.stderr


def test_cli_failure_output_leads_with_the_failure(demos_copy):
    def change(c):
        c["action"][_episode_rows(c, 1)[0], 0] = -3.0

    _rewrite_frames(demos_copy, change)
    proc = subprocess.run(
        [sys.executable, "-m", "lingbot.cli", "validate", str(demos_copy)], capture_output=True, text=True
    )
    assert proc.returncode == 1
    first = proc.stdout.splitlines()[0]
    assert first.startswith("FAILED expect_column_values_to_be_between column=action[0] episode 1"), first
